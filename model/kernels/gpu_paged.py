"""GPU paged decode attention (Pallas, Triton lowering).

Grid (B, K): one program per (sequence, kv head) holds the G*T query rows of that head's group
(GQA: K/V pages are read once per group, not per query head) and loops over chunks of
`pages_per_chunk` pages, gathering them through the page table straight from the cache's own
[P, page_size, K, H] layout (the kv-head dim is squeezed by the BlockSpec: a strided gather, no
transpose of the cache). Only chunks inside [first visible, length) are visited. int8 pages are
used as int8 -> bf16 values and their per-token scales are applied to the logits (K) and to the
probabilities (V), so no dequantised copy of a tile is ever made.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from model.kernels.blocking import MASK_VALUE
from model.kernels.gpu_flash import _compiler_params, next_pow2
from model.kernels.gpu_flash_kernels import dot


def _kernel(lengths_ref, table_ref, q_pos_ref, q_ref, k_ref, v_ref, *rest, pps, page_size,
            scale, sliding_window, logit_softcap, quantized, T):
    """One (sequence, kv head): online softmax over chunks of pps pages."""
    if quantized:
        ks_ref, vs_ref, o_ref = rest
    else:
        (o_ref,) = rest
    GT, H = q_ref.shape
    chunk = pps * page_size
    length = lengths_ref[0]
    q = q_ref[...]
    q_pos = q_pos_ref[...]                                                      # [GT]

    def body(c, carry):
        acc, m_prev, l_prev = carry
        pages = table_ref[pl.ds(c * pps, pps)]                                  # [pps]
        k = k_ref[pages].reshape(chunk, H)                                      # [chunk,H]
        v = v_ref[pages].reshape(chunk, H)
        s = dot(q, k.astype(q.dtype), trans_b=True)                             # [GT,chunk]
        if quantized:
            s = s * ks_ref[pages].reshape(1, chunk)
        s = s * scale
        if logit_softcap:
            s = logit_softcap * jnp.tanh(s / logit_softcap)
        kv_pos = c * chunk + lax.broadcasted_iota(jnp.int32, (1, chunk), 1)
        mask = kv_pos <= q_pos[:, None]
        if sliding_window:
            mask &= q_pos[:, None] - kv_pos < sliding_window
        s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m_prev, s.max(axis=-1))
        p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)                  # [GT,chunk]
        alpha = jnp.exp(m_prev - m_new)
        l_new = alpha * l_prev + p.sum(axis=-1)
        if quantized:
            p = p * vs_ref[pages].reshape(1, chunk)
        acc = alpha[:, None] * acc + dot(p.astype(q.dtype), v.astype(q.dtype))
        return acc, m_new, l_new

    first = 0
    if sliding_window:
        first = jnp.maximum(length - T - sliding_window + 1, 0) // chunk
    init = (jnp.zeros((GT, H), jnp.float32), jnp.full((GT,), MASK_VALUE, jnp.float32),
            jnp.zeros((GT,), jnp.float32))
    acc, _, l = lax.fori_loop(first, pl.cdiv(length, chunk), body, init)
    o_ref[...] = (acc / jnp.where(l == 0.0, 1.0, l)[:, None]).astype(o_ref.dtype)


def paged_attention_gpu(q, k_pages, v_pages, page_table, lengths, *, k_scales=None,
                        v_scales=None, sliding_window: int = 0, logit_softcap: float = 0.0,
                        scale: float | None = None, pages_per_chunk: int = 0,
                        interpret: bool | None = None) -> jax.Array:
    """Paged decode attention on NVIDIA GPUs; arguments and result as paged_reference.py.

    pages_per_chunk 0 = enough pages for 64 tokens per loop step (a power of two; page_size must
    be one too, as must be the padded tiles: Triton works on power-of-two blocks)."""
    B, T, N, H = q.shape
    P, ps, K, _ = k_pages.shape
    M = page_table.shape[1]
    G, GT = N // K, (N // K) * T
    if ps & (ps - 1):
        raise ValueError(f"paged_attention_gpu needs a power-of-two page size, got {ps}")
    quantized = k_scales is not None
    pps = min(next_pow2(pages_per_chunk or max(1, 64 // ps)), next_pow2(M))
    Mp = -(-M // pps) * pps
    GTp, Hp = max(16, next_pow2(GT)), max(16, next_pow2(H))
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    scale = float(H ** -0.5 if scale is None else scale)

    # [B,T,N,H] -> [B,K,G*T,H] (row g*T + t), rows and H zero-padded to power-of-two tiles.
    qk = q.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, GT, H)
    qk = jnp.pad(qk, ((0, 0), (0, 0), (0, GTp - GT), (0, Hp - H)))
    lengths = lengths.astype(jnp.int32)
    q_pos = jnp.tile(lengths[:, None] - T + jnp.arange(T, dtype=jnp.int32), (1, G))   # [B,GT]
    q_pos = jnp.pad(q_pos, ((0, 0), (0, GTp - GT)), constant_values=-1)  # pad rows see nothing
    table = jnp.pad(jnp.clip(page_table.astype(jnp.int32), 0, P - 1), ((0, 0), (0, Mp - M)))
    if Hp != H:
        k_pages = jnp.pad(k_pages, ((0, 0), (0, 0), (0, 0), (0, Hp - H)))
        v_pages = jnp.pad(v_pages, ((0, 0), (0, 0), (0, 0), (0, Hp - H)))

    page_spec = pl.BlockSpec((P, ps, None, Hp), lambda b, h: (0, 0, h, 0))    # [P,ps,H] of head h
    in_specs = [pl.BlockSpec((1,), lambda b, h: (b,)),
                pl.BlockSpec((None, Mp), lambda b, h: (b, 0)),
                pl.BlockSpec((None, GTp), lambda b, h: (b, 0)),
                pl.BlockSpec((None, None, GTp, Hp), lambda b, h: (b, h, 0, 0)),
                page_spec, page_spec]
    args = [lengths, table, q_pos, qk, k_pages, v_pages]
    if quantized:
        in_specs += [pl.BlockSpec((P, ps, None), lambda b, h: (0, 0, h))] * 2
        args += [k_scales.astype(jnp.float32), v_scales.astype(jnp.float32)]
    kernel = functools.partial(_kernel, pps=pps, page_size=ps, scale=scale,
                               sliding_window=int(sliding_window),
                               logit_softcap=float(logit_softcap), quantized=quantized, T=T)
    cost = pl.CostEstimate(flops=4 * B * N * T * M * ps * H, transcendentals=B * N * T * M * ps,
                           bytes_accessed=int(2 * B * M * ps * K * H * k_pages.dtype.itemsize
                                              + 2 * q.size * q.dtype.itemsize))
    extra = (dict(interpret=True) if interpret else
             dict(compiler_params=_compiler_params(4, 2)))
    o = pl.pallas_call(kernel, grid=(B, K),
                       in_specs=in_specs,
                       out_specs=pl.BlockSpec((None, None, GTp, Hp), lambda b, h: (b, h, 0, 0)),
                       out_shape=jax.ShapeDtypeStruct((B, K, GTp, Hp), q.dtype),
                       cost_estimate=cost, name="tessera_gpu_paged_decode", **extra)(*args)
    o = o[:, :, :GT, :H]
    return o.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)  # [B,T,N,H]
