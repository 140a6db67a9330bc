"""Accelerator facts, one table each: TPU generations and the GPU peaks MFU is measured against.

Read by training/metrics.py (MFU), aot/topology.py (slice HBM and peak for compile reports) and
model/kernels/blocking.py (device kind -> generation for block sizes). Figures are per chip unless
named otherwise; VMEM is per TensorCore (jax's pallas tpu_info).
"""
from __future__ import annotations

from dataclasses import dataclass

GiB, MiB = 2 ** 30, 2 ** 20


@dataclass(frozen=True)
class TpuGeneration:
    peak_bf16: float     # dense bf16 FLOP/s per chip
    peak_int8: float     # dense int8 OP/s per chip
    hbm_bytes: int       # per chip
    vmem_bytes: int      # per TensorCore
    tensorcores: int     # per chip; v4/v5p run their two as one megacore device
    torus_dims: int      # ICI torus: 3D (v4, v5p) or 2D (v5e, v6e)


TPU_GENERATIONS = {
    "v4": TpuGeneration(275e12, 275e12, 32 * GiB, 16 * MiB, 2, 3),  # v4 runs int8 at the bf16 rate
    "v5e": TpuGeneration(197e12, 394e12, 16 * GiB, 128 * MiB, 1, 2),
    "v5p": TpuGeneration(459e12, 918e12, 95 * GiB, 64 * MiB, 2, 3),
    "v6e": TpuGeneration(918e12, 1836e12, 32 * GiB, 128 * MiB, 1, 2),
}

# Peak dense bf16 FLOP/s per GPU, matched as lower-cased substrings of jax's device_kind.
GPU_PEAK_BF16 = (("h200", 989e12), ("h100", 989e12), ("a100", 312e12), ("l4", 121e12))


def tpu_generation(device_kind: str) -> str:
    """'TPU v5 lite' / 'TPU v6e' / 'TPU v5p' / 'TPU v5' ... -> a TPU_GENERATIONS key ('' when unknown).

    v5p reports its kind as plain 'TPU v5', so every v5 that is not lite is a v5p."""
    kind = device_kind.lower()
    if "v6" in kind:
        return "v6e"
    if "v5" in kind:
        return "v5e" if ("lite" in kind or "v5e" in kind) else "v5p"
    if "v4" in kind:
        return "v4"
    return ""


def peak_flops(platform: str, device_kind: str) -> float | None:
    """Peak dense bf16 FLOP/s of one device, or None where unknown (CPU, other chips)."""
    if platform == "cpu":
        return None
    if platform == "tpu":
        gen = TPU_GENERATIONS.get(tpu_generation(device_kind))
        return gen.peak_bf16 if gen else None
    kind = device_kind.lower()
    return next((peak for name, peak in GPU_PEAK_BF16 if name in kind), None)
