"""TPU slice names (v5p-8, v5e-4, ...) -> chip count, physical topology, HBM and peak FLOP/s.

Cloud TPU names count TensorCores: v4 and v5p have two per chip (run as one megacore device), so
v5p-8 is 4 chips; v5e and v6e have one, so their names count chips. Per-chip figures come from the
one generation table, sharding/hardware.py. The physical topology string is what libtpu's
`get_topology_desc` wants ("v5p:2x2x1"); it lets XLA compile for a slice on a host without TPUs
(see docs/compile.md).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

from configs import ConfigError
from sharding.hardware import GiB, TPU_GENERATIONS as GENERATIONS, TpuGeneration


@dataclass(frozen=True)
class Topology:
    name: str          # as the user wrote it, e.g. "v5p-8"
    generation: str    # key of GENERATIONS (also the libtpu topology prefix)
    chips: int         # per slice
    shape: tuple[int, ...]
    slices: int = 1

    @property
    def gen(self) -> TpuGeneration:
        return GENERATIONS[self.generation]

    @property
    def libtpu_name(self) -> str:
        return f"{self.generation}:" + "x".join(map(str, self.shape))

    @property
    def hbm_bytes(self) -> int:
        return self.gen.hbm_bytes

    @property
    def peak_flops(self) -> float:
        return self.gen.peak_bf16

    @property
    def n_devices(self) -> int:
        return self.chips * self.slices

    def describe(self) -> str:
        s = f" x {self.slices} slices" if self.slices > 1 else ""
        return (f"{self.name}{s}: {self.n_devices} chips ({self.libtpu_name}), "
                f"{self.hbm_bytes / GiB:.0f} GiB HBM and {self.peak_flops / 1e12:.0f} TFLOP/s bf16 per chip")


def physical_shape(chips: int, dims: int) -> tuple[int, ...] | None:
    """The slice shape Cloud TPU uses for `chips` chips, or None when no slice has that many.

    2D (v5e/v6e): 1x1, 2x2, 2x4, 4x4, 4x8, 8x8, ...  3D (v4/v5p): 2x2x1, 2x2x2, 2x2x4, 2x4x4,
    4x4x4, 4x4x8, ... Both grow by doubling the smallest dimension (the last one among equals).
    """
    if chips == 1:
        return (1,) * dims
    if chips < 4 or chips & (chips - 1):
        return None
    shape = [2, 2] + [1] * (dims - 2)
    while math.prod(shape) < chips:
        smallest = min(shape)
        i = max(j for j, s in enumerate(shape) if s == smallest)
        shape[i] *= 2
    return tuple(shape)


def parse_topology(name: str, slices: int = 1) -> Topology:
    """'v5p-8' -> Topology; a one-line ConfigError for anything that is not a Cloud TPU slice."""
    known = ", ".join(f"{g}-N" for g in GENERATIONS)
    m = re.fullmatch(rf"({'|'.join(GENERATIONS)})-(\d+)", name.strip().lower())
    if not m:
        raise ConfigError(f"unknown topology '{name}': expected one of {known} (e.g. v5p-8, v5e-4)")
    gen_name, count = m.group(1), int(m.group(2))
    gen = GENERATIONS[gen_name]
    if count % gen.tensorcores:
        raise ConfigError(f"unknown topology '{name}': {gen_name} names count TensorCores, "
                          f"{gen.tensorcores} per chip (e.g. {gen_name}-8 is 4 chips)")
    chips = count // gen.tensorcores
    shape = physical_shape(chips, gen.torus_dims)
    if shape is None:
        raise ConfigError(f"unknown topology '{name}': no {gen_name} slice has {chips} chips "
                          f"(use 1, 4, 8, 16, ... chips)")
    if slices < 1:
        raise ConfigError(f"--slices must be at least 1; got {slices}")
    return Topology(name, gen_name, chips, shape, slices)


def topology_devices(topo: Topology) -> list:
    """Compile-only TPU devices of the slice(s) from libtpu; no TPU needed on this host.

    v4 runs as megacore (one device per chip), as Cloud TPU VMs do. Multi-slice descriptions
    carry `slice_index`, which sharding.mesh uses to put the DCN axes across slices.
    """
    try:
        from jax.experimental import topologies
    except ImportError as e:  # pragma: no cover - jax always ships it
        raise ConfigError(f"this jax has no jax.experimental.topologies: {e}") from None
    # libtpu takes /tmp/libtpu_lockfile so that two processes never drive one TPU; compile-only
    # devices drive nothing, and without this a second compile (or a pytest-xdist worker) fails.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    kwargs = {"chip_config_name": "megacore"} if topo.generation == "v4" else {}
    if topo.slices > 1:
        kwargs["num_slices"] = topo.slices
    try:
        desc = topologies.get_topology_desc(topo.libtpu_name, "tpu", **kwargs)
    except Exception as e:  # libtpu missing, or a topology it rejects
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        hint = " (pip install libtpu)" if "libtpu" in first.lower() or "not found" in first.lower() else ""
        raise ConfigError(f"cannot describe TPU topology {topo.libtpu_name}: {first[:200]}{hint}") from None
    devices = list(desc.devices)
    if len(devices) != topo.n_devices:
        raise ConfigError(f"libtpu describes {len(devices)} devices for {topo.libtpu_name}, expected "
                          f"{topo.n_devices}")
    return devices


def libtpu_available() -> str | None:
    """None when libtpu can describe a TPU topology here, else the one-line reason."""
    try:
        topology_devices(parse_topology("v5e-4"))
    except ConfigError as e:
        return str(e)
    return None
