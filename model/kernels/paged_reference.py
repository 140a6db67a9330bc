"""Pure-jnp paged decode attention: the reference the paged kernels (and paged_xla.py's blocked
loop, the `xla` implementation of model.attention.paged_attention) are tested against.

q [B,T,N,H] holds the T newest tokens of each sequence, already written to the cache at positions
lengths[b]-T .. lengths[b]-1. The cache is k/v_pages [P, page_size, K, H]; page_table [B, M] lists
each sequence's pages in order, so token s of sequence b lives at
    k_pages[page_table[b, s // page_size], s % page_size].
int8 pages carry scales [P, page_size, K] (value = int8 * scale). A sequence with length 0 is an
inactive slot and returns zeros. Masking is reference.py's rule with query positions
lengths-T+t, key positions 0..M*page_size-1 and keys at or past the length invisible.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from model.kernels.reference import attention_reference


def gather_pages(pages, page_table, scales=None, dtype=jnp.float32):
    """[P,ps,K,H] pages (+ [P,ps,K] scales) -> the dense [B, M*ps, K, H] cache of each sequence."""
    B, M = page_table.shape
    _, ps, K, H = pages.shape
    x = pages[page_table].astype(dtype)                     # [B,M,ps,K,H]
    if scales is not None:
        x = x * scales[page_table][..., None].astype(dtype)  # [B,M,ps,K,1]
    return x.reshape(B, M * ps, K, H)                       # [B,S,K,H]


def decode_positions(lengths, T: int, S: int):
    """Query positions [B,T], key positions [B,S] and segment ids that encode the paged rule."""
    B = lengths.shape[0]
    lengths = lengths.astype(jnp.int32)
    q_pos = lengths[:, None] - T + jnp.arange(T, dtype=jnp.int32)[None, :]      # [B,T]
    kv_pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))           # [B,S]
    q_seg = jnp.where(lengths[:, None] > 0, 0, -1) + jnp.zeros((B, T), jnp.int32)
    kv_seg = jnp.where(kv_pos < lengths[:, None], 0, -2)                          # [B,S]
    return q_pos, kv_pos, q_seg, kv_seg


def paged_attention_reference(q, k_pages, v_pages, page_table, lengths, *, k_scales=None,
                              v_scales=None, sliding_window: int = 0, logit_softcap: float = 0.0,
                              scale: float | None = None) -> jax.Array:
    """Decode attention of q [B,T,N,H] against a paged cache -> [B,T,N,H] (fp32 math)."""
    B, T, N, H = q.shape
    k = gather_pages(k_pages, page_table, k_scales)
    v = gather_pages(v_pages, page_table, v_scales)
    q_pos, kv_pos, q_seg, kv_seg = decode_positions(lengths, T, k.shape[1])
    return attention_reference(q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
                               q_positions=q_pos, kv_positions=kv_pos, causal=True,
                               sliding_window=sliding_window, logit_softcap=logit_softcap,
                               scale=scale)
