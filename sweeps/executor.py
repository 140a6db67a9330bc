"""Where a sweep's trials run: the `executor` field of a sweep file, and what every executor reports.

  executor: local                 # default: train.py subprocesses of this machine
  executor:
    kind: ray                     # one Ray job per trial, on a running Ray cluster
    address: auto                 # auto, HOST:6379, ray://HOST:10001 or http://HOST:8265
    cpus: 1                       # per trial (the job's entrypoint_num_cpus)
    gpus: 0                       # per trial
    resources: {TPU: 4}           # any other Ray resources per trial
    env: {XLA_FLAGS: ...}         # environment variables of every trial

An executor launches a trial's train.py command, polls it, stops it, and can adopt a trial that a
previous sweep process left running (so a rerun reattaches instead of launching twice). The sweep
loop in sweeps/runner.py is the same whichever executor runs the trials.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from sweeps.spec import SweepError, format_value

KINDS = ("local", "ray")
RAY_FIELDS = ("kind", "address", "cpus", "gpus", "resources", "env")


@dataclass(frozen=True)
class ExecutorSpec:
    kind: str = "local"
    address: str = "auto"
    cpus: float = 1
    gpus: float = 0
    resources: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Ended:
    """How a trial's process ended, as its executor saw it."""
    returncode: int | None        # train.py's exit code; None when it is not known (its node was lost)
    reason: str | None = None     # why, when the trial's own log cannot say (node lost, stopped on the cluster)
    stopped: bool = False         # stopped from outside the trial: resumable, not a failure


def _err(key: str, msg: str) -> SweepError:
    return SweepError(f"sweep field 'executor{'.' + key if key else ''}' {msg}")


def _number(key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise _err(key, f"expects a number >= 0, got {value!r}")
    return value


def parse_executor(raw) -> ExecutorSpec:
    """The `executor` field: `local`, `ray`, or a mapping with `kind` and the Ray options."""
    if raw is None:
        return ExecutorSpec()
    if isinstance(raw, str):
        raw = {"kind": raw}
    if not isinstance(raw, dict):
        raise _err("", f"must be local, ray, or a mapping with kind: ray; got {raw!r}")
    for key in raw:
        if key not in RAY_FIELDS:
            near = difflib.get_close_matches(str(key), RAY_FIELDS, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise _err(str(key), f"is unknown{hint}; executor has {', '.join(RAY_FIELDS)}")
    kind = raw.get("kind", "local")
    if kind not in KINDS:
        raise _err("kind", f"must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "local" and len(raw) > 1:
        extra = ", ".join(k for k in raw if k != "kind")
        raise _err(extra.split(", ")[0], f"applies to kind: ray only (the local executor takes no options: {extra})")
    address = raw.get("address", "auto")
    if not isinstance(address, str) or not address:
        raise _err("address", f"expects a Ray address such as auto or http://HOST:8265, got {address!r}")
    for key in ("resources", "env"):
        value = raw.get(key, {})
        if not isinstance(value, dict):
            raise _err(key, f"must be a mapping, got {value!r}")
    resources = {str(k): _number(f"resources.{k}", v) for k, v in raw.get("resources", {}).items()}
    for name in ("CPU", "GPU"):
        if name in resources:
            raise _err(f"resources.{name}", f"is set by executor.{name.lower()}s")
    env = {}
    for k, v in raw.get("env", {}).items():
        if isinstance(v, (dict, list)) or v is None:
            raise _err(f"env.{k}", f"expects a string, got {v!r}")
        env[str(k)] = format_value(v)  # as an override would write it: true/false, 0.9, ...
    return ExecutorSpec(kind, address, _number("cpus", raw.get("cpus", 1)), _number("gpus", raw.get("gpus", 0)),
                        resources, env)


def make_executor(spec: ExecutorSpec, sweep_name: str = "sweep"):
    """The executor object for a spec; Ray is imported only when asked for."""
    if spec.kind == "ray":
        from sweeps.ray_jobs import RayExecutor
        return RayExecutor(spec, sweep_name)
    from sweeps.local import LocalExecutor
    return LocalExecutor()
