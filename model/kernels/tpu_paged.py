"""TPU paged decode attention (Pallas / Mosaic): a few new tokens per sequence against a paged cache.

Grid (B, n_steps): step s of sequence b reads `pages_per_step` pages. Each page is its own input
(the same cache array passed pages_per_step times, each BlockSpec picking page s*pps + r through the
page table held in SMEM by scalar prefetch), so one grid step moves pps * page_size tokens of
K and V for all kv heads (block (page_size, K, H), the cache's own layout: no transpose of the
cache). Pages past the sequence's length (or before its sliding window) clamp their index onto a
resident page, so they cost no DMA, and steps wholly outside are skipped.
Queries are laid out [B, K, G*T, H] (row g*T + t) so each kv head serves its G heads x T tokens in
one matmul. int8 pages are dequantised in VMEM with their per-token scales.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from model.kernels.blocking import MASK_VALUE
from model.kernels.tpu_flash import _params, interpret_mode
from model.kernels.tpu_flash_kernels import NT, mm


def _kernel(lengths_ref, table_ref, q_pos_ref, q_ref, *refs, pps, page_size, K, scale,
            sliding_window, logit_softcap, quantized, T):
    """One step: pps pages of K/V for all K kv heads; online softmax across steps."""
    k_refs, v_refs = refs[:pps], refs[pps:2 * pps]
    rest = refs[2 * pps:]
    if quantized:
        ks_refs, vs_refs, rest = rest[:pps], rest[pps:2 * pps], rest[2 * pps:]
    o_ref, m_sc, l_sc, acc_sc = rest
    b, step = pl.program_id(0), pl.program_id(1)
    length = lengths_ref[b]
    first_tok = step * (pps * page_size)
    last_tok = first_tok + pps * page_size - 1

    @pl.when(step == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    live = first_tok < length
    if sliding_window:  # the earliest query (position length-T) still sees this step's last key
        live &= (length - T) - last_tok < sliding_window

    @pl.when(live)
    def _compute():
        q_pos = q_pos_ref[...]                                                  # [GT,1]
        masks = []
        for r in range(pps):
            kv_pos = (first_tok + r * page_size
                      + lax.broadcasted_iota(jnp.int32, (1, page_size), 1))     # [1,ps]
            mask = kv_pos <= q_pos                                               # [GT,ps]
            if sliding_window:
                mask &= q_pos - kv_pos < sliding_window
            masks.append(mask)
        for h in range(K):
            q = q_ref[h]                                                         # [GT,H]
            ss, vs = [], []
            for r in range(pps):
                k = k_refs[r][:, h, :]                                           # [ps,H]
                v = v_refs[r][:, h, :]
                if quantized:
                    k = (k.astype(jnp.float32) * ks_refs[r][:, h:h + 1]).astype(q.dtype)
                    v = (v.astype(jnp.float32) * vs_refs[r][:, h:h + 1]).astype(q.dtype)
                s = mm(q, k.astype(q.dtype), NT) * scale                         # [GT,ps]
                if logit_softcap:
                    s = logit_softcap * jnp.tanh(s / logit_softcap)
                ss.append(jnp.where(masks[r], s, MASK_VALUE))
                vs.append(v)
            m_prev = m_sc[h]                                                     # [GT,1]
            m_new = m_prev
            for s in ss:
                m_new = jnp.maximum(m_new, s.max(axis=-1, keepdims=True))
            alpha = jnp.exp(m_prev - m_new)
            l_new, pv = alpha * l_sc[h], alpha * acc_sc[h]
            for r in range(pps):
                p = jnp.where(masks[r], jnp.exp(ss[r] - m_new), 0.0)             # [GT,ps]
                l_new += p.sum(axis=-1, keepdims=True)
                pv += mm(p.astype(q.dtype), vs[r].astype(q.dtype))               # [GT,H]
            m_sc[h], l_sc[h], acc_sc[h] = m_new, l_new, pv

    @pl.when(step == pl.num_programs(1) - 1)
    def _finish():
        l = l_sc[...]
        o_ref[...] = (acc_sc[...] / jnp.where(l == 0.0, 1.0, l)).astype(o_ref.dtype)


def paged_attention_tpu(q, k_pages, v_pages, page_table, lengths, *, k_scales=None,
                        v_scales=None, sliding_window: int = 0, logit_softcap: float = 0.0,
                        scale: float | None = None, pages_per_step: int = 0,
                        interpret: bool | str | None = None) -> jax.Array:
    """Paged decode attention on TPU; arguments and result as paged_reference.py.

    pages_per_step 0 = enough pages for ~256 tokens per grid step (capped at the table width).
    interpret: as tpu_flash.interpret_mode (None = TPU interpret mode unless on a TPU)."""
    B, T, N, H = q.shape
    P, ps, K, _ = k_pages.shape
    M = page_table.shape[1]
    G, GT = N // K, (N // K) * T
    quantized = k_scales is not None
    pps = min(pages_per_step or max(1, 256 // ps), M)
    n_steps = -(-M // pps)
    interpret = interpret_mode(interpret)
    scale = float(H ** -0.5 if scale is None else scale)

    # [B,T,N,H] -> [B,K,G*T,H], row g*T + t (small: only the new tokens move).
    qk = q.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, GT, H)
    lengths = lengths.astype(jnp.int32)
    q_pos = jnp.tile(lengths[:, None] - T + jnp.arange(T, dtype=jnp.int32), (1, G))[..., None]
    table = jnp.clip(page_table.astype(jnp.int32), 0, P - 1).reshape(-1)           # [B*M]

    def page_map(r):
        def index(b, s, lengths, table):
            # Logical page of this input, clamped into the pages the sequence can see.
            last = jnp.maximum(lax.div(lengths[b] + ps - 1, ps) - 1, 0)
            p = jnp.minimum(s * pps + r, jnp.minimum(last, M - 1))
            if sliding_window:
                first = lax.div(jnp.maximum(lengths[b] - T - sliding_window + 1, 0), ps)
                p = jnp.maximum(p, jnp.minimum(first, last))
            return table[b * M + p]
        return index

    page_specs = [pl.BlockSpec((None, ps, K, H),
                               (lambda f: lambda b, s, ln, tb: (f(b, s, ln, tb), 0, 0, 0))(
                                   page_map(r))) for r in range(pps)]
    scale_specs = [pl.BlockSpec((None, ps, K),
                                (lambda f: lambda b, s, ln, tb: (f(b, s, ln, tb), 0, 0))(
                                    page_map(r))) for r in range(pps)]
    q_spec = pl.BlockSpec((None, K, GT, H), lambda b, s, ln, tb: (b, 0, 0, 0))
    in_specs = [pl.BlockSpec((None, GT, 1), lambda b, s, ln, tb: (b, 0, 0)), q_spec]
    in_specs += page_specs + page_specs
    args = [q_pos, qk] + [k_pages] * pps + [v_pages] * pps
    if quantized:
        in_specs += scale_specs + scale_specs
        args += [k_scales.astype(jnp.float32)] * pps + [v_scales.astype(jnp.float32)] * pps
    kv_bytes = 2 * B * M * ps * K * H * k_pages.dtype.itemsize
    cost = pl.CostEstimate(flops=4 * B * N * T * M * ps * H,
                           transcendentals=B * N * T * M * ps,
                           bytes_accessed=int(kv_bytes + 2 * q.size * q.dtype.itemsize))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(B, n_steps), in_specs=in_specs, out_specs=q_spec,
        scratch_shapes=[pltpu.VMEM((K, GT, 1), jnp.float32), pltpu.VMEM((K, GT, 1), jnp.float32),
                        pltpu.VMEM((K, GT, H), jnp.float32)])
    kernel = functools.partial(_kernel, pps=pps, page_size=ps, K=K, scale=scale,
                               sliding_window=int(sliding_window),
                               logit_softcap=float(logit_softcap), quantized=quantized, T=T)
    extra = _params(("parallel", "arbitrary"), interpret)
    o = pl.pallas_call(kernel, grid_spec=grid_spec,
                       out_shape=jax.ShapeDtypeStruct((B, K, GT, H), q.dtype),
                       cost_estimate=cost, name="tessera_paged_decode", **extra,
                       )(lengths, table, *args)
    return o.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)  # [B,T,N,H]
