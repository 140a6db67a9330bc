"""Kernel bodies of the TPU flash attention (Mosaic): forward, dq and dk/dv.

Each body sees one query block q (bq, H) and one key block k/v (bk, H) of one (batch, head), the
positions / segment ids of both as (bq, 1) columns and (1, bk) rows, and accumulates in fp32 VMEM
scratch across the key (forward, dq) or query (dk/dv) grid axis. The grid wrappers are in
tpu_flash.py. Blocks outside [lo, hi] (blocking.py) are skipped: nothing is computed and the index
map has clamped their DMA onto a block already resident.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from model.kernels.blocking import MASK_VALUE

NT = (((1,), (1,)), ((), ()))  # contract the last dims: [X,H] x [Y,H] -> [X,Y]
TN = (((0,), (0,)), ((), ()))  # contract the first dims: [X,Y] x [X,H] -> [Y,H]


def precision(dtype):
    """Explicit MXU precision, so a global jax_default_matmul_precision cannot leak into Mosaic:
    bf16 operands take one pass (exact products, fp32 accumulation); fp32 ones the full
    multi-pass fp32 matmul."""
    return lax.Precision.HIGHEST if dtype == jnp.float32 else lax.Precision.DEFAULT


def mm(a, b, dims=None):
    """fp32-accumulated matmul of same-dtype operands; dims default [X,C] x [C,Y] -> [X,Y]."""
    dims = (((1,), (0,)), ((), ())) if dims is None else dims
    return lax.dot_general(a, b, dims, precision=precision(a.dtype),
                           preferred_element_type=jnp.float32)


def block_mask(q_pos, q_seg, kv_pos, kv_seg, *, causal: bool, sliding_window: int):
    """(bq,1) and (1,bk) positions / segment ids -> (bq, bk) visibility, as in reference.py."""
    mask = q_seg == kv_seg
    if causal:
        mask &= kv_pos <= q_pos
    if sliding_window:
        mask &= q_pos - kv_pos < sliding_window
    return mask


def logits(q, k, scale: float, logit_softcap: float):
    """fp32 (bq, bk) logits, soft-capped: c * tanh(s / c)."""
    s = mm(q, k, NT) * scale
    if logit_softcap:
        s = logit_softcap * jnp.tanh(s / logit_softcap)
    return s


def fwd_kernel(lo_ref, hi_ref, q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, q_ref, k_ref, v_ref,
               o_ref, lse_ref, m_sc, l_sc, acc_sc, *, scale, causal, sliding_window,
               logit_softcap, nq, nk):
    """Online-softmax forward over key blocks j (grid axis 3, sequential)."""
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    lo, hi = lo_ref[b * nq + i], hi_ref[b * nq + i]

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when((j >= lo) & (j <= hi))
    def _compute():
        mask = block_mask(q_pos_ref[...], q_seg_ref[...], kv_pos_ref[...], kv_seg_ref[...],
                          causal=causal, sliding_window=sliding_window)          # [bq,bk]
        s = jnp.where(mask, logits(q_ref[...], k_ref[...], scale, logit_softcap), MASK_VALUE)
        m_prev = m_sc[...]                                                       # [bq,1]
        m_new = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))
        p = jnp.where(mask, jnp.exp(s - m_new), 0.0)                              # [bq,bk]
        alpha = jnp.exp(m_prev - m_new)
        l_sc[...] = alpha * l_sc[...] + p.sum(axis=-1, keepdims=True)
        v = v_ref[...]
        acc_sc[...] = alpha * acc_sc[...] + mm(p.astype(v.dtype), v)
        m_sc[...] = m_new

    @pl.when(j == nk - 1)
    def _finish():
        l = l_sc[...]
        empty = l == 0.0  # no visible key: output zeros (reference contract)
        o_ref[...] = (acc_sc[...] / jnp.where(empty, 1.0, l)).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(empty, 0.0, m_sc[...] + jnp.log(jnp.where(empty, 1.0, l)))


def _probs_and_dlogits(q, k, v, do, lse, di, mask, scale, logit_softcap):
    """Recompute p = softmax from the saved lse and return (p, dS) with dS w.r.t. raw q.k*scale."""
    s = logits(q, k, scale, logit_softcap)
    p = jnp.where(mask, jnp.exp(s - lse), 0.0)                                   # [bq,bk]
    dp = mm(do, v, NT)                                                           # [bq,bk]
    ds = p * (dp - di)
    if logit_softcap:  # d/dx c*tanh(x/c) = 1 - tanh^2 = 1 - (s/c)^2
        ds = ds * (1.0 - (s / logit_softcap) ** 2)
    return p, ds


def dq_kernel(lo_ref, hi_ref, q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, q_ref, k_ref, v_ref,
              do_ref, lse_ref, di_ref, dq_ref, dq_sc, *, scale, causal, sliding_window,
              logit_softcap, nq, nk):
    """dq for one query block, accumulated over key blocks j (grid axis 3)."""
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    lo, hi = lo_ref[b * nq + i], hi_ref[b * nq + i]

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @pl.when((j >= lo) & (j <= hi))
    def _compute():
        mask = block_mask(q_pos_ref[...], q_seg_ref[...], kv_pos_ref[...], kv_seg_ref[...],
                          causal=causal, sliding_window=sliding_window)
        k = k_ref[...]
        _, ds = _probs_and_dlogits(q_ref[...], k, v_ref[...], do_ref[...], lse_ref[...],
                                   di_ref[...], mask, scale, logit_softcap)
        dq_sc[...] += mm(ds.astype(k.dtype), k)

    @pl.when(j == nk - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def dkv_kernel(lo_ref, hi_ref, q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, q_ref, k_ref, v_ref,
               do_ref, lse_ref, di_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, scale, causal,
               sliding_window, logit_softcap, nq, nk, groups):
    """dk, dv for one key block of kv head kh, accumulated over the G query heads of its group
    (grid axis 3) and the query blocks i (grid axis 4): GQA without repeating K/V."""
    b, j, g, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
    lo, hi = lo_ref[b * nk + j], hi_ref[b * nk + j]

    @pl.when((g == 0) & (i == 0))
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @pl.when((i >= lo) & (i <= hi))
    def _compute():
        mask = block_mask(q_pos_ref[...], q_seg_ref[...], kv_pos_ref[...], kv_seg_ref[...],
                          causal=causal, sliding_window=sliding_window)
        q, do = q_ref[...], do_ref[...]
        p, ds = _probs_and_dlogits(q, k_ref[...], v_ref[...], do, lse_ref[...], di_ref[...],
                                   mask, scale, logit_softcap)
        dv_sc[...] += mm(p.astype(do.dtype), do, TN)                             # [bk,H]
        dk_sc[...] += mm(ds.astype(q.dtype), q, TN)                              # [bk,H]

    @pl.when((g == groups - 1) & (i == nq - 1))
    def _finish():
        dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def softmax_residual(o: jax.Array, do: jax.Array) -> jax.Array:
    """D_i = rowsum(dO * O) in fp32, the softmax-backward term shared by dq and dk."""
    return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)
