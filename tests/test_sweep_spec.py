"""Sweep files: expansion into trials, validation errors, dry-run commands, state checks (no training)."""
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from sweeps.runner import SweepState, error_line, trial_command
from sweeps.spec import SweepError, load_sweep


def write(tmp_path, body: str, name: str = "s.yaml"):
    path = tmp_path / name
    path.write_text(body)
    return path


def test_lr_warmup_example_is_a_grid():
    spec = load_sweep(ROOT / "configs/sweeps/lr_warmup.yaml")
    assert len(spec.trials) == 6 and spec.metric == "val_bpb" and spec.direction == "min"
    assert [t.values for t in spec.trials[:2]] == [{"train.lr": 1e-3, "train.warmup_steps": 10},
                                                   {"train.lr": 1e-3, "train.warmup_steps": 50}]
    cmd = trial_command(spec, spec.trials[3], python="python")
    assert cmd[0] == "python" and cmd[1].endswith("train.py") and cmd[2] == "configs/tiny.yaml"
    assert "train.lr=0.003" in cmd and "train.warmup_steps=50" in cmd and "train.steps=200" in cmd
    assert cmd[-1] == f"train.run_dir={spec.sweep_dir / 't003'}"


def test_width_example_links_d_model_and_mlp_dim():
    from model.stats import param_count
    from sweeps.spec import trial_config
    spec = load_sweep(ROOT / "configs/sweeps/width.yaml")
    assert [(t.values["model.d_model"], t.values["model.mlp_dim"]) for t in spec.trials] == \
        [(64, 192), (128, 384), (192, 576), (256, 768)]
    params = [param_count(trial_config(spec, t).model) for t in spec.trials]
    assert params == sorted(params) and params[-1] > 4 * params[0]


def test_random_draws_are_reproducible_typed_and_in_range(tmp_path):
    body = """
base: tiny
axes:
  model.n_layers: {grid: [1, 2]}
  train.lr: {log_uniform: [1.0e-4, 1.0e-2]}
  train.warmup_steps: {uniform: [5, 50]}
  model.remat: {choice: [none, full]}
trials: 3
seed: {seed}
"""
    a = load_sweep(write(tmp_path, body.replace("{seed}", "0")))
    b = load_sweep(write(tmp_path, body.replace("{seed}", "0")))
    c = load_sweep(write(tmp_path, body.replace("{seed}", "1")))
    assert len(a.trials) == 6 and [t.overrides for t in a.trials] == [t.overrides for t in b.trials]
    assert [t.overrides for t in a.trials] != [t.overrides for t in c.trials]
    assert [t.values["model.n_layers"] for t in a.trials] == [1, 1, 1, 2, 2, 2]
    for t in a.trials:
        assert 1e-4 <= t.values["train.lr"] <= 1e-2
        assert isinstance(t.values["train.warmup_steps"], int) and 5 <= t.values["train.warmup_steps"] <= 50
        assert t.values["model.remat"] in ("none", "full")


