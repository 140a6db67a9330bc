"""A sweep's results: results.csv, results.md (sorted by the metric), PNG plots, TensorBoard hparams.

Everything is computed from the trials' own metrics.jsonl files and trials.json, so the report can
be rebuilt at any time (`sweep.py SWEEP.yaml --report`), including for a half-finished sweep.
"""
from __future__ import annotations

import csv
import io
import json
import math
import statistics

from store.paths import as_path, write_atomic
from sweeps.spec import SweepSpec, format_value, trial_config

VAL_KEYS = ("val_bpb", "val_loss")


def read_metrics(run_dir) -> list[dict]:
    """The rows of a run's metrics.jsonl (a line cut short by a kill is skipped)."""
    rows = []
    try:
        with (as_path(run_dir) / "metrics.jsonl").open() as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    except OSError:
        pass
    return rows


def trial_summary(run_dir, metric: str) -> dict:
    """The metric (its last value), steps reached, median tokens/s and the loss curves of one run.

    A resumed run appends to metrics.jsonl, so rows are keyed by step and the later row wins.
    """
    rows = read_metrics(run_dir)
    value = next((r[metric] for r in reversed(rows) if r.get(metric) is not None), None)
    train = {r["step"]: r["loss"] for r in rows if r.get("loss") is not None}
    val_key = next((k for k in ((metric,) if metric.startswith("val_") else ()) + VAL_KEYS
                    if any(r.get(k) is not None for r in rows)), None)
    val = {r["step"]: r[val_key] for r in rows if val_key and r.get(val_key) is not None}
    tps = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
    return {"metric": value, "steps": max((r.get("step", 0) for r in rows), default=0),
            "tokens_per_s": statistics.median(tps) if tps else None,
            "train_curve": sorted(train.items()), "val_curve": sorted(val.items()), "val_key": val_key}


def collect(spec: SweepSpec, records: dict) -> list[dict]:
    """One row per trial: axis values, status, metric, steps, tokens/s, parameter count, error."""
    from model.stats import param_count  # config arithmetic only: no jax import
    rows = []
    for trial in spec.trials:
        rec = records.get(trial.id, {})
        s = trial_summary(spec.sweep_dir / trial.id, spec.metric)
        cfg = trial_config(spec, trial)
        status = rec.get("status", "pending")
        if status == "pending" and s["steps"] >= cfg.train.steps:
            status = "finished"  # run outside the sweep (from --dry-run's commands) to the end
        rows.append({"trial": trial.id, "status": status, "values": trial.values,
                     "metric": s["metric"], "steps": s["steps"], "tokens_per_s": s["tokens_per_s"],
                     "params": param_count(cfg.model), "launches": rec.get("launches", 0),
                     "returncode": rec.get("returncode"), "error": rec.get("error") or "",
                     "overrides": " ".join(trial.overrides), "curves": s})
    return rows


def ranked(spec: SweepSpec, rows: list[dict]) -> list[dict]:
    """Finished trials with a metric first, best first; then everything else in trial order."""
    scored = [r for r in rows if r["status"] == "finished" and r["metric"] is not None]
    scored.sort(key=lambda r: r["metric"], reverse=spec.direction == "max")
    return scored + [r for r in rows if r not in scored]


def _fmt(x, digits: int = 4) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:,.0f}"
    return str(x)


