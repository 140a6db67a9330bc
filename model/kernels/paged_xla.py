"""Paged attention in plain jnp for any number of query tokens: the `xla` implementation of
model.attention.paged_attention (decode) and the attention of chunked prefill on every platform.

The reference (paged_reference.py) gathers a sequence's whole page table, so its cost grows with
the context length the server allows (131,072 tokens for Llama 3.1), not with the tokens a
sequence holds. Here a while loop walks the page table in blocks of `block_tokens` keys with an
online softmax (flash attention's recurrence), and stops after the last block any sequence in
the batch needs: one compiled program serves every length, and a step costs what the sequences
hold. With a sliding window the loop also starts at the first block a query can see.

q [B,T,N,H] at explicit positions q_positions [B,T]; keys 0 .. lengths[b]-1 of sequence b live in
k/v_pages [P,page_size,K,H] (int8 with k/v_scales [P,page_size,K]) at page_table [B,M]. Key s is
visible to a query at position p iff s <= p, s < length and (no window or p - s < window). Rows
that see no key (padding, inactive slots) return zeros.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# Keys per loop iteration. A prefill chunk's many queries amortise big blocks; a decode row of a
# short sequence would gather mostly empty pages with them, so decode takes smaller blocks.
BLOCK_TOKENS = 512
DECODE_BLOCK_TOKENS = 128


def gather_rows(a, layer, idx):
    """a[layer, idx] (or a[idx] when layer is None) for idx [B,bp]."""
    return a[idx] if layer is None else a[layer, idx]


def _dequant(pages, scales, idx, layer):
    """Pages idx [B,bp] (of `layer` when stacked) -> [B, bp*page_size, K, H] fp32 (int8 pages
    times their scales)."""
    x = gather_rows(pages, layer, idx).astype(jnp.float32)                # [B,bp,ps,K,H]
    if scales is not None:
        x = x * gather_rows(scales, layer, idx)[..., None]
    B, bp, ps, K, H = x.shape
    return x.reshape(B, bp * ps, K, H)


def paged_attention_blocked(q, k_pages, v_pages, page_table, q_positions, lengths, *, k_scales=None,
                            v_scales=None, sliding_window: int = 0, logit_softcap: float = 0.0,
                            block_tokens: int = BLOCK_TOKENS, layer=None) -> jax.Array:
    """q [B,T,N,H] against the paged cache -> [B,T,N,H] in q's dtype (fp32 math).

    With `layer`, the pages (and scales) are the whole stacked cache [L,P,...] and the loop reads
    that layer's rows straight from it: slicing the layer out first would copy it (the loop
    needs its operand as a buffer of its own), every layer of every step."""
    B, T, N, H = q.shape
    ps, K = k_pages.shape[-3], k_pages.shape[-2]
    G = N // K
    M = page_table.shape[1]
    bp = max(1, min(block_tokens // ps, M))                                # pages per block
    n_all = -(-M // bp)
    table = jnp.pad(page_table, ((0, 0), (0, n_all * bp - M)))             # page 0 pads the tail
    qs = q.astype(jnp.float32).reshape(B, T, K, G, H) * H ** -0.5          # [B,T,K,G,H]
    lengths = lengths.astype(jnp.int32)
    q_positions = q_positions.astype(jnp.int32)
    live = q_positions < lengths[:, None]                                  # [B,T] rows with keys
    bt = bp * ps
    hi = (jnp.max(lengths) + bt - 1) // bt                                 # blocks any row needs
    lo = jnp.int32(0)
    if sliding_window:  # blocks wholly before every live query's window are skipped
        first = jnp.min(jnp.where(live, q_positions - sliding_window + 1, jnp.iinfo(jnp.int32).max))
        lo = jnp.clip(first, 0, None) // bt

    def body(j, carry):
        m, l, acc = carry                                                  # [B,T,K,G], same, [B,T,K,G,H]
        idx = jax.lax.dynamic_slice_in_dim(table, j * bp, bp, axis=1)      # [B,bp]
        k = _dequant(k_pages, k_scales, idx, layer)                        # [B,S,K,H] S = bt
        v = _dequant(v_pages, v_scales, idx, layer)
        s = jnp.einsum("BTKGH,BSKH->BTKGS", qs, k)
        if logit_softcap:
            s = logit_softcap * jnp.tanh(s / logit_softcap)
        kv_pos = j * bt + jnp.arange(bt, dtype=jnp.int32)                  # [S]
        p_q = q_positions[:, :, None]                                      # [B,T,1]
        mask = (kv_pos[None, None] <= p_q) & live[:, :, None]             # [B,T,S]
        if sliding_window:
            mask &= p_q - kv_pos[None, None] < sliding_window
        mask = mask[:, :, None, None, :]                                   # [B,T,1,1,S]
        m_new = jnp.maximum(m, jnp.max(jnp.where(mask, s, -jnp.inf), axis=-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        fix = jnp.where(jnp.isneginf(m_new), 0.0, jnp.exp(m - m_new))     # no key seen yet: 0
        l = l * fix + jnp.sum(p, axis=-1)
        acc = acc * fix[..., None] + jnp.einsum("BTKGS,BSKH->BTKGH", p, v)
        return m_new, l, acc

    init = (jnp.full((B, T, K, G), -jnp.inf, jnp.float32), jnp.zeros((B, T, K, G), jnp.float32),
            jnp.zeros((B, T, K, G, H), jnp.float32))
    _, l, acc = jax.lax.fori_loop(lo, hi, body, init)
    out = jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
    return out.reshape(B, T, N, H).astype(q.dtype)
