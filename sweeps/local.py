"""The local executor: each trial is a train.py subprocess of the sweep process.

Trials are launched and polled from the main thread (no thread pool): that keeps signal handling
simple, and lets every child carry PR_SET_DEATHSIG, which Linux ties to the thread that forked it.
If the sweep process is SIGKILLed, its children get SIGTERM, save a checkpoint and exit; the rerun
waits for them to exit, then relaunches them (they resume from their checkpoints).
"""
from __future__ import annotations

import ctypes
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from sweeps.executor import Ended
from sweeps.runner import log
from sweeps.spec import SweepError

LEFTOVER_WAIT_S = 300.0  # how long a rerun waits for a killed sweep's trials to save and exit


def die_with_parent() -> None:
    """preexec_fn: ask Linux to SIGTERM this child when the sweep process dies (even by SIGKILL)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_DEATHSIG
    except OSError:
        pass  # not Linux: children outlive a killed sweep; the rerun then waits for them


def alive(pid: int | None, run_dir: str) -> bool:
    """Is `pid` a live (non-zombie) train.py of this run_dir? Guards against pid reuse."""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z" and f"train.run_dir={run_dir}" in cmdline


@dataclass
class LocalTrial:
    proc: subprocess.Popen
    log: IO


class LocalExecutor:
    """train.py subprocesses on this machine; logs go straight to RUN_DIR/train.log."""
    kind = "local"
    python = sys.executable
    script = None  # train.py relative to the working directory when possible: pasteable commands
    poll_s = 0.2

    def adopt(self, rec: dict, remember):
        """A trial left `running` by a killed sweep cannot be adopted: wait for it to save and exit."""
        if rec.get("executor", self.kind) != self.kind:
            raise SweepError(f"trial {rec['id']} is running as {rec['executor']} job {rec.get('job')}; rerun with "
                             f"the same executor (--ray ADDRESS) or stop that job first")
        if alive(rec.get("pid"), rec["run_dir"]):
            log(f"waiting for {rec['id']} (pid {rec['pid']}) left running by a previous sweep to exit")
            deadline = time.time() + LEFTOVER_WAIT_S
            while alive(rec["pid"], rec["run_dir"]):
                if time.time() > deadline:
                    raise SweepError(f"trial {rec['id']} (pid {rec['pid']}) from a previous sweep is still "
                                     f"running; stop it before resuming the sweep")
                time.sleep(0.5)
        return None

    def launch(self, trial_id: str, cmd: list[str], log_dir: Path, remember) -> LocalTrial:
        """Start the trial, its output appended to LOG_DIR/train.log; `remember(fields)` records
        where it runs in trials.json."""
        log_file = open(log_dir / "train.log", "a")
        log_file.write(f"$ {shlex.join(cmd)}\n")
        log_file.flush()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent)
        remember({"executor": self.kind, "pid": proc.pid, "job": None})
        return LocalTrial(proc, log_file)

    def pending(self, trial: LocalTrial) -> bool:
        return False  # a subprocess starts at once

    def poll(self, trial: LocalTrial) -> Ended | None:
        rc = trial.proc.poll()
        if rc is None:
            return None
        trial.log.close()
        return Ended(rc)

    def stop(self, trial: LocalTrial, force: bool) -> None:
        """SIGTERM: train.py saves a checkpoint and exits; SIGKILL once the grace time is over."""
        if trial.proc.poll() is None:
            trial.proc.send_signal(signal.SIGKILL if force else signal.SIGTERM)

    def abandon(self, trial: LocalTrial) -> None:
        """On an exception in the sweep loop: leave no orphan process."""
        trial.proc.terminate()
        trial.proc.wait()
        trial.log.close()
