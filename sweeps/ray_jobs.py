"""The Ray executor: each trial is a Ray job on a running cluster (the `ray job submit` API).

A job runs the trial's train.py command on whichever node has the resources it asks for (CPUs,
GPUs, TPU chips), with this checkout uploaded as its working directory; so every node needs the
project's dependencies in the Python that started Ray, and the sweep directory on storage every
node and this machine see at the same path (a shared filesystem; see docs/sweeps.md).

Jobs outlive the sweep process: trials.json records each trial's job id before the job is
submitted, so a rerun after the sweep process died reattaches to the jobs still running and
collects the ones that ended meanwhile, instead of launching them twice. SIGTERM to the sweep
stops its jobs (Ray sends SIGTERM: train.py saves a checkpoint; SIGKILL after STOP_GRACE_S).
Each job appends train.py's output to RUN_DIR/train.log itself, on the shared storage, so the log
has no gap while the sweep process is away (Ray's job-log API cannot reach every node's agent in
all layouts, e.g. two nodes on one machine).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shlex
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from sweeps.executor import Ended, ExecutorSpec
from sweeps.runner import STOP_GRACE_S, log
from sweeps.spec import ROOT, SweepError

PENDING_NOTE_S = 60      # say so once when a job has waited this long for its resources
UNREACHABLE_S = 300      # how long the job API may fail before the sweep gives up (the jobs keep running)
INSTALL_HINT = "pip install \".[ray]\" (see docs/sweeps.md)"


def _resources(spec: ExecutorSpec) -> dict:
    """The submit_job keywords that place one trial."""
    return {"entrypoint_num_cpus": spec.cpus, "entrypoint_num_gpus": spec.gpus,
            "entrypoint_resources": dict(spec.resources) or None}


def runtime_env(spec: ExecutorSpec) -> dict:
    """The checkout as each job's working directory (.gitignore'd files stay behind), and the trial env."""
    # RAY_JOB_STOP_WAIT_TIME_S: Ray's wait between the stop SIGTERM and SIGKILL, time to save a checkpoint
    env = {"PYTHONUNBUFFERED": "1", "RAY_JOB_STOP_WAIT_TIME_S": str(STOP_GRACE_S), **spec.env}
    return {"working_dir": str(ROOT), "env_vars": env}


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def entrypoint(cmd: list[str], run_dir: Path) -> str:
    """The job's shell command: train.py, its output appended to RUN_DIR/train.log on the shared storage."""
    return f"{shlex.join(cmd)} >> {shlex.quote(str(Path(run_dir) / 'train.log'))} 2>&1"


def submit_command(spec: ExecutorSpec, cmd: list[str], run_dir: Path) -> str:
    """The `ray job submit` command line that launches one trial as the sweep does (for --dry-run)."""
    flags = ["--address", spec.address, "--working-dir", str(ROOT), "--entrypoint-num-cpus", str(spec.cpus)]
    if spec.gpus:
        flags += ["--entrypoint-num-gpus", str(spec.gpus)]
    if spec.resources:
        flags += ["--entrypoint-resources", json.dumps(spec.resources)]
    flags += ["--runtime-env-json", json.dumps({"env_vars": runtime_env(spec)["env_vars"]})]
    return shlex.join(["ray", "job", "submit", *flags, "--", entrypoint(cmd, run_dir)])


@dataclass
class RayTrial:
    job: str
    remember: object              # updates this trial's record in trials.json
    log_path: Path                # RUN_DIR/train.log, which the job appends to
    status: str = "PENDING"
    stop_sent: bool = False
    since: float = 0.0
    noted: bool = False


