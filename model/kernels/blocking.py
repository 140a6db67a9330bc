"""Shared blocking for the flash kernels: padding, per-block visibility ranges, default block sizes.

The kernels mask element-wise by positions and segment ids (the contract in reference.py). To skip
whole blocks without assuming anything about those positions, the wrapper reduces each block of
queries and of keys to [min, max] of its positions and segment ids. Block (i, j) can hold a
visible pair only if the segment-id ranges overlap and the position ranges allow causal / window
visibility; that test is conservative (never skips a visible pair) for any input. For each query
block the kernels then visit only the key blocks between the first and the last possibly-visible
one (and the dk/dv kernel the mirror image), so causal and sliding-window masks cost ~half / ~W/S
of the dense work, and the DMA of skipped blocks is elided by clamping the index map into range.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from model.kernels.reference import fill_masking_defaults
from sharding.hardware import tpu_generation

# Segment ids given to padded rows: never equal to each other or to a real segment id.
Q_PAD_SEGMENT = -(2 ** 31)
KV_PAD_SEGMENT = -(2 ** 31) + 1
MASK_VALUE = -1e30  # finite, so exp(MASK - MASK) never makes a NaN; masked p is zeroed anyway

# (block_q, block_kv) per TPU generation (sharding.hardware.TPU_GENERATIONS keys): big enough to
# keep the MXU busy and amortise the ~0.35 us per grid step, small enough that fwd and bwd fit the
# compiler's default scoped VMEM limit (16 MiB on v5e, 32 MiB on v5p/v6e; a compiler setting, not
# the chip's VMEM). Measured by bench/attention_tpu_aot.py (docs/results.md).
TPU_BLOCKS = {"v4": (512, 512), "v5e": (512, 512), "v5p": (512, 1024), "v6e": (512, 1024)}
GPU_BLOCKS = (64, 64)  # Triton: 64x64 tiles keep registers in check for H=128 on every NVIDIA GPU
INTERPRET_BLOCKS = (128, 128)


def default_blocks(platform: str, device_kind: str = "") -> tuple[int, int]:
    """Default (block_q, block_kv) for a platform ('tpu' | 'gpu' | 'cpu') and device kind."""
    if platform == "tpu":
        return TPU_BLOCKS.get(tpu_generation(device_kind), (512, 512))
    if platform == "gpu":
        return GPU_BLOCKS
    return INTERPRET_BLOCKS


def round_up(x: int, m: int) -> int:
    """Smallest multiple of m that is >= x."""
    return -(-x // m) * m


@dataclasses.dataclass(frozen=True)
class Blocking:
    """Static block geometry of one call: padded lengths and block counts."""
    block_q: int
    block_kv: int
    t_pad: int
    s_pad: int

    @property
    def nq(self) -> int:
        return self.t_pad // self.block_q

    @property
    def nk(self) -> int:
        return self.s_pad // self.block_kv


def make_blocking(T: int, S: int, block_q: int, block_kv: int, q_align: int = 8,
                  kv_align: int = 128) -> Blocking:
    """Clamp block sizes to the (aligned) lengths and pad T and S to whole blocks.

    q_align / kv_align are the hardware tile multiples: on TPU query blocks are sublane-dim (8)
    and key-position rows are lane-dim (128), so a short sequence still gets a legal block."""
    bq = min(block_q, round_up(T, q_align))
    bk = min(block_kv, round_up(S, kv_align))
    return Blocking(bq, bk, round_up(T, bq), round_up(S, bk))


def masking_inputs(B, T, S, q_positions, kv_positions, q_segment_ids, kv_segment_ids, blk):
    """Positions and segment ids, defaulted as in reference.py and padded to the blocking.

    Returns int32 (q_pos [B,Tp], q_seg [B,Tp], kv_pos [B,Sp], kv_seg [B,Sp]). Padded rows copy the
    last real position (so they do not widen block ranges) and get pad segment ids (never visible).
    """
    q_positions, kv_positions, q_segment_ids, kv_segment_ids = fill_masking_defaults(
        B, T, S, q_positions, kv_positions, q_segment_ids, kv_segment_ids)

    def pad(x, n, value):
        x = x.astype(jnp.int32)
        if value is None:  # edge padding
            return jnp.pad(x, ((0, 0), (0, n - x.shape[1])), mode="edge")
        return jnp.pad(x, ((0, 0), (0, n - x.shape[1])), constant_values=value)

    return (pad(q_positions, blk.t_pad, None), pad(q_segment_ids, blk.t_pad, Q_PAD_SEGMENT),
            pad(kv_positions, blk.s_pad, None), pad(kv_segment_ids, blk.s_pad, KV_PAD_SEGMENT))


def _ranges(pos, seg, block, pad_segment):
    """Per block [min, max] of positions and of (non-pad) segment ids: 4 x [B, n_blocks]."""
    B, L = pos.shape
    pos = pos.reshape(B, L // block, block)
    seg = seg.reshape(B, L // block, block)
    real = seg != pad_segment
    big, small = jnp.iinfo(jnp.int32).max, jnp.iinfo(jnp.int32).min
    return (pos.min(-1), pos.max(-1), jnp.where(real, seg, big).min(-1),
            jnp.where(real, seg, small).max(-1))


def block_visibility(q_pos, q_seg, kv_pos, kv_seg, blk: Blocking, *, causal: bool,
                     sliding_window: int) -> jax.Array:
    """Boolean [B, nq, nk]: False only where block (i, j) provably has no visible pair."""
    qp0, qp1, qs0, qs1 = _ranges(q_pos, q_seg, blk.block_q, Q_PAD_SEGMENT)
    kp0, kp1, ks0, ks1 = _ranges(kv_pos, kv_seg, blk.block_kv, KV_PAD_SEGMENT)
    qp0, qp1, qs0, qs1 = (x[:, :, None] for x in (qp0, qp1, qs0, qs1))  # [B,nq,1]
    kp0, kp1, ks0, ks1 = (x[:, None, :] for x in (kp0, kp1, ks0, ks1))  # [B,1,nk]
    vis = (qs0 <= ks1) & (ks0 <= qs1)  # segment-id ranges overlap (empty range: min > max)
    if causal:
        vis &= kp0 <= qp1
    if sliding_window:
        vis &= qp0 - kp1 < sliding_window
    return vis


def visible_span(vis: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Along the last axis of a boolean [B, X, Y]: first and last True index, flattened to [B*X].

    A row with nothing visible gets (0, -1): an empty span, so the kernel skips every block."""
    Y = vis.shape[-1]
    idx = jnp.arange(Y, dtype=jnp.int32)
    lo = jnp.where(vis, idx, Y).min(-1)
    hi = jnp.where(vis, idx, -1).max(-1)
    lo = jnp.where(hi < 0, 0, lo)
    return lo.reshape(-1).astype(jnp.int32), hi.reshape(-1).astype(jnp.int32)


def attention_flops(B, T, S, N, H, vis_fraction: float = 1.0) -> int:
    """Matmul flops of attention forward (QK^T and PV) for a CostEstimate."""
    return int(4 * B * N * T * S * H * vis_fraction)
