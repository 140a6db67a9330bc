"""gs:// end to end against a real GCS emulator on 127.0.0.1: data prepared into a bucket, a run
directory in a bucket killed with SIGKILL and resumed with the same losses as a straight run,
TensorBoard events and metrics read back from the bucket; unsupported schemes refused."""
import json
import re
import signal
import subprocess
import sys
import time

import pytest

from gcs_helpers import FakeGCS, tensorboard_scalars
from test_train import ROOT, corpus  # noqa: F401  (corpus is a fixture)

STEPS, EVERY = 60, 10


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    server = FakeGCS(tmp_path_factory.mktemp("gcs"))
    server.make_bucket("bucket")
    yield server
    server.close()


def args(run_dir, data_path, *extra):
    return ["tiny", f"data.path={data_path}", f"train.run_dir={run_dir}", "model.vocab_size=384",
            "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "model.mlp_dim=64",
            "data.seq_len=32", "train.batch_size=8", "train.eval_batches=1", "train.log_every=1",
            "model.attention_impl=xla", f"train.steps={STEPS}", "train.eval_every=30",
            f"checkpoint.every={EVERY}", "train.final_eval=false", "checkpoint.async_save=false", *extra]


def run_env(gcs):
    e = {k: v for k, v in gcs.env().items() if not k.startswith(("XLA_", "JAX_", "TESSERA_"))}
    return {**e, "JAX_PLATFORMS": "cpu"}


def losses(gcs, run: str) -> dict[int, float]:
    rows = [json.loads(line) for line in gcs.read("bucket", f"{run}/metrics.jsonl").decode().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}  # a resumed run's repeats overwrite


def steps_saved(gcs, run: str) -> set[int]:
    """Steps with a checkpoint directory, complete or being written."""
    names = gcs.list("bucket", f"{run}/checkpoints/")
    return {int(n.split("/")[2]) for n in names if n.split("/")[2].isdigit()}


def test_prepare_train_kill_resume_on_gcs(gcs, corpus, tmp_path):
    root, tok = corpus
    prep = subprocess.run([sys.executable, "-m", "data.prepare", str(root), "gs://bucket/data", "--tokenizer", tok,
                           "--val-fraction", "0.2"], cwd=ROOT, env=run_env(gcs), capture_output=True, text=True,
                          timeout=300)
    assert prep.returncode == 0, prep.stderr
    assert {"data/manifest.json", "data/tokenizer.model"} <= set(gcs.list("bucket", "data/"))

    straight = subprocess.run([sys.executable, "train.py", *args("gs://bucket/straight", "gs://bucket/data")],
                              cwd=ROOT, env=run_env(gcs), capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    want = losses(gcs, "straight")
    assert sorted(want) == list(range(1, STEPS + 1))

    proc = subprocess.Popen([sys.executable, "train.py", *args("gs://bucket/run", "gs://bucket/data")], cwd=ROOT,
                            env=run_env(gcs), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not steps_saved(gcs, "run") & {20, 30, 40}:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = steps_saved(gcs, "run")
    assert max(saved) < STEPS, "the run finished before it was killed"
    resumed = subprocess.run([sys.executable, "train.py", *args("gs://bucket/run", "gs://bucket/data")], cwd=ROOT,
                             env=run_env(gcs), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # Orbax resumes from the newest complete checkpoint (one being written at the kill is not).
    (start,) = re.findall(r"resumed from step (\d+) \(gs://bucket/run/checkpoints\)", resumed.stderr)
    assert int(start) in saved and int(start) % EVERY == 0
    got = losses(gcs, "run")
    assert got == want  # the same program, the same batches: bit-identical losses

    names = gcs.list("bucket", "run/")
    assert {"run/config.yaml", "run/tokenizer.model"} <= set(names)
    events = [n for n in names if n.startswith("run/tensorboard/") and "tfevents" in n]
    assert events
    scalars = {}
    for name in events:
        scalars.update(tensorboard_scalars(gcs.read("bucket", name), "loss"))
    assert set(scalars) == set(range(1, STEPS + 1))
    assert all(abs(scalars[s] - want[s]) <= 1e-6 * abs(want[s]) for s in want)


@pytest.mark.parametrize("key", ["train.run_dir", "data.path"])
def test_unsupported_scheme_is_a_one_line_error(key, tmp_path):
    out = subprocess.run([sys.executable, "train.py", "tiny", f"{key}=s3://bucket/x"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == \
        f"error: {key}=s3://bucket/x: the s3:// scheme is not supported (local paths and gs:// are)"


def test_sweep_directory_on_gcs(gcs, corpus, tmp_path):
    """A 2-trial sweep whose sweep_dir is gs://: trials.json, every trial's run directory and
    train.log, the shared tokenizer and prepared corpus, the tables and plots all land in the bucket;
    a rerun finds the trials finished."""
    root, _ = corpus
    overrides = {"data.path": str(root), "model.vocab_size": 384, "model.d_model": 32, "model.n_layers": 1,
                 "model.n_heads": 2, "model.n_kv_heads": 1, "model.mlp_dim": 64, "data.seq_len": 32,
                 "train.batch_size": 4, "train.steps": 3, "train.eval_every": 3, "train.eval_batches": 1,
                 "train.log_every": 1, "checkpoint.every": 3, "train.final_eval": "false",
                 "data.val_fraction": 0.2}
    lines = ["base: tiny", "overrides:"] + [f"  {k}: {v}" for k, v in overrides.items()]
    lines += ["axes:", "  train.lr: {grid: [1.0e-3, 3.0e-3]}", "metric: {name: val_bpb, direction: min}",
              "parallel: 2", "sweep_dir: gs://bucket/sweep"]
    (tmp_path / "s.yaml").write_text("\n".join(lines) + "\n")
    cmd = [sys.executable, "sweep.py", str(tmp_path / "s.yaml")]
    out = subprocess.run(cmd, cwd=ROOT, env=run_env(gcs), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    names = set(gcs.list("bucket", "sweep/"))
    for name in ("trials.json", "results.csv", "results.md", "curves.png", "tokenizer/tokenizer.model",
                 "t000/train.log", "t001/train.log", "t000/metrics.jsonl", "t001/config.yaml"):
        assert f"sweep/{name}" in names, name
    trials = json.loads(gcs.read("bucket", "sweep/trials.json"))["trials"]
    assert [t["status"] for t in trials] == ["finished", "finished"]
    assert "step 3" in gcs.read("bucket", "sweep/t001/train.log").decode()
    prepared = {n.split("/")[2] for n in names if n.startswith("sweep/data_cache/prepared-")}
    assert len(prepared) == 1  # the corpus was prepared once, for both trials
    again = subprocess.run(cmd, cwd=ROOT, env=run_env(gcs), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "2 of 2 trials already done" in again.stderr
