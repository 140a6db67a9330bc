"""The launch scripts drive gcloud as documented: checked with a stand-in gcloud that records its
arguments (no cloud needed), and the SLURM example's variables are the ones jax detects."""
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "tpu_vm.sh"


def run(tmp_path, *args):
    tmp_path.mkdir(parents=True, exist_ok=True)
    log, fake = tmp_path / "gcloud.log", tmp_path / "gcloud"
    fake.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    "open(os.environ['GCLOUD_LOG'], 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    out = subprocess.run(["bash", str(SCRIPT), *args], env={**os.environ, "GCLOUD": str(fake), "GCLOUD_LOG": str(log)},
                         capture_output=True, text=True, timeout=120)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return out, calls


def test_create_run_stop_delete(tmp_path):
    out, calls = run(tmp_path, "create", "pod", "--zone", "us-east5-a", "--type", "v5p-128", "--spot")
    assert out.returncode == 0, out.stderr
    assert calls == [["compute", "tpus", "tpu-vm", "create", "pod", "--accelerator-type=v5p-128",
                      "--version=tpu-ubuntu2204-base", "--spot", "--zone=us-east5-a"]]
    out, calls = run(tmp_path / "r", "run", "pod", "--zone", "z", "--", "python", "train.py", "llama3-8b",
                     "train.run_dir=gs://b/run one")
    assert out.returncode == 0, out.stderr
    (call,) = calls
    assert call[:6] == ["compute", "tpus", "tpu-vm", "ssh", "pod", "--worker=all"]
    command = call[6].removeprefix("--command=")
    assert command.startswith("cd ~/tessera && nohup .venv/bin/python train.py llama3-8b train.run_dir=gs://b/run\\ one")
    assert "> run.log 2>&1 < /dev/null &" in command
    # The command line survives the remote shell: run it through bash with echo in place of python.
    echoed = subprocess.run(["bash", "-c", command.split("nohup ", 1)[1].split(" >", 1)[0].replace(
        ".venv/bin/python", "printf '%s|'")], capture_output=True, text=True)
    assert echoed.stdout == "train.py|llama3-8b|train.run_dir=gs://b/run one|"
    _, calls = run(tmp_path / "s", "stop", "pod", "--zone", "z")
    assert calls[0][5] == "--worker=all" and "pkill -TERM" in calls[0][6]
    _, calls = run(tmp_path / "d", "delete", "pod", "--zone", "z")
    assert calls == [["compute", "tpus", "tpu-vm", "delete", "pod", "--quiet", "--zone=z"]]


def test_setup_copies_the_checkout_and_installs_python_on_every_worker(tmp_path):
    out, calls = run(tmp_path, "setup", "pod", "--zone", "z")
    assert out.returncode == 0, out.stderr
    scp, ssh = calls
    assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"] and scp[5] == "pod:tessera.tar.gz" and "--worker=all" in scp
    assert ssh[5] == "--worker=all"
    for step in ("tar xzf ~/tessera.tar.gz", "uv python install 3.12", "uv venv", '".[tpu]"'):
        assert step in ssh[6], step


def test_bad_use_is_a_clear_error(tmp_path):
    out, calls = run(tmp_path, "create", "pod", "--zone", "z")
    assert out.returncode == 2 and "create needs --type" in out.stderr and calls == []
    out, _ = run(tmp_path, "run", "pod")
    assert out.returncode == 2 and "--zone is required" in out.stderr
    out, _ = run(tmp_path, "frobnicate", "pod", "--zone", "z")
    assert out.returncode == 2 and "scripts/tpu_vm.sh create NAME" in out.stderr


def test_slurm_example_sets_what_jax_detects():
    text = (ROOT / "scripts" / "slurm.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=8" in text and "#SBATCH --gpus-per-node=8" in text
    assert "srun --kill-on-bad-exit=1 .venv/bin/python train.py" in text
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "slurm.sbatch")]).returncode == 0
