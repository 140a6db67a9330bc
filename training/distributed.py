"""Multi-process start-up: jax.distributed on TPU VM slices, GPU hosts, or CPU processes."""
from __future__ import annotations

import os

import jax


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Call jax.distributed.initialize when launched as several processes; True if it did.

    Explicit values (flags) win over the environment: TESSERA_COORDINATOR, TESSERA_NUM_PROCESSES,
    TESSERA_PROCESS_ID. On a multi-host TPU VM slice jax discovers everything by itself
    (TPU_WORKER_HOSTNAMES is set by the TPU runtime).
    """
    coordinator = coordinator or os.environ.get("TESSERA_COORDINATOR")
    num_processes = num_processes or _int_env("TESSERA_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _int_env("TESSERA_PROCESS_ID")
    if coordinator:
        if jax.config.jax_platforms == "cpu" or os.environ.get("JAX_PLATFORMS") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, num_processes, process_id)
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts:
        jax.distributed.initialize()
        return True
    return False


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None
