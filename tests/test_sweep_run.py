"""Sweeps end to end: real train.py trials (a tiny model, a few steps, a small corpus) as subprocesses.

One 4-trial sweep is killed (SIGKILL) once a trial has finished and then rerun: the rerun must
finish the sweep without relaunching finished trials, and write the tables and plots. A second
sweep has a trial that passes config validation but fails in train.py (a mesh that needs 3
devices on 1): it is recorded as failed with train.py's error line while the other trial finishes.
"""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

TINY = {
    "model.vocab_size": 384, "model.d_model": 32, "model.n_layers": 1, "model.n_heads": 2,
    "model.n_kv_heads": 1, "model.mlp_dim": 64, "model.max_seq_len": 64, "data.seq_len": 32,
    "train.batch_size": 4, "train.steps": 4, "train.eval_every": 2, "train.eval_batches": 1,
    "train.log_every": 1, "checkpoint.every": 2,
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A few stdlib modules for training and two for validation: enough for a 384-token vocab."""
    import email
    root = tmp_path_factory.mktemp("corpus")
    stdlib = Path(email.__file__).parent.parent
    names = ["textwrap", "string", "bisect", "heapq", "shlex", "fnmatch", "glob", "colorsys",
             "keyword", "copy", "pprint", "reprlib"]
    for sub, picked in (("train", names[:10]), ("val", names[10:])):
        (root / sub).mkdir()
        for name in picked:
            (root / sub / f"{name}.py").write_text((stdlib / f"{name}.py").read_text())
    return root


def sweep_file(tmp_path, corpus, axes: str, parallel: int) -> Path:
    overrides = {**TINY, "data.path": str(corpus / "train"), "data.val_path": str(corpus / "val")}
    lines = ["base: tiny", "overrides:"] + [f"  {k}: {v}" for k, v in overrides.items()]
    lines += ["axes:", axes, "metric: {name: val_bpb, direction: min}", f"parallel: {parallel}",
              f"sweep_dir: {tmp_path / 'out'}"]
    path = tmp_path / "sweep.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def env():
    """One CPU device per trial (not the test session's 8 fake ones), unbuffered logs."""
    e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return dict(e, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


def sweep_cmd(path):
    return [sys.executable, str(ROOT / "sweep.py"), str(path)]


def state(out: Path) -> dict:
    try:
        return {t["id"]: t for t in json.loads((out / "trials.json").read_text())["trials"]}
    except (OSError, json.JSONDecodeError, KeyError):
        return {}


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory, corpus):
    """Run a 2x2 grid two at a time, SIGKILL the sweep once a trial finished and another runs, rerun."""
    tmp = tmp_path_factory.mktemp("sweep")
    path = sweep_file(tmp, corpus, "  train.lr: {grid: [1.0e-3, 3.0e-3]}\n  train.warmup_steps: {grid: [1, 2]}", 2)
    out = tmp / "out"
    first_log = open(tmp / "first.log", "w")
    proc = subprocess.Popen(sweep_cmd(path), stdout=first_log, stderr=subprocess.STDOUT, env=env(), cwd=ROOT)
    deadline = time.time() + 240
    def statuses():
        return [t["status"] for t in state(out).values()]
    while not ("finished" in statuses() and "running" in statuses()):  # kill with a trial mid-run
        assert proc.poll() is None, (tmp / "first.log").read_text()
        assert time.time() < deadline, "no trial finished in time"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first_log.close()
    before = state(out)
    finished = {tid for tid, t in before.items() if t["status"] == "finished"}
    mtimes = {tid: (out / tid / "train.log").stat().st_mtime_ns for tid in finished}
    metrics = {tid: (out / tid / "metrics.jsonl").read_text() for tid in finished}
    rerun = subprocess.run(sweep_cmd(path), capture_output=True, text=True, env=env(), cwd=ROOT, timeout=400)
    return {"out": out, "before": before, "finished": finished, "mtimes": mtimes, "metrics": metrics,
            "rerun": rerun, "after": state(out)}


def test_killed_sweep_resumes_without_redoing_finished_trials(killed_and_resumed):
    r = killed_and_resumed
    assert r["rerun"].returncode == 0, r["rerun"].stderr[-3000:]
    assert r["finished"] and len(r["finished"]) < 4, r["before"]
    assert f"{len(r['finished'])} of 4 trials already done" in r["rerun"].stderr
    for tid in r["finished"]:  # not relaunched: same launch count, log and metrics untouched
        assert r["after"][tid]["launches"] == 1
        assert (r["out"] / tid / "train.log").stat().st_mtime_ns == r["mtimes"][tid]
        assert (r["out"] / tid / "metrics.jsonl").read_text() == r["metrics"][tid]
        assert f"{tid} started" not in r["rerun"].stderr
    running = [tid for tid, t in r["before"].items() if t["status"] == "running"]
    assert running
    for tid in running:  # a trial cut off by the kill is relaunched in its run_dir
        assert r["after"][tid]["launches"] == 2 and r["after"][tid]["status"] == "finished"
        assert (r["out"] / tid / "train.log").read_text().count("$ ") == 2
        assert f"{tid} started (resuming)" in r["rerun"].stderr


def test_sweep_completes_with_tables_and_plots(killed_and_resumed):
    out, after = killed_and_resumed["out"], killed_and_resumed["after"]
    assert [t["status"] for t in after.values()] == ["finished"] * 4
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["trial"] for r in rows] == ["t000", "t001", "t002", "t003"]
    assert [(r["train.lr"], r["train.warmup_steps"]) for r in rows] == \
        [("0.001", "1"), ("0.001", "2"), ("0.003", "1"), ("0.003", "2")]
    for r in rows:
        assert r["status"] == "finished" and r["steps"] == "4" and 0 < float(r["val_bpb"]) < 20
        assert float(r["tokens_per_s"]) > 0 and int(r["params"]) > 0
    md = (out / "results.md").read_text()
    ranked = [cells[2].strip() for cells in (line.split("|") for line in md.splitlines())
              if len(cells) > 2 and cells[1].strip().isdigit()]
    by_metric = [r["trial"] for r in sorted(rows, key=lambda r: float(r["val_bpb"]))]
    assert ranked == by_metric
    for png in ("curves.png", "metric_vs_train.lr.png", "metric_vs_train.warmup_steps.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert len(list((out / "tensorboard").rglob("events.out.tfevents.*"))) >= 4
    assert (out / "tokenizer" / "tokenizer.model").is_file()  # trained once, shared by all trials
    assert "data.tokenizer=" in (out / "t000" / "train.log").read_text().splitlines()[0]
    assert not any((out / t / "data_cache").exists() for t in after)  # the corpus tokenized once, here:
    assert len([p for p in (out / "data_cache").iterdir() if p.name.startswith("prepared-")]) == 1


def test_a_failing_trial_is_recorded_and_the_others_finish(tmp_path, corpus):
    path = sweep_file(tmp_path, corpus, "  mesh.data: {grid: [3, 1]}", 1)
    r = subprocess.run(sweep_cmd(path), capture_output=True, text=True, env=env(), cwd=ROOT, timeout=400)
    assert r.returncode == 1, r.stderr[-3000:]
    trials = state(tmp_path / "out")
    assert trials["t000"]["status"] == "failed" and trials["t000"]["returncode"] == 2
    assert trials["t000"]["error"].startswith("error: ") and "mesh" in trials["t000"]["error"]
    assert trials["t001"]["status"] == "finished"
    rows = {row["trial"]: row for row in csv.DictReader(open(tmp_path / "out" / "results.csv"))}
    assert rows["t000"]["status"] == "failed" and "mesh" in rows["t000"]["error"]
    assert rows["t001"]["status"] == "finished" and float(rows["t001"]["val_bpb"]) > 0
    md = (tmp_path / "out" / "results.md").read_text()
    assert md.index("| 1 | t001") < md.index("t000 |")  # failed trials rank last


def test_sigterm_stops_the_sweep_and_marks_trials_resumable(tmp_path, corpus):
    path = sweep_file(tmp_path, corpus, "  train.lr: {grid: [1.0e-3, 3.0e-3]}", 1)
    proc = subprocess.Popen(sweep_cmd(path), stderr=subprocess.PIPE, text=True, env=env(), cwd=ROOT)
    deadline = time.time() + 120
    while state(tmp_path / "out").get("t000", {}).get("status") != "running":
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    trials = state(tmp_path / "out")
    assert trials["t000"]["status"] == "interrupted" and trials["t001"]["status"] == "pending"
    assert "SIGTERM: stopped; rerun the same command to resume" in err
