"""Run a config sweep: every trial is a train.py run in its own run directory.

  python sweep.py configs/sweeps/lr_warmup.yaml [--dry-run] [--parallel N] [--sweep-dir DIR]
                  [--retry-failed] [--report] [--ray [ADDRESS]]

The sweep file (documented in docs/sweeps.md and the examples in configs/sweeps/) names a base
preset, fixed overrides, the swept axes (grid or random draws), the metric and its direction.
Rerunning the same command skips finished trials and resumes unfinished ones from their
checkpoints. Trials run as subprocesses of this machine, or as jobs on a Ray cluster (`--ray`, or
the file's `executor` field): a rerun then reattaches to the jobs still running. Results:
SWEEP_DIR/results.csv, results.md (sorted by the metric), curves.png, metric_vs_<key>.png, and
TensorBoard hparams (`tensorboard --logdir SWEEP_DIR`).

Exit code: 0 when every trial finished, 1 when some failed (each is recorded with its error),
2 for a bad sweep file or a Ray cluster that cannot be reached, 128+signal when stopped by
SIGTERM/SIGINT (rerun to resume).
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="sweep file (configs/sweeps/*.yaml)")
    p.add_argument("--dry-run", action="store_true", help="print each trial's train.py command; run nothing")
    p.add_argument("--parallel", type=int, default=None, help="trials at once (overrides the file's `parallel`)")
    p.add_argument("--sweep-dir", default=None, help="output directory (overrides the file's `sweep_dir`)")
    p.add_argument("--retry-failed", action="store_true", help="relaunch trials recorded as failed")
    p.add_argument("--report", action="store_true", help="only rebuild the tables and plots from what ran")
    p.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                   help="run trials as jobs on this Ray cluster (auto, HOST:6379, http://HOST:8265; "
                        "other executor options in the file's `executor` field)")
    return p.parse_args(argv)


def resolve_executor(spec, ray_address):
    """The spec with its executor settled: --ray wins over the file; Ray paths made absolute.

    A Ray job runs in a copy of the checkout on another node, so the sweep directory (and with it
    every trial's run_dir and the shared tokenizer) is given to it as an absolute path.
    """
    from sweeps.executor import ExecutorSpec
    executor = spec.executor or ExecutorSpec()
    if ray_address is not None:
        executor = dataclasses.replace(executor, kind="ray", address=ray_address)
    spec = dataclasses.replace(spec, executor=executor)
    if executor.kind == "ray":
        from store.paths import is_remote
        if not is_remote(spec.sweep_dir):
            spec = dataclasses.replace(spec, sweep_dir=spec.sweep_dir.absolute())
    elif spec.parallel is None:
        spec = dataclasses.replace(spec, parallel=1)
    return spec


def dry_run(spec, extra, prepare_cmd) -> None:
    """Each trial's exact command on stdout (status of an existing sweep_dir as a trailing comment)."""
    from sweeps.runner import read_state, trial_command
    status = {r["id"]: r["status"] for r in read_state(spec.sweep_dir).get("trials", [])}
    print(f"# sweep {spec.name}: {len(spec.trials)} trials, metric {spec.metric} ({spec.direction}), "
          f"sweep_dir {spec.sweep_dir}, executor {spec.executor.kind}")
    if prepare_cmd:
        print(f"{shlex.join(prepare_cmd)}  # once: the tokenizer every trial shares")
    for trial in spec.trials:
        note = f"  # {status[trial.id]}" if trial.id in status else ""
        if spec.executor.kind == "ray":
            from sweeps.ray_jobs import submit_command
            cmd = trial_command(spec, trial, python="python", extra=extra, script="train.py")
            print(submit_command(spec.executor, cmd, spec.sweep_dir / trial.id) + note)
        else:
            print(shlex.join(trial_command(spec, trial, python="python", extra=extra)) + note)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from sharding.platforms import skip_absent_tpu
    skip_absent_tpu()  # before jax starts its backends: no libtpu start-up errors on hosts without TPU
    from sweeps.spec import SweepError, load_sweep
    from configs import ConfigError
    try:
        spec = load_sweep(args.sweep, args.sweep_dir)
        if args.parallel is not None:
            if args.parallel < 1:
                raise SweepError(f"--parallel must be >= 1, got {args.parallel}")
            spec = dataclasses.replace(spec, parallel=args.parallel)
        spec = resolve_executor(spec, args.ray)
        from sweeps.shared import shared_tokenizer
        extra, prepare_cmd = shared_tokenizer(spec)
        if args.dry_run:
            dry_run(spec, extra, prepare_cmd)
            return 0
        from sweeps.report import write_report
        from sweeps.runner import log, read_state, run_sweep
        if args.report:
            records = {r["id"]: r for r in read_state(spec.sweep_dir).get("trials", [])}
            write_report(spec, records)
            log(f"report written to {spec.sweep_dir}/results.md")
            return 0
        from sweeps.executor import make_executor
        executor = make_executor(spec.executor, spec.name)  # a Ray cluster that cannot be reached: exit 2
        at_once = f"{spec.parallel} at a time" if spec.parallel else "as many at a time as the cluster holds"
        where = f" on the Ray cluster at {executor.address}" if spec.executor.kind == "ray" else ""
        log(f"sweep {spec.name}: {len(spec.trials)} trials, {at_once}{where}, in {spec.sweep_dir}")
        from sweeps.shared import prepare
        code = run_sweep(spec, executor, retry_failed=args.retry_failed, extra=extra,
                         on_change=lambda state: write_report(spec, state.records, plots=False),
                         before=(lambda: prepare(prepare_cmd, spec)) if prepare_cmd else None)
    except ConfigError as e:  # SweepError included: one line, exit code 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    records = {r["id"]: r for r in read_state(spec.sweep_dir).get("trials", [])}
    rows = write_report(spec, records)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("finished", "failed", "interrupted", "pending")}
    from sweeps.report import ranked
    best = next((r for r in ranked(spec, rows) if r["status"] == "finished" and r["metric"] is not None), None)
    summary = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
    log(f"done: {summary}; results in {spec.sweep_dir}/results.md"
        + (f"; best {best['trial']} {spec.metric} {best['metric']:.4f}" if best else ""))
    return code


if __name__ == "__main__":
    sys.exit(main())