@pytest.mark.parametrize("body, field", [
    ("axes: {train.lr: {grid: [1]}}", "'base'"),
    ("base: tiny\naxes: {train.lr: {grdi: [1]}}", "'axes.train.lr' has unknown kind 'grdi' (did you mean 'grid'?)"),
    ("base: tiny\naxes: {train.lrr: {grid: [1]}}", "'axes.train.lrr' is not a config key"),
    ("base: tiny\naxes: {train.lr: {grid: [fast]}}", "'axes.train.lr' value 'fast' is invalid"),
    ("base: tiny\naxes: {train.lr: {uniform: [1]}}\ntrials: 2", "'axes.train.lr.uniform' expects [low, high]"),
    ("base: tiny\naxes: {train.lr: {log_uniform: [0, 1]}}\ntrials: 2", "'axes.train.lr.log_uniform' needs positive"),
    ("base: tiny\naxes: {train.lr: {log_uniform: [1.0e-4, 1.0e-2]}}", "'trials' is required"),
    ("base: tiny\naxes: {train.lr: {grid: [1]}}\ntrials: 3", "'trials' applies only to random axes"),
    ("base: tiny\naxes: {train.lr: {grid: [1]}}\nmetric: {name: val_bpb, direction: down}", "'metric.direction'"),
    ("base: tiny\naxes: {train.lr: {grid: [1]}}\nparallel: 0", "'parallel' expects an integer >= 1"),
    ("base: tiny\nparralel: 2\naxes: {train.lr: {grid: [1]}}",
     "unknown sweep field 'parralel' (did you mean 'parallel'?)"),
    ("base: tiny\naxes: {train.run_dir: {grid: [a, b]}}", "'axes.train.run_dir' cannot be swept"),
    ("base: tiny\noverrides: {train.lr: 1}\naxes: {train.lr: {grid: [1]}}",
     "'axes.train.lr' sets train.lr, which overrides"),
    ("base: tiny\noverrides: {model.vocab: 1}\naxes: {train.lr: {grid: [1]}}", "'overrides.model.vocab' is invalid"),
    ("base: tiny\naxes: {data.seq_len: {grid: [128, 1024]}}", "'axes.data.seq_len' value 1024 is invalid"),
    ("base: tiny\naxes: {'model.d_model,model.mlp_dim': {grid: [[64, 192], [128]]}}",
     "'axes.model.d_model,model.mlp_dim.grid' expects lists of 2 values"),
    ("base: nowhere\naxes: {train.lr: {grid: [1]}}", "'base' names no config file"),
    ("base: tiny\naxes: []", "'axes' must map"),
    ("- just a list", "must hold a mapping"),
    ("base: tiny\naxes: {train.lr: {grid: [1]}}\nexecutor: slurm", "'executor.kind' must be one of local, ray"),
    ("base: tiny\naxes: {train.lr: {grid: [1]}}\nexecutor: {kind: ray, gpu: 1}",
     "'executor.gpu' is unknown (did you mean 'gpus'?)"),
    ("base: tiny\naxes: {train.lr: {grid: [1]}}\nexecutor: {kind: ray, cpus: -1}", "'executor.cpus' expects a number"),
    ("base: tiny\naxes: {train.lr: {grid: [1]}}\nexecutor: {kind: ray, resources: {GPU: 1}}",
     "'executor.resources.GPU' is set by executor.gpus"),
    ("base: tiny\naxes: {train.lr: {grid: [1]}}\nexecutor: {kind: local, cpus: 2}",
     "'executor.cpus' applies to kind: ray only"),
])
def test_malformed_sweep_file_is_a_one_line_error_naming_the_field(tmp_path, body, field):
    with pytest.raises(SweepError) as e:
        load_sweep(write(tmp_path, body))
    msg = str(e.value)
    assert field in msg and "\n" not in msg, msg


