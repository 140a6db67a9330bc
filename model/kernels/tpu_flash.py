"""TPU flash attention (Pallas / Mosaic): grid + BlockSpec wrappers and the custom_vjp.

Layout inside the kernels: q/o [B,N,Tp,H], k/v [B,K,Sp,H] (transposed once in the wrapper so each
block is a contiguous (rows, H) tile), positions and segment ids as [B,Tp,1] columns and [B,1,Sp]
rows. Grids:
  forward, dq: (B, N, nq, nk)        k/v block index n // G: GQA without repeating K/V in HBM
  dk/dv:       (B, K, nk, G, nq)     the G heads of a group accumulate into one dk/dv block
The last axis (or two) is the sequential reduction ("arbitrary"); the rest are "parallel" so the
two TensorCores of a v5p/v4 megacore (and multiple cores generally) split them.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from model.kernels import blocking as blk_lib
from model.kernels import tpu_flash_kernels as kern



@dataclasses.dataclass(frozen=True)
class FlashConfig:
    """Static (hashable) description of one flash call."""
    scale: float
    causal: bool
    sliding_window: int
    logit_softcap: float
    blocking: blk_lib.Blocking
    groups: int
    interpret: str  # "" compile for TPU | "tpu" TPU interpret mode | "jax" generic interpret

    @property
    def kernel_kwargs(self):
        return dict(scale=self.scale, causal=self.causal, sliding_window=self.sliding_window,
                    logit_softcap=self.logit_softcap, nq=self.blocking.nq, nk=self.blocking.nk)

    def visible_fraction(self) -> float:
        """Static guess of the fraction of blocks computed, for the CostEstimate."""
        s = self.blocking.s_pad
        frac = 0.5 if self.causal else 1.0
        if self.sliding_window:
            frac = min(frac, self.sliding_window / s + self.blocking.block_kv / s)
        return frac


def interpret_mode(interpret) -> str:
    """None -> TPU interpret mode off TPU; True/"tpu" -> TPU interpret mode (faithful: simulates
    TPU memory spaces and DMAs, but uses io callbacks, which jax.checkpoint cannot partial-eval);
    "jax" -> generic Pallas interpret (discharged to plain jnp: works under remat and scan);
    False/"" -> compile with Mosaic."""
    if interpret is None:
        return "" if jax.default_backend() == "tpu" else "tpu"
    if interpret is True:
        return "tpu"
    if interpret not in (False, "", "tpu", "jax"):
        raise ValueError(f"interpret must be None, a bool, 'tpu' or 'jax', got {interpret!r}")
    return interpret or ""


def _params(semantics, interpret: str):
    if interpret == "tpu":
        return dict(interpret=pltpu.InterpretParams())
    if interpret == "jax":
        return dict(interpret=True)
    return dict(compiler_params=pltpu.CompilerParams(dimension_semantics=semantics))


def _bytes_accessed(*reads) -> int:
    """HBM traffic of a pallas_call: sum of nbytes x passes over (operand or result, passes).

    The pipeline fetches (or writes back) a block whenever its index differs from the previous
    grid step's, so a pass count is how many grid steps move to a new block, times the block
    size, over the array size."""
    return int(sum(x.size * jnp.dtype(x.dtype).itemsize * n for x, n in reads))


def _stat(q):
    """The [B,N,Tp,1] float32 per-query-row statistic (lse, di) of a [B,N,Tp,H] q."""
    return jax.ShapeDtypeStruct(q.shape[:-1] + (1,), jnp.float32)


def _query_major_reads(cfg: FlashConfig, q, k, v, q_pos, q_seg, kv_pos, kv_seg) -> list:
    """(array, passes) read from HBM for k, v and the masks on the (B, N, nq, nk) grid of the
    forward and dq kernels (_query_major_specs).

    Per (b, n, i): the query-row masks once (shared by heads, so once in all when nq == 1), then
    the visible key blocks of kv head n // G (frac * nk of them, the static guess) with their
    key-row masks. That is repeated for every query head, so K and V, which hold kv heads, are
    read G * nq * frac times over. With nk == 1 a K/V block index changes only with b and the kv
    head: one pass."""
    b_, G, N = cfg.blocking, cfg.groups, q.shape[1]
    frac = cfg.visible_fraction()
    kv = G * b_.nq * frac if b_.nk > 1 else 1
    kv_rows = N * b_.nq * frac if b_.nk > 1 else 1
    q_rows = N if b_.nq > 1 else 1
    return [(k, kv), (v, kv), (q_pos, q_rows), (q_seg, q_rows), (kv_pos, kv_rows), (kv_seg, kv_rows)]


def _clamp(x, lo, hi):
    """Index of a block inside [lo, hi]; an empty span (hi < lo) maps to lo."""
    return jnp.maximum(jnp.minimum(x, hi), lo)


def _query_major_specs(cfg: FlashConfig, H: int):
    """BlockSpecs of the (B, N, query block i, key block j) grid shared by forward and dq: key
    blocks are clamped to each query block's visible span, so skipped blocks are never fetched.
    Returns (q [bq,H], kv [bk,H], query column [bq,1], key row [1,bk], per-query row [bq,1])."""
    b_, G = cfg.blocking, cfg.groups
    bq, bk, nq = b_.block_q, b_.block_kv, b_.nq

    def kv_j(b, i, j, lo, hi):
        return _clamp(j, lo[b * nq + i], hi[b * nq + i])

    q_spec = pl.BlockSpec((None, None, bq, H), lambda b, n, i, j, lo, hi: (b, n, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, H),
                           lambda b, n, i, j, lo, hi: (b, lax.div(n, G), kv_j(b, i, j, lo, hi), 0))
    qcol = pl.BlockSpec((None, bq, 1), lambda b, n, i, j, lo, hi: (b, i, 0))
    kvrow = pl.BlockSpec((None, 1, bk), lambda b, n, i, j, lo, hi: (b, 0, kv_j(b, i, j, lo, hi)))
    row_spec = pl.BlockSpec((None, None, bq, 1), lambda b, n, i, j, lo, hi: (b, n, i, 0))
    return q_spec, kv_spec, qcol, kvrow, row_spec


def _fwd_call(cfg: FlashConfig, spans, q_pos, q_seg, kv_pos, kv_seg, q, k, v):
    B, N, Tp, H = q.shape
    b_ = cfg.blocking
    bq, nq = b_.block_q, b_.nq
    lo, hi = spans
    q_spec, kv_spec, qcol, kvrow, lse_spec = _query_major_specs(cfg, H)
    frac = cfg.visible_fraction()
    # q read and o written once per (b, n, i) (index constant along j), lse written with o.
    cost = pl.CostEstimate(
        flops=blk_lib.attention_flops(B, Tp, b_.s_pad, N, H, frac),
        transcendentals=int(B * N * Tp * b_.s_pad * frac),
        bytes_accessed=_bytes_accessed((q, 2), (_stat(q), 1),
                                       *_query_major_reads(cfg, q, k, v, q_pos, q_seg, kv_pos, kv_seg)))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(B, N, nq, b_.nk),
        in_specs=[qcol, qcol, kvrow, kvrow, q_spec, kv_spec, kv_spec],
        out_specs=[q_spec, lse_spec],
        scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                        pltpu.VMEM((bq, H), jnp.float32)])
    return pl.pallas_call(
        functools.partial(kern.fwd_kernel, **cfg.kernel_kwargs),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((B, N, Tp, 1), jnp.float32)],
        cost_estimate=cost, name="tessera_flash_fwd",
        **_params(("parallel", "parallel", "parallel", "arbitrary"), cfg.interpret),
    )(lo, hi, q_pos, q_seg, kv_pos, kv_seg, q, k, v)


def _dq_call(cfg: FlashConfig, spans, q_pos, q_seg, kv_pos, kv_seg, q, k, v, do, lse, di):
    B, N, Tp, H = q.shape
    b_ = cfg.blocking
    bq, nq = b_.block_q, b_.nq
    lo, hi = spans
    q_spec, kv_spec, qcol, kvrow, row_spec = _query_major_specs(cfg, H)
    frac = cfg.visible_fraction()
    # The forward's grid: q, do, lse, di read and dq written once per (b, n, i).
    cost = pl.CostEstimate(
        flops=int(1.5 * blk_lib.attention_flops(B, Tp, b_.s_pad, N, H, frac)),
        transcendentals=int(B * N * Tp * b_.s_pad * frac),
        bytes_accessed=_bytes_accessed((q, 2), (do, 1), (lse, 1), (di, 1),
                                       *_query_major_reads(cfg, q, k, v, q_pos, q_seg, kv_pos, kv_seg)))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(B, N, nq, b_.nk),
        in_specs=[qcol, qcol, kvrow, kvrow, q_spec, kv_spec, kv_spec, q_spec, row_spec,
                  row_spec],
        out_specs=q_spec,
        scratch_shapes=[pltpu.VMEM((bq, H), jnp.float32)])
    return pl.pallas_call(
        functools.partial(kern.dq_kernel, **cfg.kernel_kwargs),
        grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        cost_estimate=cost, name="tessera_flash_dq",
        **_params(("parallel", "parallel", "parallel", "arbitrary"), cfg.interpret),
    )(lo, hi, q_pos, q_seg, kv_pos, kv_seg, q, k, v, do, lse, di)


def _dkv_call(cfg: FlashConfig, spans_t, q_pos, q_seg, kv_pos, kv_seg, q, k, v, do, lse, di):
    B, N, Tp, H = q.shape
    K = k.shape[1]
    b_, G = cfg.blocking, cfg.groups
    bq, bk, nk = b_.block_q, b_.block_kv, b_.nk
    lo, hi = spans_t  # per key block: span of query blocks

    def q_i(b, j, i, lo, hi):
        return _clamp(i, lo[b * nk + j], hi[b * nk + j])

    q_spec = pl.BlockSpec((None, None, bq, H),
                          lambda b, h, j, g, i, lo, hi: (b, h * G + g, q_i(b, j, i, lo, hi), 0))
    row_spec = pl.BlockSpec((None, None, bq, 1),
                            lambda b, h, j, g, i, lo, hi: (b, h * G + g, q_i(b, j, i, lo, hi), 0))
    kv_spec = pl.BlockSpec((None, None, bk, H), lambda b, h, j, g, i, lo, hi: (b, h, j, 0))
    qcol = pl.BlockSpec((None, bq, 1), lambda b, h, j, g, i, lo, hi: (b, q_i(b, j, i, lo, hi), 0))
    kvrow = pl.BlockSpec((None, 1, bk), lambda b, h, j, g, i, lo, hi: (b, 0, j))
    frac = cfg.visible_fraction()
    # Grid (B, K, nk, G, nq): k/v read and dk/dv written once per (b, h, j), the key-row masks
    # too (shared by heads: once in all when nk == 1). For each key block j every query head of
    # the group reads its visible query blocks of q, do, lse, di and the query-row masks: nk * frac
    # passes over those per-head arrays, N * nk * frac over the masks. With nq == 1 the query
    # block index changes only with the head: nk passes (one when G == 1), the masks once.
    if b_.nq > 1:
        q_passes, q_rows = nk * frac, N * nk * frac
    else:
        q_passes, q_rows = (nk if G > 1 else 1), 1
    kv_rows = K if nk > 1 else 1
    cost = pl.CostEstimate(
        flops=int(2 * blk_lib.attention_flops(B, Tp, b_.s_pad, N, H, frac)),
        transcendentals=int(B * N * Tp * b_.s_pad * frac),
        bytes_accessed=_bytes_accessed((k, 2), (v, 2), (q, q_passes), (do, q_passes), (lse, q_passes),
                                       (di, q_passes), (q_pos, q_rows), (q_seg, q_rows),
                                       (kv_pos, kv_rows), (kv_seg, kv_rows)))
    kw = dict(cfg.kernel_kwargs, groups=G)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(B, K, nk, G, b_.nq),
        in_specs=[qcol, qcol, kvrow, kvrow, q_spec, kv_spec, kv_spec, q_spec, row_spec,
                  row_spec],
        out_specs=[kv_spec, kv_spec],
        scratch_shapes=[pltpu.VMEM((bk, H), jnp.float32), pltpu.VMEM((bk, H), jnp.float32)])
    return pl.pallas_call(
        functools.partial(kern.dkv_kernel, **kw),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        cost_estimate=cost, name="tessera_flash_dkv",
        **_params(("parallel", "parallel", "parallel", "arbitrary", "arbitrary"), cfg.interpret),
    )(lo, hi, q_pos, q_seg, kv_pos, kv_seg, q, k, v, do, lse, di)


def _spans(cfg: FlashConfig, q_pos, q_seg, kv_pos, kv_seg):
    """(lo, hi) of key blocks per query block and of query blocks per key block."""
    vis = blk_lib.block_visibility(q_pos, q_seg, kv_pos, kv_seg, cfg.blocking, causal=cfg.causal,
                                   sliding_window=cfg.sliding_window)            # [B,nq,nk]
    return blk_lib.visible_span(vis), blk_lib.visible_span(jnp.swapaxes(vis, 1, 2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _flash(q, k, v, q_pos, q_seg, kv_pos, kv_seg, cfg):
    out, _ = _flash_fwd(q, k, v, q_pos, q_seg, kv_pos, kv_seg, cfg)
    return out


def _flash_fwd(q, k, v, q_pos, q_seg, kv_pos, kv_seg, cfg):
    spans, _ = _spans(cfg, q_pos, q_seg, kv_pos, kv_seg)
    cols = (q_pos[:, :, None], q_seg[:, :, None], kv_pos[:, None, :], kv_seg[:, None, :])
    o, lse = _fwd_call(cfg, spans, *cols, q, k, v)
    return o, (q, k, v, q_pos, q_seg, kv_pos, kv_seg, o, lse)


def _flash_bwd(cfg, res, do):
    q, k, v, q_pos, q_seg, kv_pos, kv_seg, o, lse = res
    spans, spans_t = _spans(cfg, q_pos, q_seg, kv_pos, kv_seg)
    cols = (q_pos[:, :, None], q_seg[:, :, None], kv_pos[:, None, :], kv_seg[:, None, :])
    di = kern.softmax_residual(o, do)                                            # [B,N,Tp,1]
    dq = _dq_call(cfg, spans, *cols, q, k, v, do, lse, di)
    dk, dv = _dkv_call(cfg, spans_t, *cols, q, k, v, do, lse, di)
    return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, *, q_segment_ids=None, kv_segment_ids=None, q_positions=None,
                    kv_positions=None, causal: bool = True, sliding_window: int = 0,
                    logit_softcap: float = 0.0, scale: float | None = None, block_q: int = 0,
                    block_kv: int = 0, interpret: bool | str | None = None,
                    device_kind: str | None = None) -> jax.Array:
    """TPU flash attention, differentiable; same arguments and masking rule as reference.py.

    q [B,T,N,H], k/v [B,S,K,H] -> [B,T,N,H]. block_q/block_kv 0 = per-generation default.
    interpret: see interpret_mode (None = TPU interpret mode unless on a TPU). device_kind picks the defaults
    when compiling ahead of time for a topology (default: the first device's kind)."""
    B, T, N, H = q.shape
    _, S, K, _ = k.shape
    interpret = interpret_mode(interpret)
    if device_kind is None:
        device_kind = jax.devices()[0].device_kind
    dq_, dk_ = blk_lib.default_blocks("cpu" if interpret else "tpu", device_kind)
    blocking = blk_lib.make_blocking(T, S, block_q or dq_, block_kv or dk_)
    cfg = FlashConfig(scale=float(H ** -0.5 if scale is None else scale), causal=causal,
                      sliding_window=int(sliding_window), logit_softcap=float(logit_softcap),
                      blocking=blocking, groups=N // K, interpret=interpret)
    masks = blk_lib.masking_inputs(B, T, S, q_positions, kv_positions, q_segment_ids,
                                   kv_segment_ids, blocking)
    qt = jnp.pad(q.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, blocking.t_pad - T), (0, 0)))
    kt = jnp.pad(k.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, blocking.s_pad - S), (0, 0)))
    vt = jnp.pad(v.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, blocking.s_pad - S), (0, 0)))
    o = _flash(qt, kt, vt, *masks, cfg)                                          # [B,N,Tp,H]
    return o[:, :, :T].transpose(0, 2, 1, 3)                                     # [B,T,N,H]
