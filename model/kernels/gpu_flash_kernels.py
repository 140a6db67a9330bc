"""Kernel bodies of the GPU flash attention (Pallas, Triton lowering): forward, dq and dk/dv.

Unlike the TPU kernels (one block per grid step, the pipeline does the DMA), a Triton program
owns one query block (forward, dq) or one key block (dk/dv) and loops over the other side with
lax.fori_loop, loading (rows, H) slices straight from global memory; the loop runs only over
the span of blocks that can hold a visible pair (blocking.py), so causal and window masks skip
work. All matmuls go through `dot` below, which accumulates in fp32.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from model.kernels.blocking import MASK_VALUE


def dot(a, b, trans_a: bool = False, trans_b: bool = False):
    """a @ b of 2-D tiles (a.T and/or b.T if asked), accumulated in fp32: what pl.dot (removed in
    JAX 0.12) lowered to. The Triton lowering folds the transposes into the matmul."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _mask(q_pos, q_seg, kv_pos, kv_seg, causal, sliding_window):
    """[bq] and [bk] positions / segment ids -> [bq, bk] visibility (reference.py's rule)."""
    qp, kp = q_pos[:, None], kv_pos[None, :]
    mask = q_seg[:, None] == kv_seg[None, :]
    if causal:
        mask &= kp <= qp
    if sliding_window:
        mask &= qp - kp < sliding_window
    return mask


def _logits(q, k, scale, logit_softcap):
    s = dot(q, k, trans_b=True) * scale                                        # [bq,bk] fp32
    if logit_softcap:
        s = logit_softcap * jnp.tanh(s / logit_softcap)
    return s


def fwd_kernel(lo_ref, hi_ref, q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, q_ref, k_ref, v_ref,
               o_ref, lse_ref, *, scale, causal, sliding_window, logit_softcap, block_kv):
    """One query block (bq, H) of one (batch, head) against key blocks lo..hi."""
    bq, H = q_ref.shape
    q = q_ref[...]
    q_pos, q_seg = q_pos_ref[...], q_seg_ref[...]

    def body(j, carry):
        acc, m_prev, l_prev = carry
        sl = pl.ds(j * block_kv, block_kv)
        k, v = k_ref[sl, :], v_ref[sl, :]
        mask = _mask(q_pos, q_seg, kv_pos_ref[sl], kv_seg_ref[sl], causal, sliding_window)
        s = jnp.where(mask, _logits(q, k, scale, logit_softcap), MASK_VALUE)
        m_new = jnp.maximum(m_prev, s.max(axis=-1))                          # [bq]
        p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)                # [bq,bk]
        alpha = jnp.exp(m_prev - m_new)
        acc = alpha[:, None] * acc + dot(p.astype(v.dtype), v)
        return acc, m_new, alpha * l_prev + p.sum(axis=-1)

    init = (jnp.zeros((bq, H), jnp.float32), jnp.full((bq,), MASK_VALUE, jnp.float32),
            jnp.zeros((bq,), jnp.float32))
    acc, m, l = lax.fori_loop(lo_ref[0], hi_ref[0] + 1, body, init)
    empty = l == 0.0  # no visible key: zeros (reference contract)
    safe_l = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc / safe_l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, 0.0, m + jnp.log(safe_l))


def _dlogits(q, k, v, do, lse, di, mask, scale, logit_softcap):
    """(p, dS) of one (bq, bk) tile, recomputed from the saved log-sum-exp."""
    s = _logits(q, k, scale, logit_softcap)
    p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
    ds = p * (dot(do, v, trans_b=True) - di[:, None])
    if logit_softcap:  # d/dx c*tanh(x/c) = 1 - (s/c)^2
        ds = ds * (1.0 - (s / logit_softcap) ** 2)
    return p, ds


def dq_kernel(lo_ref, hi_ref, q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, q_ref, k_ref, v_ref,
              do_ref, lse_ref, di_ref, dq_ref, *, scale, causal, sliding_window, logit_softcap,
              block_kv):
    """dq of one query block, looping over key blocks lo..hi."""
    q, do, lse, di = q_ref[...], do_ref[...], lse_ref[...], di_ref[...]
    q_pos, q_seg = q_pos_ref[...], q_seg_ref[...]

    def body(j, dq):
        sl = pl.ds(j * block_kv, block_kv)
        k = k_ref[sl, :]
        mask = _mask(q_pos, q_seg, kv_pos_ref[sl], kv_seg_ref[sl], causal, sliding_window)
        _, ds = _dlogits(q, k, v_ref[sl, :], do, lse, di, mask, scale, logit_softcap)
        return dq + dot(ds.astype(k.dtype), k)

    dq = lax.fori_loop(lo_ref[0], hi_ref[0] + 1, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def dkv_kernel(lo_ref, hi_ref, q_pos_ref, q_seg_ref, kv_pos_ref, kv_seg_ref, q_ref, k_ref, v_ref,
               do_ref, lse_ref, di_ref, dk_ref, dv_ref, *, scale, causal, sliding_window,
               logit_softcap, block_q, groups, t_pad):
    """dk, dv of one key block of kv head kh: loops over the G query heads of its group (rows
    g*Tp.. of the [G*Tp, H] q / dO slab) and the query blocks lo..hi. No atomics, no repeat."""
    k, v = k_ref[...], v_ref[...]
    kv_pos, kv_seg = kv_pos_ref[...], kv_seg_ref[...]

    def body(i, carry, g):
        dk, dv = carry
        rows = pl.ds(g * t_pad + i * block_q, block_q)
        q_rows = pl.ds(i * block_q, block_q)
        q, do = q_ref[rows, :], do_ref[rows, :]
        mask = _mask(q_pos_ref[q_rows], q_seg_ref[q_rows], kv_pos, kv_seg, causal, sliding_window)
        p, ds = _dlogits(q, k, v, do, lse_ref[rows], di_ref[rows], mask, scale, logit_softcap)
        dv = dv + dot(p.astype(do.dtype), do, trans_a=True)                    # [bk,H]
        dk = dk + dot(ds.astype(q.dtype), q, trans_a=True)                     # [bk,H]
        return dk, dv

    carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    for g in range(groups):  # static: G is small and each pass is a whole loop
        carry = lax.fori_loop(lo_ref[0], hi_ref[0] + 1,
                              lambda i, c, g=g: body(i, c, g), carry)
    dk_ref[...] = (carry[0] * scale).astype(dk_ref.dtype)
    dv_ref[...] = carry[1].astype(dv_ref.dtype)