def test_malformed_sweep_file_exits_2_before_launching(tmp_path):
    path = write(tmp_path, f"base: tiny\naxes: {{train.lr: {{grid: [1.0e-3, oops]}}}}\nsweep_dir: {tmp_path}/out\n")
    r = subprocess.run([sys.executable, str(ROOT / "sweep.py"), str(path)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: sweep field 'axes.train.lr' value 'oops' is invalid: config key 'train.lr' expects float, got 'oops'"]
    assert not (tmp_path / "out").exists()


def test_dry_run_prints_each_trials_command_and_writes_nothing(tmp_path, capsys):
    import sweep
    path = write(tmp_path, f"""
base: tiny
overrides: {{train.steps: 7, data.path: ""}}
axes: {{train.lr: {{grid: [1.0e-3, 2.0e-3]}}, model.n_layers: {{grid: [1, 2]}}}}
sweep_dir: {tmp_path}/out
share_tokenizer: false
""")
    assert sweep.main([str(path), "--dry-run"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if not ln.startswith("#")]
    assert len(lines) == 4
    argv = shlex.split(lines[3])
    assert argv[:3] == ["python", "train.py", "tiny"]
    assert argv[3:] == ["train.steps=7", "data.path=", "train.lr=0.002", "model.n_layers=2",
                        f"data.cache_dir={tmp_path}/out/data_cache", f"train.run_dir={tmp_path}/out/t003"]
    assert not (tmp_path / "out").exists()


def test_ray_executor_field_and_its_dry_run_submit_commands(tmp_path, capsys):
    import sweep
    path = write(tmp_path, """
base: tiny
axes: {train.lr: {grid: [1.0e-3, 2.0e-3]}}
sweep_dir: rel/out
share_tokenizer: false
executor: {kind: ray, address: "http://head:8265", cpus: 2, gpus: 1, resources: {TPU: 4}, env: {A: 1}}
""")
    spec = load_sweep(path)
    assert (spec.executor.kind, spec.executor.cpus, spec.executor.gpus) == ("ray", 2, 1)
    assert spec.executor.resources == {"TPU": 4} and spec.executor.env == {"A": "1"} and spec.parallel is None
    assert sweep.main([str(path), "--dry-run"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if not ln.startswith("#")]
    argv = shlex.split(lines[1])
    sep = argv.index("--")
    flags = dict(zip(argv[3:sep:2], argv[4:sep:2]))
    assert argv[:3] == ["ray", "job", "submit"] and flags["--address"] == "http://head:8265"
    assert flags["--working-dir"] == str(ROOT) and flags["--entrypoint-num-cpus"] == "2"
    assert flags["--entrypoint-num-gpus"] == "1" and json.loads(flags["--entrypoint-resources"]) == {"TPU": 4}
    assert json.loads(flags["--runtime-env-json"])["env_vars"]["A"] == "1"
    # run from a copy of the checkout: train.py and the preset relative to it, the run dir absolute
    job = shlex.split(argv[sep + 1])
    run_dir = Path("rel/out/t001").absolute()
    assert job[:3] == ["python", "train.py", "configs/tiny.yaml"] and len(argv) == sep + 2
    assert job[-4:] == [f"train.run_dir={run_dir}", ">>", str(run_dir / "train.log"), "2>&1"]


def test_an_unreachable_ray_cluster_is_a_one_line_error(tmp_path):
    pytest.importorskip("ray.job_submission")
    import socket
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = write(tmp_path, f"base: tiny\naxes: {{train.lr: {{grid: [1.0e-3]}}}}\nsweep_dir: {tmp_path}/out\n")
    r = subprocess.run([sys.executable, str(ROOT / "sweep.py"), str(path), "--ray", f"http://127.0.0.1:{port}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: cannot reach the Ray cluster at http://127.0.0.1:{port}: "), lines
    assert not (tmp_path / "out" / "trials.json").exists()


def test_a_changed_sweep_file_is_refused_for_an_existing_sweep_dir(tmp_path):
    body = "base: tiny\naxes: {{train.lr: {{grid: [{lrs}]}}}}\nsweep_dir: {out}\n"
    spec = load_sweep(write(tmp_path, body.format(lrs="1.0e-3, 2.0e-3", out=tmp_path / "out")))
    SweepState(spec).save()
    SweepState(load_sweep(write(tmp_path, body.format(lrs="1.0e-3, 2.0e-3, 4.0e-3", out=tmp_path / "out"))))
    with pytest.raises(SweepError, match="t001 with other overrides"):
        SweepState(load_sweep(write(tmp_path, body.format(lrs="1.0e-3, 3.0e-3", out=tmp_path / "out"))))
    assert json.loads((tmp_path / "out/trials.json").read_text())["trials"][1]["status"] == "pending"


def test_error_line_prefers_train_py_error_then_the_exception(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("$ python train.py\nstep 1\nerror: mesh {'data': 3} has 3 devices but 1 are available\n")
    assert error_line(log, 2) == "error: mesh {'data': 3} has 3 devices but 1 are available"
    log.write_text("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                   "FloatingPointError: loss is nan at step 3; lower train.lr\nW0000 some warning\n")
    assert error_line(log, 1) == "FloatingPointError: loss is nan at step 3; lower train.lr"
    assert error_line(tmp_path / "missing.log", -9) == "killed by SIGKILL"
