"""GPU flash attention (Pallas, Triton lowering): grid + BlockSpec wrappers and the custom_vjp.

Layout as on TPU: q/o [B,N,Tp,H], k/v [B,K,Sp,H]; positions / segment ids [B,Tp] and [B,Sp];
per-block visible spans [B,nq] (and [B,nk] for dk/dv) from blocking.py. Grids:
  forward, dq: (B, N, nq)  a program holds one query block, loops over key blocks; K/V of head
                           n come from kv head n // G (no repeat in HBM)
  dk/dv:       (B, K, nk)  a program holds one key block, loops over the G heads x query blocks
Triton needs power-of-two tiles: block sizes and H are rounded up to powers of two (H padded with
zeros, which changes no logit). Runs on every NVIDIA GPU that the Triton backend supports.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from model.kernels import blocking as blk_lib
from model.kernels import gpu_flash_kernels as kern
from model.kernels.tpu_flash_kernels import softmax_residual


def _compiler_params(num_warps: int, num_stages: int):
    """Triton compiler params (imported late: the Triton backend loads only on this path)."""
    from jax.experimental.pallas import triton as plgpu
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def next_pow2(x: int) -> int:
    """Smallest power of two >= x."""
    return 1 << max(int(x) - 1, 0).bit_length()


@dataclasses.dataclass(frozen=True)
class GpuFlashConfig:
    """Static (hashable) description of one GPU flash call."""
    scale: float
    causal: bool
    sliding_window: int
    logit_softcap: float
    blocking: blk_lib.Blocking
    groups: int
    interpret: bool

    def kw(self):
        return dict(scale=self.scale, causal=self.causal, sliding_window=self.sliding_window,
                    logit_softcap=self.logit_softcap)

    def frac(self) -> float:
        """Static guess of the visible fraction, for the CostEstimate."""
        return 0.5 if self.causal else 1.0


def _extra(cfg, num_warps, num_stages):
    if cfg.interpret:
        return dict(interpret=True)
    return dict(compiler_params=_compiler_params(num_warps, num_stages))


def _query_major_specs(cfg, H: int):
    """BlockSpecs of the (B, N, query block) grid shared by forward and dq; each program sees the
    whole padded key range and loops over it. Returns (span, q, kv, query row, key row, row)."""
    b_, G = cfg.blocking, cfg.groups
    bq, Sp = b_.block_q, b_.s_pad
    span = pl.BlockSpec((None, 1), lambda b, n, i: (b, i))
    q_spec = pl.BlockSpec((None, None, bq, H), lambda b, n, i: (b, n, i, 0))
    kv_spec = pl.BlockSpec((None, None, Sp, H), lambda b, n, i: (b, lax.div(n, G), 0, 0))
    qrow = pl.BlockSpec((None, bq), lambda b, n, i: (b, i))
    kvrow = pl.BlockSpec((None, Sp), lambda b, n, i: (b, 0))
    row = pl.BlockSpec((None, None, bq), lambda b, n, i: (b, n, i))
    return span, q_spec, kv_spec, qrow, kvrow, row


def _fwd_call(cfg, spans, q_pos, q_seg, kv_pos, kv_seg, q, k, v):
    B, N, Tp, H = q.shape
    b_ = cfg.blocking
    Sp = b_.s_pad
    span, q_spec, kv_spec, qrow, kvrow, row = _query_major_specs(cfg, H)
    f = cfg.frac()
    cost = pl.CostEstimate(flops=blk_lib.attention_flops(B, Tp, Sp, N, H, f),
                           transcendentals=int(B * N * Tp * Sp * f),
                           bytes_accessed=int(q.dtype.itemsize * (2 * q.size + (k.size + v.size)
                                                                  * b_.nq * f)))
    return pl.pallas_call(
        functools.partial(kern.fwd_kernel, block_kv=b_.block_kv, **cfg.kw()),
        grid=(B, N, b_.nq),
        in_specs=[span, span, qrow, qrow, kvrow, kvrow, q_spec, kv_spec, kv_spec],
        out_specs=[q_spec, row],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((B, N, Tp), jnp.float32)],
        cost_estimate=cost, name="tessera_gpu_flash_fwd",
        **_extra(cfg, 4 if H <= 64 else 8, 2),
    )(*spans, q_pos, q_seg, kv_pos, kv_seg, q, k, v)


def _dq_call(cfg, spans, q_pos, q_seg, kv_pos, kv_seg, q, k, v, do, lse, di):
    B, N, Tp, H = q.shape
    b_ = cfg.blocking
    Sp = b_.s_pad
    span, q_spec, kv_spec, qrow, kvrow, row = _query_major_specs(cfg, H)
    f = cfg.frac()
    cost = pl.CostEstimate(flops=int(1.5 * blk_lib.attention_flops(B, Tp, Sp, N, H, f)),
                           transcendentals=int(B * N * Tp * Sp * f),
                           bytes_accessed=int(q.dtype.itemsize * (3 * q.size + (k.size + v.size)
                                                                  * b_.nq * f)))
    return pl.pallas_call(
        functools.partial(kern.dq_kernel, block_kv=b_.block_kv, **cfg.kw()),
        grid=(B, N, b_.nq),
        in_specs=[span, span, qrow, qrow, kvrow, kvrow, q_spec, kv_spec, kv_spec, q_spec, row,
                  row],
        out_specs=q_spec, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        cost_estimate=cost, name="tessera_gpu_flash_dq",
        **_extra(cfg, 4 if H <= 64 else 8, 2),
    )(*spans, q_pos, q_seg, kv_pos, kv_seg, q, k, v, do, lse, di)


def _dkv_call(cfg, spans_t, q_pos, q_seg, kv_pos, kv_seg, q, k, v, do, lse, di):
    B, N, Tp, H = q.shape
    K = k.shape[1]
    b_, G = cfg.blocking, cfg.groups
    bk = b_.block_kv
    # [B,N,Tp,H] -> [B,K,G*Tp,H] (free reshape): the G heads of a group as one slab, rows g*Tp+t.
    qg, dog = q.reshape(B, K, G * Tp, H), do.reshape(B, K, G * Tp, H)
    lseg, dig = lse.reshape(B, K, G * Tp), di.reshape(B, K, G * Tp)
    span = pl.BlockSpec((None, 1), lambda b, h, j: (b, j))
    slab = pl.BlockSpec((None, None, G * Tp, H), lambda b, h, j: (b, h, 0, 0))
    slab_row = pl.BlockSpec((None, None, G * Tp), lambda b, h, j: (b, h, 0))
    kv_spec = pl.BlockSpec((None, None, bk, H), lambda b, h, j: (b, h, j, 0))
    qrow = pl.BlockSpec((None, Tp), lambda b, h, j: (b, 0))
    kvrow = pl.BlockSpec((None, bk), lambda b, h, j: (b, j))
    f = cfg.frac()
    cost = pl.CostEstimate(flops=int(2 * blk_lib.attention_flops(B, Tp, b_.s_pad, N, H, f)),
                           transcendentals=int(B * N * Tp * b_.s_pad * f),
                           bytes_accessed=int(q.dtype.itemsize * (4 * k.size + 2 * q.size
                                                                  * b_.nk * f)))
    return pl.pallas_call(
        functools.partial(kern.dkv_kernel, block_q=b_.block_q, groups=G, t_pad=Tp, **cfg.kw()),
        grid=(B, K, b_.nk),
        in_specs=[span, span, qrow, qrow, kvrow, kvrow, slab, kv_spec, kv_spec, slab, slab_row,
                  slab_row],
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        cost_estimate=cost, name="tessera_gpu_flash_dkv",
        **_extra(cfg, 4 if H <= 64 else 8, 1),
    )(*spans_t, q_pos, q_seg, kv_pos, kv_seg, qg, k, v, dog, lseg, dig)


def _spans(cfg, q_pos, q_seg, kv_pos, kv_seg):
    b_ = cfg.blocking
    B = q_pos.shape[0]
    vis = blk_lib.block_visibility(q_pos, q_seg, kv_pos, kv_seg, b_, causal=cfg.causal,
                                   sliding_window=cfg.sliding_window)            # [B,nq,nk]
    lo, hi = blk_lib.visible_span(vis)
    lo_t, hi_t = blk_lib.visible_span(jnp.swapaxes(vis, 1, 2))
    return ((lo.reshape(B, b_.nq), hi.reshape(B, b_.nq)),
            (lo_t.reshape(B, b_.nk), hi_t.reshape(B, b_.nk)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _flash(q, k, v, q_pos, q_seg, kv_pos, kv_seg, cfg):
    return _flash_fwd(q, k, v, q_pos, q_seg, kv_pos, kv_seg, cfg)[0]


def _flash_fwd(q, k, v, q_pos, q_seg, kv_pos, kv_seg, cfg):
    spans, _ = _spans(cfg, q_pos, q_seg, kv_pos, kv_seg)
    o, lse = _fwd_call(cfg, spans, q_pos, q_seg, kv_pos, kv_seg, q, k, v)
    return o, (q, k, v, q_pos, q_seg, kv_pos, kv_seg, o, lse)


def _flash_bwd(cfg, res, do):
    q, k, v, q_pos, q_seg, kv_pos, kv_seg, o, lse = res
    spans, spans_t = _spans(cfg, q_pos, q_seg, kv_pos, kv_seg)
    di = softmax_residual(o, do)[..., 0]                                         # [B,N,Tp]
    dq = _dq_call(cfg, spans, q_pos, q_seg, kv_pos, kv_seg, q, k, v, do, lse, di)
    dk, dv = _dkv_call(cfg, spans_t, q_pos, q_seg, kv_pos, kv_seg, q, k, v, do, lse, di)
    return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention_gpu(q, k, v, *, q_segment_ids=None, kv_segment_ids=None, q_positions=None,
                        kv_positions=None, causal: bool = True, sliding_window: int = 0,
                        logit_softcap: float = 0.0, scale: float | None = None,
                        block_q: int = 0, block_kv: int = 0,
                        interpret: bool | None = None) -> jax.Array:
    """GPU flash attention, differentiable; arguments and masking rule as reference.py.

    q [B,T,N,H], k/v [B,S,K,H] -> [B,T,N,H]. block_q/block_kv: 0 = blocking.GPU_BLOCKS (rounded
    to powers of two, >= 16). interpret None = Pallas interpret mode unless running on a GPU."""
    B, T, N, H = q.shape
    _, S, K, _ = k.shape
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    d_q, d_kv = blk_lib.GPU_BLOCKS
    bq = min(next_pow2(block_q or d_q), next_pow2(max(T, 16)))
    bk = min(next_pow2(block_kv or d_kv), next_pow2(max(S, 16)))
    blocking = blk_lib.Blocking(bq, bk, blk_lib.round_up(T, bq), blk_lib.round_up(S, bk))
    cfg = GpuFlashConfig(scale=float(H ** -0.5 if scale is None else scale), causal=causal,
                         sliding_window=int(sliding_window), logit_softcap=float(logit_softcap),
                         blocking=blocking, groups=N // K, interpret=bool(interpret))
    masks = blk_lib.masking_inputs(B, T, S, q_positions, kv_positions, q_segment_ids,
                                   kv_segment_ids, blocking)
    Hp = max(16, next_pow2(H))

    def prep(x, length):  # [B,L,heads,H] -> [B,heads,length,Hp], zero padded
        x = x.transpose(0, 2, 1, 3)
        return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, Hp - H)))

    o = _flash(prep(q, blocking.t_pad), prep(k, blocking.s_pad), prep(v, blocking.s_pad),
               *masks, cfg)                                                      # [B,N,Tp,Hp]
    return o[:, :, :T, :H].transpose(0, 2, 1, 3)                                 # [B,T,N,H]
