"""Multi-process start-up: jax.distributed on TPU VM slices, SLURM / Open MPI / Kubernetes jobs,
or processes launched by hand (CPU tests).

Explicit values win: flags (--coordinator, --num-processes, --process-id), then TESSERA_COORDINATOR,
TESSERA_NUM_PROCESSES, TESSERA_PROCESS_ID. Otherwise jax's own cluster detection decides: on a
multi-host Cloud TPU VM slice (metadata server), GKE, a SLURM job step, an Open MPI launch, it
finds the coordinator and process ids by itself, and start-up initializes whenever it reports more
than one process. A single process initializes nothing.
"""
from __future__ import annotations

import os
import socket
import sys
import time

import jax

from configs import ConfigError

DEFAULT_TIMEOUT = 300  # seconds to wait for every process to reach the coordinator


class DistributedError(ConfigError):
    """The processes of a multi-process job could not find each other (one line, exit 2)."""


def detect_cluster():
    """jax's ClusterEnv for the launcher's environment found here (TPU VM metadata, GKE, SLURM,
    Open MPI, Kubernetes), or None."""
    try:
        from jax._src.clusters import ClusterEnv  # jax's detection; not public API, hence the guard
    except ImportError:
        return None
    for env in ClusterEnv._cluster_types:
        if getattr(env, "opt_in_only_method", False):
            continue
        try:
            if env.is_env_present():
                return env
        except Exception:  # an environment that cannot answer (no metadata server...) is not ours
            continue
    return None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout: int | None = None) -> bool:
    """Call jax.distributed.initialize when launched as several processes; True if it did.

    Every process but 0 first waits (up to `timeout`, TESSERA_INIT_TIMEOUT, default 300 s) for the
    coordinator's port to answer, and raises DistributedError naming both when it does not: jax
    itself would abort the process with a stack trace.
    """
    coordinator = coordinator or os.environ.get("TESSERA_COORDINATOR")
    num_processes = num_processes or _int_env("TESSERA_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _int_env("TESSERA_PROCESS_ID")
    timeout = timeout or _int_env("TESSERA_INIT_TIMEOUT") or DEFAULT_TIMEOUT
    address, pid = coordinator, process_id
    if not coordinator:
        env = detect_cluster()
        if env is None or env.get_process_count() <= 1:
            return False
        address = env.get_coordinator_address(timeout, os.environ.get("JAX_COORDINATOR_PORT"))
        pid = env.get_process_id()
    if jax.config.jax_platforms == "cpu" or os.environ.get("JAX_PLATFORMS") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if pid:
        wait_for_coordinator(address, timeout, pid)
    print(f"[distributed] process {pid}: joining {address} (timeout {timeout}s)", file=sys.stderr, flush=True)
    jax.distributed.initialize(coordinator, num_processes, process_id, initialization_timeout=timeout)
    return True


def wait_for_coordinator(address: str, timeout: float, process_id) -> None:
    """Block until HOST:PORT accepts a connection; DistributedError after `timeout` seconds."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise DistributedError(f"process {process_id} could not reach the coordinator {address} within "
                                       f"{timeout:.0f}s ({e.strerror or e}); is process 0 running? "
                                       f"(TESSERA_INIT_TIMEOUT sets the wait)") from None
            time.sleep(1)


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None