def write_tables(spec: SweepSpec, rows: list[dict]) -> None:
    """results.csv (trial order, full precision) and results.md (sorted by the metric)."""
    keys = spec.keys
    f = io.StringIO(newline="")  # written whole: the sweep directory may be gs://
    w = csv.writer(f)
    w.writerow(["trial", "status", *keys, spec.metric, "steps", "tokens_per_s", "params", "launches",
                "returncode", "error", "overrides"])
    for r in rows:
        w.writerow([r["trial"], r["status"], *(format_value(r["values"][k]) for k in keys),
                    "" if r["metric"] is None else r["metric"], r["steps"],
                    "" if r["tokens_per_s"] is None else round(r["tokens_per_s"], 1), r["params"],
                    r["launches"], "" if r["returncode"] is None else r["returncode"], r["error"],
                    r["overrides"]])
    write_atomic(spec.sweep_dir / "results.csv", f.getvalue().encode())
    order = ranked(spec, rows)
    done = sum(r["status"] == "finished" for r in rows)
    lines = [f"# Sweep {spec.name}", "",
             f"{done} of {len(rows)} trials finished; metric `{spec.metric}` ({spec.direction}imise). "
             f"Base `{spec.base}`" + (f", fixed overrides `{' '.join(spec.overrides)}`." if spec.overrides else "."),
             ""]
    if order and order[0]["status"] == "finished" and order[0]["metric"] is not None:
        best = order[0]
        setting = ", ".join(f"{k}={format_value(v)}" for k, v in best["values"].items())
        lines += [f"Best: **{best['trial']}** ({setting})"
                  f" with {spec.metric} {_fmt(best['metric'])}.", ""]
    head = ["rank", "trial", *keys, spec.metric, "steps", "tokens/s", "params", "status", "error"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(order, 1):
        rank = str(i) if r["status"] == "finished" and r["metric"] is not None else ""
        error = r["error"].replace("|", "\\|")
        tps = "" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f}"
        cells = [rank, r["trial"], *(format_value(r["values"][k]) for k in keys), _fmt(r["metric"]),
                 str(r["steps"]), tps, f"{r['params']:,}", r["status"],
                 error[:120] + ("..." if len(error) > 120 else "")]
        lines.append("| " + " | ".join(cells) + " |")
    write_atomic(spec.sweep_dir / "results.md", ("\n".join(lines) + "\n").encode())


def _label(values: dict) -> str:
    return ", ".join(f"{k.split('.')[-1]}={format_value(v)}" for k, v in values.items())


def _log_scale(xs: list) -> bool:
    """Log axes for positive numbers spanning 3x or more (learning rates, widths, params)."""
    nums = [x for x in xs if isinstance(x, (int, float)) and not isinstance(x, bool)]
    return len(nums) == len(xs) and all(x > 0 for x in nums) and max(nums) / min(nums) >= 2.99


