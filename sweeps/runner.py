"""Run a sweep's trials, resumably, on an executor (local subprocesses or Ray jobs).

State lives in SWEEP_DIR/trials.json (rewritten atomically after every change): each trial's
overrides, status, return code, error line, launch count and where it runs (pid or job id). A
trial is `finished` only when its train.py exited 0 *and* its metrics.jsonl reached train.steps,
so a trial stopped by a signal (train.py saves and exits 0 then) is `interrupted` and resumes from
its checkpoint on the next run. One loop, on the main thread, launches, polls and stops trials.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import signal
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

from configs.loader import resolve_path
from store.paths import as_path, is_remote, write_atomic
from sweeps.executor import Ended
from sweeps.spec import ROOT, SweepError, SweepSpec, Trial, definition_hash, trial_config

STATE_FILE = "trials.json"
DONE = ("finished", "failed")
STOP_GRACE_S = 300  # how long a stopped trial may take to save its checkpoint


def log(msg: str) -> None:
    """A progress line on stderr."""
    print(f"[sweep] {msg}", file=sys.stderr, flush=True)


def trial_dir(spec: SweepSpec, trial: Trial):
    return spec.sweep_dir / trial.id


def local_dir(spec: SweepSpec) -> Path:
    """Where this machine keeps what cannot live in object storage (trial logs while they are
    written, the lock): the sweep directory itself, or for gs:// a folder in the temp directory."""
    if not is_remote(spec.sweep_dir):
        return Path(spec.sweep_dir)
    key = hashlib.sha256(str(spec.sweep_dir).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"tessera-sweep-{key}"


def log_dir(spec: SweepSpec, trial: Trial) -> Path:
    """The directory of a trial's train.log as it is written (copied to a gs:// run dir at the end)."""
    return local_dir(spec) / trial.id


def trial_command(spec: SweepSpec, trial: Trial, python: str = sys.executable,
                  extra: tuple[str, ...] = (), script: str | None = None) -> list[str]:
    """The train.py argv of one trial; `extra` carries sweep-level additions (shared tokenizer).

    `script`: train.py's path as the executor's machines see it, run from a copy of the checkout
    (the base preset is then given relative to the checkout too). By default train.py relative to
    the working directory when launched from the repo root, so the command is pasteable elsewhere.
    """
    base = spec.base
    if script is None:
        script = ROOT / "train.py"
        try:
            script = script.relative_to(Path.cwd())
        except ValueError:
            pass
    elif (preset := resolve_path(base).resolve()).is_relative_to(ROOT):
        base = str(preset.relative_to(ROOT))
    # Automatically prepared data goes to one place for all trials: the corpus is tokenized once
    # (keyed by tokenizer and data, so trials that change either get their own).
    cache = () if any(o.startswith("data.cache_dir=") for o in trial.overrides) else \
        (f"data.cache_dir={spec.sweep_dir / 'data_cache'}",)
    return [python, str(script), base, *trial.overrides, *extra, *cache, f"train.run_dir={trial_dir(spec, trial)}"]


# --------------------------------------------------------------------------------------- state

class SweepState:
    """trials.json: one record per trial, keyed by trial id."""

    def __init__(self, spec: SweepSpec):
        self.spec, self.path = spec, spec.sweep_dir / STATE_FILE
        self.records: dict[str, dict] = {}
        if self.path.is_file():
            try:
                saved = json.loads(self.path.read_text())
            except json.JSONDecodeError as e:
                raise SweepError(f"{self.path} is not valid JSON ({e}); delete it to restart the sweep") from None
            self.records = {r["id"]: r for r in saved.get("trials", [])}
        for trial in spec.trials:
            definition = definition_hash(trial, spec.base)
            old = self.records.get(trial.id)
            if old is not None and old.get("definition") != definition:
                raise SweepError(f"{spec.sweep_dir} holds trial {trial.id} with other overrides "
                                 f"({' '.join(old.get('overrides', []))}); the sweep file changed: "
                                 f"pass --sweep-dir NEW or delete {spec.sweep_dir}")
            if old is None:
                self.records[trial.id] = {
                    "id": trial.id, "overrides": list(trial.overrides), "values": trial.values,
                    "definition": definition, "status": "pending", "returncode": None, "error": None,
                    "launches": 0, "pid": None, "run_dir": str(trial_dir(spec, trial))}

    def __getitem__(self, trial_id: str) -> dict:
        return self.records[trial_id]

    def save(self) -> None:
        """Atomic rewrite: a kill mid-write leaves the previous file intact."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = {"sweep": str(self.spec.path), "metric": self.spec.metric, "direction": self.spec.direction,
                "trials": [self.records[t.id] for t in self.spec.trials]}
        write_atomic(self.path, json.dumps(body, indent=1).encode())


def read_state(sweep_dir) -> dict:
    """trials.json as a dict (empty when the sweep has not started)."""
    path = as_path(sweep_dir) / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


# ------------------------------------------------------------------------------- outcomes

def error_line(log_path: Path, returncode: int) -> str:
    """The line that says why a trial failed: train.py's `error:` line, else the exception line."""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    pick = next((ln for ln in reversed(lines) if ln.startswith("error:")), None)
    if pick is None:
        pick = next((ln for ln in reversed(lines) if ln.split(":")[0].endswith(("Error", "Exception"))
                     and " " not in ln.split(":")[0]), None)
    if pick is None and lines:
        pick = lines[-1]
    if returncode < 0:
        pick = f"killed by {signal.Signals(-returncode).name}" + (f"; {pick}" if pick else "")
    return (pick or f"exit code {returncode}")[:400]


def last_step(run_dir) -> int:
    """The highest step recorded in a run's metrics.jsonl (-1 without one)."""
    step = -1
    try:
        with (as_path(run_dir) / "metrics.jsonl").open() as f:
            for line in f:
                try:
                    step = max(step, int(json.loads(line).get("step", -1)))
                except (ValueError, AttributeError):
                    continue  # a line cut short by a kill
    except OSError:
        pass
    return step


class _Stop:
    """SIGTERM/SIGINT on the sweep: remember it; the loop stops its trials gracefully."""

    def __init__(self):
        self.signum = None
        self.old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.signum = signum

    def restore(self):
        for s, h in self.old.items():
            signal.signal(s, h)


# --------------------------------------------------------------------------------- the run

def _lock(spec: SweepSpec):
    """One sweep.py per sweep_dir at a time (released by the OS even if this process is killed).
    For a gs:// sweep_dir the lock is a local file: it guards against a second sweep.py on this
    machine only."""
    spec.sweep_dir.mkdir(parents=True, exist_ok=True)
    local_dir(spec).mkdir(parents=True, exist_ok=True)
    fd = open(local_dir(spec) / ".lock", "w")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SweepError(f"sweep_dir {spec.sweep_dir} is in use by another sweep.py") from None
    return fd


def run_sweep(spec: SweepSpec, executor, retry_failed: bool = False, extra: tuple[str, ...] = (),
              on_change=None, before=None) -> int:
    """Run every unfinished trial; returns 0 if all finished, 1 if some failed, 128+sig if stopped.

    `executor`: where trials run (sweeps/local.py, sweeps/ray_jobs.py); trials a killed sweep left
    running are adopted when the executor can (Ray jobs), else waited for and relaunched;
    `extra`: overrides added to every trial's command (e.g. the shared tokenizer);
    `on_change(state)`: called after each trial ends (the results table is rewritten there);
    `before()`: sweep-level preparation, run once the sweep directory is locked.
    """
    if executor.kind == "ray" and is_remote(spec.sweep_dir):
        raise SweepError(f"sweep_dir {spec.sweep_dir}: Ray jobs write their logs from the cluster's nodes, so a "
                         f"Ray sweep needs a directory every node mounts (NFS, or a gcsfuse mount of the bucket)")
    lock = _lock(spec)
    state = SweepState(spec)
    index = {t.id: i + 1 for i, t in enumerate(spec.trials)}
    n = len(spec.trials)
    running = {}
    for trial in spec.trials:
        rec = state[trial.id]
        if rec["status"] == "running" and (handle := executor.adopt(rec, _remember(state, rec))) is not None:
            running[trial.id] = (handle, trial)
            log(f"trial {index[trial.id]}/{n} {trial.id}: reattached to {rec['executor']} job {rec['job']}")
    if before:
        before()
    todo = [t for t in spec.trials if t.id not in running and
            (state[t.id]["status"] not in DONE or (retry_failed and state[t.id]["status"] == "failed"))]
    skipped = len(spec.trials) - len(todo) - len(running)
    if skipped:
        log(f"{skipped} of {n} trials already done; {len(todo) + len(running)} to run")
    # read configs once, up front
    targets = {t.id: trial_config(spec, t).train.steps for t in todo + [t for _, t in running.values()]}
    limit = spec.parallel or math.inf  # None: as many as the executor holds (one waiting at a time)
    queue, stopped_at = deque(todo), None
    stop = _Stop()
    try:
        while running or (queue and stop.signum is None):
            while (queue and len(running) < limit and stop.signum is None
                   and not any(executor.pending(h) for h, _ in running.values())):
                trial = queue.popleft()
                running[trial.id] = (_launch(spec, state, executor, trial, extra, f"trial {index[trial.id]}/{n}"),
                                     trial)
            if stop.signum is not None:
                stopped_at = stopped_at or time.time()
                for handle, _ in running.values():  # train.py checkpoints and exits; SIGKILL if it hangs
                    executor.stop(handle, force=time.time() - stopped_at > STOP_GRACE_S)
            for tid, (handle, trial) in list(running.items()):
                ended = executor.poll(handle)
                if ended is None:
                    continue
                del running[tid]
                _record_end(spec, state, trial, ended, targets[tid], f"trial {index[tid]}/{n} {tid}",
                            stop.signum is not None)
                if on_change:
                    on_change(state)
            time.sleep(executor.poll_s)
    finally:
        stop.restore()
        for handle, _ in running.values():  # only on an exception
            executor.abandon(handle)
        state.save()
        lock.close()
    if stop.signum is not None:
        log(f"{signal.Signals(stop.signum).name}: stopped; rerun the same command to resume")
        return 128 + stop.signum
    failed = [t.id for t in spec.trials if state[t.id]["status"] == "failed"]
    return 1 if failed else 0


def _remember(state: SweepState, rec: dict):
    """What an executor calls to record where a trial runs (pid, job id): saved at once."""
    def remember(fields: dict) -> None:
        rec.update(fields)
        state.save()
    return remember


def _launch(spec: SweepSpec, state: SweepState, executor, trial: Trial, extra: tuple[str, ...], label: str):
    """Start one trial; trials.json records it as running before the executor can lose track of it."""
    rec, logs = state[trial.id], log_dir(spec, trial)
    trial_dir(spec, trial).mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    cmd = trial_command(spec, trial, python=executor.python, extra=extra, script=executor.script)
    rec.update(status="running", launches=rec["launches"] + 1, started=time.time(), returncode=None, error=None)
    handle = executor.launch(trial.id, cmd, logs, _remember(state, rec))  # it saves the record
    where = f" as {rec['executor']} job {rec['job']}" if rec.get("job") else ""
    resumed = " (resuming)" if rec["launches"] > 1 else ""
    log(f"{label} {trial.id} started{resumed}{where}: {' '.join(trial.overrides)}")
    return handle


def _record_end(spec: SweepSpec, state: SweepState, trial: Trial, ended: Ended, target: int, label: str,
                stopping: bool) -> None:
    """Record how a trial ended: finished, interrupted (resumable) or failed."""
    rec = state[trial.id]
    run_dir, logs = trial_dir(spec, trial), log_dir(spec, trial)
    if is_remote(run_dir) and (logs / "train.log").is_file():  # the run dir keeps its log, as locally
        write_atomic(run_dir / "train.log", (logs / "train.log").read_bytes())
    steps = last_step(run_dir)
    rc = ended.returncode
    rec.update(returncode=rc, pid=None, ended=time.time())
    if rc == 0 and steps >= target:
        rec.update(status="finished", error=None)
        from sweeps.report import read_metrics, trial_summary
        value = trial_summary(run_dir, spec.metric)["metric"]
        shown = f"{value:.4f}"
        if value is None:  # a misspelt metric name should not go unnoticed until the table
            keys = sorted({k for row in read_metrics(run_dir) for k in row} - {"step"})
            shown = f"missing from metrics.jsonl (it has {', '.join(keys)})"
        log(f"{label} finished: {spec.metric} {shown} after {steps} steps")
    elif rc == 0 or stopping or ended.stopped:  # stopped by a signal (ours, or a preemption's): not a failure
        rec.update(status="interrupted", error=f"stopped at step {max(steps, 0)} of {target}")
        log(f"{label} interrupted at step {max(steps, 0)} of {target}; it resumes on the next run")
    else:
        error = ended.reason if rc is None else error_line(logs / "train.log", rc)
        rec.update(status="failed", error=error)
        log(f"{label} failed ({'exit code ' + str(rc) if rc is not None else 'lost'}): {rec['error']}")
    state.save()