class RayExecutor:
    """Trials as Ray jobs, submitted through the cluster's job API."""
    kind = "ray"
    python = "python"    # the Python on each node's PATH when Ray was started there
    script = "train.py"  # relative to the uploaded checkout
    poll_s = 1.0

    def __init__(self, spec: ExecutorSpec, sweep_name: str = "sweep"):
        try:
            from ray.job_submission import JobSubmissionClient
        except ImportError:
            raise SweepError(f"the ray executor needs Ray on this machine: {INSTALL_HINT}") from None
        self.spec = spec
        self.prefix = re.sub(r"[^A-Za-z0-9_-]", "-", sweep_name)
        # Ray lets RAY_ADDRESS override any address it is given; an address named here wins instead.
        hidden = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
                  if spec.address != "auto" and k in os.environ}
        try:
            self.client = JobSubmissionClient(None if spec.address == "auto" else spec.address)
            self.client.list_jobs()  # fails fast when the address is wrong or the cluster is down
        except Exception as e:  # ConnectionError, or RuntimeError from the HTTP layer
            raise SweepError(f"cannot reach the Ray cluster at {spec.address}: {_first_line(e)}") from None
        finally:
            os.environ.update(hidden)
        self.address = self.client.get_address()
        self.last_ok, self.warned = time.time(), False
        for name in list(logging.root.manager.loggerDict):  # packaging notes would drown the sweep's lines
            if name.startswith("ray"):
                logging.getLogger(name).setLevel(logging.ERROR)

    # ------------------------------------------------------------------------------ launching

    def launch(self, trial_id: str, cmd: list[str], run_dir: Path, remember) -> RayTrial:
        """Submit the trial as a job that appends its output to RUN_DIR/train.log (the runner's log
        dir: a Ray sweep directory is on storage every node mounts). The job id is recorded in
        trials.json before submitting: a crash between the two cannot run a trial twice."""
        log_path = run_dir / "train.log"
        job = f"{self.prefix}-{trial_id}-{uuid.uuid4().hex[:8]}"
        with open(log_path, "a") as f:
            f.write(f"$ {shlex.join(cmd)}  # ray job {job}\n")
        remember({"executor": self.kind, "job": job, "pid": None})
        self._submit(job, entrypoint(cmd, run_dir))
        return RayTrial(job, remember, log_path, since=time.time())

    def _submit(self, job: str, entrypoint: str) -> None:
        """Submit under our job id; an answer lost on the way is safe to retry (the id is taken once)."""
        first_try, said = time.time(), False
        while True:
            try:
                self.client.submit_job(entrypoint=entrypoint, submission_id=job, runtime_env=runtime_env(self.spec),
                                       **_resources(self.spec))
                return
            except Exception as e:
                why = _first_line(e)
                if "already exists" in why:  # an earlier try got through
                    return
                # a head node still starting ("no available agent ... try again later") or a lost connection
                transient = isinstance(e, OSError) or any(m in why for m in (" 500", " 503", "try again"))
                if not transient or time.time() - first_try > UNREACHABLE_S:
                    raise SweepError(f"submitting job {job} to the Ray cluster at {self.address} failed: {why}; "
                                     f"rerun to try again") from None
                if not said:
                    log(f"the Ray cluster at {self.address} did not take job {job} yet ({why}); retrying")
                    said = True
                time.sleep(5)

    def _job_info(self, job: str):
        """The job's JobDetails, or None when the cluster does not know it (other failures raise)."""
        try:
            return self.client.get_job_info(job)
        except RuntimeError as e:
            if "404" in str(e) or "does not exist" in str(e):
                return None
            raise

    def _unreachable(self, e: Exception) -> None:
        """Ride out a hiccup of the job API (the jobs run on regardless); give up after UNREACHABLE_S."""
        if time.time() - self.last_ok > UNREACHABLE_S:
            raise SweepError(f"lost the Ray cluster at {self.address} for {UNREACHABLE_S} s: {_first_line(e)}; "
                             f"its jobs may still run: rerun the sweep to follow them") from None
        if not self.warned:
            log(f"the Ray cluster at {self.address} did not answer ({_first_line(e)}); retrying")
            self.warned = True

    def adopt(self, rec: dict, remember):
        """A job a previous sweep process submitted: follow it again (None when the cluster never ran it)."""
        if rec.get("executor") != self.kind:
            from sweeps.local import LocalExecutor
            return LocalExecutor().adopt(rec, remember)  # a local trial: wait for it to exit, then relaunch
        info = self._job_info(rec["job"])
        if info is None:  # submitted never (the sweep was killed in between), or to a cluster since restarted
            return None
        return RayTrial(rec["job"], remember, Path(rec["run_dir"]) / "train.log", status=info.status.value,
                        since=time.time())

    # ------------------------------------------------------------------------------ following

    def pending(self, handle: RayTrial) -> bool:
        return handle.status == "PENDING"

    def poll(self, handle: RayTrial) -> Ended | None:
        try:
            info = self._job_info(handle.job)
        except Exception as e:  # ConnectionError, HTTP 5xx: the job's state is unknown, not ended
            self._unreachable(e)
            return None
        self.last_ok, self.warned = time.time(), False
        if info is None:
            return Ended(None, f"the Ray cluster no longer knows job {handle.job} (restarted?)", stopped=True)
        handle.status = info.status.value
        if handle.status in ("PENDING", "RUNNING"):
            if handle.status == "PENDING" and not handle.noted and time.time() - handle.since > PENDING_NOTE_S:
                log(f"job {handle.job} waits for its resources ({self._asks()}) on the cluster")
                handle.noted = True
            return None
        if handle.status == "STOPPED":
            return Ended(info.driver_exit_code, "stopped on the Ray cluster", stopped=True)
        timed_out = str(getattr(info, "error_type", "") or "").endswith("START_TIMEOUT") or \
            "failed to start within" in (info.message or "")
        if handle.status == "FAILED" and timed_out and info.driver_node_id is None and not handle.stop_sent:
            # Ray gives up on a job that waited too long for resources (RAY_JOB_START_TIMEOUT_SECONDS).
            # It never ran on any node (no driver node), so it goes back in line under a new job id.
            log(f"job {handle.job} did not get its resources ({self._asks()}) in time; submitting it again")
            handle.job = f"{handle.job.rsplit('-', 1)[0]}-{uuid.uuid4().hex[:8]}"
            handle.status, handle.since, handle.noted = "PENDING", time.time(), False
            handle.remember({"job": handle.job})
            with open(handle.log_path, "a") as f:
                f.write(f"# not started in time: submitted again as ray job {handle.job}\n")
            self._submit(handle.job, info.entrypoint)
            return None
        if handle.status == "SUCCEEDED":
            return Ended(0)
        why = (info.message or "").strip().splitlines() or ["no reason given"]
        return Ended(info.driver_exit_code, f"ray job {handle.job} failed: {why[0]}"[:400])

    def _asks(self) -> str:
        s = self.spec
        asks = [f"cpus {s.cpus:g}"] + ([f"gpus {s.gpus:g}"] if s.gpus else [])
        return ", ".join(asks + [f"{k} {v:g}" for k, v in s.resources.items()])

    # ------------------------------------------------------------------------------ stopping

    def stop(self, handle: RayTrial, force: bool) -> None:
        """Ask Ray once: it sends SIGTERM, and SIGKILL after STOP_GRACE_S (set in each job's env)."""
        if not handle.stop_sent:
            try:
                self.client.stop_job(handle.job)
                handle.stop_sent = True
            except Exception as e:  # asked again on the next round
                self._unreachable(e)

    def abandon(self, handle: RayTrial) -> None:
        """On an exception in the sweep loop: the job keeps running; the rerun reattaches to it."""
        log(f"job {handle.job} left running on the cluster; rerun the sweep to follow it again")