def _save_png(fig, path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_atomic(path, buf.getvalue())


def write_plots(spec: SweepSpec, rows: list[dict]) -> list:
    """curves.png (training loss and validation curves of all trials) and metric_vs_<key>.png per axis."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter
    out = []
    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(12, 4.5))
    val_key = next((r["curves"]["val_key"] for r in rows if r["curves"]["val_key"]), "validation")
    for r in rows:
        c = r["curves"]
        label = f"{r['trial']} {_label(r['values'])}" + ("" if r["status"] == "finished" else f" [{r['status']}]")
        if c["train_curve"]:
            line, = ax_t.plot(*zip(*c["train_curve"]), label=label, lw=1.2)
            if c["val_curve"]:
                ax_v.plot(*zip(*c["val_curve"]), marker="o", ms=3, color=line.get_color(), label=label)
        elif c["val_curve"]:
            ax_v.plot(*zip(*c["val_curve"]), marker="o", ms=3, label=label)
    ax_t.set(xlabel="step", ylabel="training loss", title="training loss")
    ax_v.set(xlabel="step", ylabel=val_key, title=f"validation {val_key}")
    for ax in (ax_t, ax_v):
        ax.grid(alpha=0.3)
    if len(rows) <= 16:
        ax_v.legend(fontsize=7, loc="best")
    fig.suptitle(f"sweep {spec.name}")
    fig.tight_layout()
    out.append(spec.sweep_dir / "curves.png")
    _save_png(fig, out[-1])
    plt.close(fig)

    done = [r for r in rows if r["status"] == "finished" and r["metric"] is not None]
    keys = spec.keys
    # params varies only with model-shape axes; plot against it for scaling sweeps
    targets = keys + (["params"] if len({r["params"] for r in rows}) > 1 else [])
    for key in targets:
        get = (lambda r: r["params"]) if key == "params" else (lambda r, k=key: r["values"][k])
        linked = next((a.keys for a in spec.axes if key in a.keys), (key,))
        others = [k for k in keys if k not in linked]  # group lines by the other axes' values
        if key == "params":  # model.* keys set the parameter count: one line across them
            others = [k for k in keys if not k.startswith("model.")]
        groups: dict[tuple, list] = {}
        for r in done:
            groups.setdefault(tuple(format_value(r["values"][k]) for k in others), []).append(r)
        fig, ax = plt.subplots(figsize=(6, 4.5))
        xs_all = [get(r) for r in done]
        categorical = any(isinstance(x, (str, bool, list, tuple)) for x in xs_all)
        cats = sorted({format_value(x) for x in xs_all}) if categorical else []
        for group, members in sorted(groups.items()):
            members.sort(key=lambda r: format_value(get(r)) if categorical else get(r))
            xs = [cats.index(format_value(get(r))) if categorical else get(r) for r in members]
            name = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in zip(others, group)) or None
            ax.plot(xs, [r["metric"] for r in members], marker="o", label=name)
        if categorical:
            ax.set_xticks(range(len(cats)), cats)
        elif xs_all:
            if _log_scale(xs_all):
                ax.set_xscale("log")
            ticks = sorted(set(xs_all))
            if len(ticks) <= 8 and key != "params":  # label the swept values themselves
                ax.set_xticks(ticks, [format_value(t) for t in ticks])
                ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set(xlabel="parameters" if key == "params" else key, ylabel=spec.metric,
               title=f"{spec.metric} ({spec.direction}) vs {key}")
        ax.grid(alpha=0.3, which="both")
        if len(groups) > 1 and len(groups) <= 12:
            ax.legend(fontsize=7)
        fig.tight_layout()
        out.append(spec.sweep_dir / f"metric_vs_{key}.png")
        _save_png(fig, out[-1])
        plt.close(fig)
    return out


def _hparam(value):
    """TensorBoard hparams take bool, str, int or float."""
    return value if isinstance(value, (bool, str, int, float)) else format_value(value)


def write_tensorboard(spec: SweepSpec, rows: list[dict]) -> None:
    """TensorBoard hparams: one entry per finished trial under SWEEP_DIR/tensorboard.

    The directory is rebuilt from scratch each time, so a resumed sweep does not log a trial twice.
    `tensorboard --logdir SWEEP_DIR` shows these next to every trial's own curves.
    """
    from tensorboardX import SummaryWriter
    tb_dir = spec.sweep_dir / "tensorboard"
    if tb_dir.exists():
        from etils import epath
        epath.Path(tb_dir).rmtree()
    writer = SummaryWriter(str(tb_dir))
    for r in rows:
        if r["status"] != "finished" or r["metric"] is None or not math.isfinite(r["metric"]):
            continue
        hparams = {k: _hparam(v) for k, v in r["values"].items()}
        hparams["params"] = r["params"]
        metrics = {f"hparam/{spec.metric}": float(r["metric"]), "hparam/steps": float(r["steps"])}
        if r["tokens_per_s"] is not None:
            metrics["hparam/tokens_per_s"] = float(r["tokens_per_s"])
        writer.add_hparams(hparams, metrics, name=r["trial"])
    writer.close()


def write_report(spec: SweepSpec, records: dict, plots: bool = True) -> list[dict]:
    """Tables always; plots and TensorBoard hparams too unless plots=False (the per-trial refresh)."""
    spec.sweep_dir.mkdir(parents=True, exist_ok=True)
    rows = collect(spec, records)
    write_tables(spec, rows)
    if plots:
        write_plots(spec, rows)
        write_tensorboard(spec, rows)
    return rows
