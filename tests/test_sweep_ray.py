"""Sweeps on a real Ray cluster: a head and a second node started on 127.0.0.1, trials as Ray jobs.

A 4-trial sweep runs two at a time; its driver is SIGKILLed while trials run and then rerun: the
rerun reattaches to the jobs still running, every trial runs exactly once, and each trial's
metrics equal those of the same sweep run by the local executor. A second sweep's driver gets
SIGTERM: it stops its job (train.py saves a checkpoint), and a rerun resumes the trial.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import ROOT
from test_sweep_run import TINY, corpus, env, state, sweep_cmd  # noqa: F401 (corpus is a fixture)

pytestmark = pytest.mark.slow
job_submission = pytest.importorskip("ray.job_submission")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env():
    """Each node's environment: the Python of this venv first on PATH (jobs run `python`), CPU jax."""
    return dict(env(), PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


def wait_for(what, check, timeout):
    deadline = time.time() + timeout
    while not check():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


RAY = str(Path(sys.executable).parent / "ray")
NODE = ["--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats"]


class Cluster:
    """Ray nodes started on 127.0.0.1, each with its own temp dir (as separate machines would have);
    `--block` ties each node to a process that the test can stop."""

    def __init__(self, **head_env):
        self.port, dashboard = free_port(), free_port()
        self.address = f"http://127.0.0.1:{dashboard}"
        self.nodes = []  # (process, temp dir)
        self.start(["--head", "--port", str(self.port), "--dashboard-host", "127.0.0.1", "--dashboard-port",
                    str(dashboard), "--include-dashboard", "true", "--dashboard-agent-listen-port",
                    str(free_port())], head_env)  # every node its own agent port: one machine, many nodes
        def up():
            try:
                return job_submission.JobSubmissionClient(self.address).list_jobs() is not None
            except Exception:
                return False
        wait_for("the Ray head", up, 120)

    def start(self, args, env=None) -> str:
        temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: socket paths have a length limit
        proc = subprocess.Popen([RAY, "start", *args, "--temp-dir", temp, *NODE], env=dict(ray_env(), **(env or {})),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.nodes.append((proc, temp))
        return temp

    def add_node(self, *args) -> str:
        """Another node joining the head; returns its temp dir (its name)."""
        want = self.alive() + 1
        temp = self.start(["--address", f"127.0.0.1:{self.port}", "--dashboard-agent-listen-port",
                           str(free_port()), *args])
        wait_for(f"Ray node {want}", lambda: self.alive() == want, 120)
        return temp

    def alive(self) -> int:
        out = subprocess.run([RAY, "status", "--address", f"127.0.0.1:{self.port}"], capture_output=True,
                             text=True, env=ray_env()).stdout
        return out.split("Active:", 1)[-1].split("Pending:", 1)[0].count("node_")

    def stop(self):
        for proc, _ in reversed(self.nodes):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        kill_matching([temp for _, temp in self.nodes])


def kill_matching(needles):
    """SIGKILL every process whose command line contains one of `needles` (a node's temp dir, a run dir)."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if proc.name.isdigit() and int(proc.name) != os.getpid() and any(n in cmdline for n in needles):
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except OSError:
                pass


@pytest.fixture(scope="module")
def cluster():
    """A head and a second node, one CPU each; yields the head's job API address."""
    c = Cluster()
    try:
        c.add_node()
        yield c.address
    finally:
        c.stop()


def kill_leftovers(temps):
    """Any process of this cluster still alive (found by its temp dir on the command line): SIGKILL."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if proc.name.isdigit() and any(t in cmdline for t in temps):
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except OSError:
                pass


def write_sweep(tmp, corpus, out, executor: str, steps: int = 4, axes=None) -> Path:
    overrides = {**TINY, "train.steps": steps, "data.path": str(corpus / "train"),
                 "data.val_path": str(corpus / "val")}
    axes = axes or "  train.lr: {grid: [1.0e-3, 3.0e-3]}\n  train.warmup_steps: {grid: [1, 2]}"
    lines = ["base: tiny", "overrides:"] + [f"  {k}: {v}" for k, v in overrides.items()]
    lines += ["axes:", axes, "parallel: 2", f"sweep_dir: {out}", f"executor: {executor}"]
    path = tmp / f"{out.name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock fields."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    clock = ("tokens_per_s", "tflops_per_device", "mfu", "step_time")
    return [{k: v for k, v in r.items() if k not in clock and not k.endswith("_seconds")} for r in rows]


def test_killed_driver_reattaches_and_every_trial_runs_once(cluster, corpus, tmp_path):
    local = tmp_path / "local"
    r = subprocess.run(sweep_cmd(write_sweep(tmp_path, corpus, local, "local")), capture_output=True, text=True,
                       env=env(), cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    out = tmp_path / "onray"
    path = write_sweep(tmp_path, corpus, out, f"{{kind: ray, address: '{cluster}'}}")
    client = job_submission.JobSubmissionClient(cluster)
    def status(job):
        try:
            return client.get_job_status(job).value
        except RuntimeError:  # recorded in trials.json, not submitted yet
            return None
    with open(tmp_path / "first.log", "w") as first_log:
        driver = subprocess.Popen(sweep_cmd(path), stdout=first_log, stderr=subprocess.STDOUT, env=env(), cwd=ROOT)
        def two_running():
            assert driver.poll() is None, (tmp_path / "first.log").read_text()
            jobs = [t["job"] for t in state(out).values() if t["status"] == "running"]
            return len(jobs) == 2 and all(status(j) == "RUNNING" for j in jobs)
        wait_for("two trials running on the cluster", two_running, 300)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    before = state(out)
    jobs = {tid: t["job"] for tid, t in before.items() if t["status"] == "running"}
    assert len(jobs) == 2 and all(status(j) in ("RUNNING", "SUCCEEDED") for j in jobs.values())  # outlived the driver

    rerun = subprocess.run(sweep_cmd(path), capture_output=True, text=True, env=env(), cwd=ROOT, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    for tid, job in jobs.items():
        assert f"{tid}: reattached to ray job {job}" in rerun.stderr
    after = state(out)
    assert [t["status"] for t in after.values()] == ["finished"] * 4
    assert all(t["launches"] == 1 and t["executor"] == "ray" for t in after.values()), after
    assert {tid: after[tid]["job"] for tid in jobs} == jobs  # the same jobs, followed to their end
    submitted = [j.submission_id for j in client.list_jobs() if (j.submission_id or "").startswith("onray-")]
    assert sorted(submitted) == sorted(t["job"] for t in after.values())  # one job per trial, no second launch
    for tid in after:
        log = (out / tid / "train.log").read_text()
        assert log.count(f"# ray job {after[tid]['job']}") == 1 and log.count("xz -9e") == 1  # one run's output
        assert metrics(out / tid) == metrics(local / tid), tid  # same program, same numbers
    assert (out / "results.csv").is_file() and (out / "curves.png").is_file()


def test_sigterm_stops_the_trials_on_the_cluster_and_a_rerun_resumes(cluster, corpus, tmp_path):
    out = tmp_path / "stopme"
    path = write_sweep(tmp_path, corpus, out, f"{{kind: ray, address: '{cluster}'}}", steps=400,
                       axes="  train.lr: {grid: [1.0e-3]}")
    driver = subprocess.Popen(sweep_cmd(path), stderr=subprocess.PIPE, text=True, env=env(), cwd=ROOT)
    def training():  # past the first step: train.py's SIGTERM handler is in place
        assert driver.poll() is None
        log = out / "t000" / "train.log"
        return log.exists() and "(compiled and ran the first step)" in log.read_text()
    wait_for("the trial to start training", training, 300)
    driver.send_signal(signal.SIGTERM)
    _, err = driver.communicate(timeout=300)
    assert driver.returncode == 128 + signal.SIGTERM, err[-2000:]
    trial = state(out)["t000"]
    assert trial["status"] == "interrupted", trial
    client = job_submission.JobSubmissionClient(cluster)
    assert client.get_job_status(trial["job"]).value == "STOPPED"
    assert "SIGTERM received: saving step" in (out / "t000" / "train.log").read_text()

    rerun = subprocess.run(sweep_cmd(path), capture_output=True, text=True, env=env(), cwd=ROOT, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    trial = state(out)["t000"]
    assert trial["status"] == "finished" and trial["launches"] == 2
    assert "t000 started (resuming)" in rerun.stderr


def test_a_lost_node_fails_its_trial_with_the_reason_and_retry_failed_resumes_it(corpus, tmp_path):
    """Its own cluster: a node with a `doomed` resource runs the trial and is killed outright mid-trial.
    The retry then waits for a replacement node longer than Ray lets a job wait for resources (20 s
    here): the sweep submits it again until the node is there."""
    c = Cluster(RAY_JOB_START_TIMEOUT_SECONDS="20")
    try:
        doomed = c.add_node("--resources", '{"doomed": 1}')
        out = tmp_path / "lost"
        path = write_sweep(tmp_path, corpus, out, f"{{kind: ray, address: '{c.address}', resources: {{doomed: 1}}}}",
                           steps=400, axes="  train.lr: {grid: [1.0e-3]}")
        path.write_text(path.read_text().replace("checkpoint.every: 2", "checkpoint.every: 20"))
        driver_log = open(tmp_path / "driver.log", "w")
        driver = subprocess.Popen(sweep_cmd(path), stderr=driver_log, text=True, env=env(), cwd=ROOT)
        def checkpointed():
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            ckpts = out / "t000" / "checkpoints"  # a complete one: orbax renames the step's temp dir when done
            return ckpts.is_dir() and any(p.name.isdigit() and int(p.name) > 0 for p in ckpts.iterdir())
        wait_for("a checkpoint of the trial", checkpointed, 300)
        kill_matching([doomed, f"train.run_dir={out / 't000'}"])  # the machine is gone, with its processes
        driver.wait(timeout=300)
        driver_log.close()
        err = (tmp_path / "driver.log").read_text()
        assert driver.returncode == 1, err[-3000:]
        trial = state(out)["t000"]
        assert trial["status"] == "failed" and trial["error"], trial
        assert "t000 failed" in err and trial["error"] in err

        # Ray's reason: the job's supervisor died with its node, or the trial's process was killed first
        assert "died" in trial["error"] or trial["error"].startswith("killed by SIGKILL"), trial["error"]
        wait_for("the cluster to notice the lost node", lambda: c.alive() == 1, 180)
        with open(tmp_path / "rerun.log", "w") as rerun_log:
            rerun = subprocess.Popen(sweep_cmd(path) + ["--retry-failed"], stdout=rerun_log,
                                     stderr=subprocess.STDOUT, env=env(), cwd=ROOT)
            first_job = lambda: state(out)["t000"]["job"]  # noqa: E731
            wait_for("the retry's job", lambda: "started (resuming)" in (tmp_path / "rerun.log").read_text(), 120)
            job = first_job()
            wait_for("a submission again after Ray's start timeout", lambda: first_job() != job, 120)
            c.add_node("--resources", '{"doomed": 1}')  # a replacement machine joins
            rerun.wait(timeout=600)
        printed = (tmp_path / "rerun.log").read_text()
        assert rerun.returncode == 0, printed[-3000:]
        assert f"job {job} did not get its resources (cpus 1, doomed 1) in time; submitting it again" in printed
        trial = state(out)["t000"]
        assert trial["status"] == "finished" and trial["launches"] == 2 and trial["job"] != job
        assert f"submitted again as ray job {trial['job']}" in (out / "t000" / "train.log").read_text()
        relaunched = (out / "t000" / "train.log").read_text().split("# ray job")[-1]
        first = re.search(r"step (\d+): loss \S+ \(compiled and ran the first step\)", relaunched)
        assert first and int(first.group(1)) > 20, relaunched[-2000:]  # from its last checkpoint, not step 0
    finally:
        c.stop()
