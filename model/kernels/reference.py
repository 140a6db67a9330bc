"""Pure-jnp attention: the reference every kernel is tested against, and the `xla` implementation.

Shapes: q [B,T,N,H], k/v [B,S,K,H], N = K * G (grouped-query). Masking is by positions and segment
ids so one rule covers training (packed rows), prefill and decode against a cache:
  key s is visible to query t  iff  seg_q[t] == seg_k[s]
                                and (not causal or pos_k[s] <= pos_q[t])
                                and (window == 0 or pos_q[t] - pos_k[s] < window)
A query with no visible key (e.g. a padded row) returns zeros.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def default_positions(batch: int, length: int, offset: int = 0) -> jax.Array:
    """[B, length] positions offset, offset+1, ... (queries right-aligned against keys)."""
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32) + offset, (batch, length))


def fill_masking_defaults(B: int, T: int, S: int, q_positions=None, kv_positions=None,
                          q_segment_ids=None, kv_segment_ids=None):
    """Positions (queries right-aligned against keys) and segment ids (one segment) where absent."""
    if q_positions is None:
        q_positions = default_positions(B, T, S - T)
    if kv_positions is None:
        kv_positions = default_positions(B, S)
    if q_segment_ids is None:
        q_segment_ids = jnp.zeros((B, T), jnp.int32)
        kv_segment_ids = jnp.zeros((B, S), jnp.int32)
    return q_positions, kv_positions, q_segment_ids, kv_segment_ids


def attention_mask(q_positions, kv_positions, q_segment_ids=None, kv_segment_ids=None, *,
                   causal: bool = True, sliding_window: int = 0) -> jax.Array:
    """Boolean [B, T, S] mask of visible keys."""
    qp = q_positions[:, :, None]   # [B,T,1]
    kp = kv_positions[:, None, :]  # [B,1,S]
    mask = jnp.ones(jnp.broadcast_shapes(qp.shape, kp.shape), dtype=bool)
    if q_segment_ids is not None:
        mask &= q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    if causal:
        mask &= kp <= qp
    if sliding_window:
        mask &= qp - kp < sliding_window
    return mask


def attention_reference(q, k, v, *, q_segment_ids=None, kv_segment_ids=None, q_positions=None,
                        kv_positions=None, causal: bool = True, sliding_window: int = 0,
                        logit_softcap: float = 0.0, scale: float | None = None) -> jax.Array:
    """Softmax attention in fp32 (output in q.dtype). Segment ids must be given for both or neither."""
    B, T, N, H = q.shape
    _, S, K, _ = k.shape
    G = N // K
    if q_positions is None:
        q_positions = default_positions(B, T, S - T)
    if kv_positions is None:
        kv_positions = default_positions(B, S)
    scale = H ** -0.5 if scale is None else scale
    qg = q.reshape(B, T, K, G, H)  # [B,T,K,G,H]: query head n = k * G + g
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32) * scale
    if logit_softcap:
        logits = logit_softcap * jnp.tanh(logits / logit_softcap)
    mask = attention_mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids,
                          causal=causal, sliding_window=sliding_window)[:, None, None]  # [B,1,1,T,S]
    logits = jnp.where(mask, logits, -1e30)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(mask.any(axis=-1, keepdims=True), probs, 0.0)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v.astype(jnp.float32))
    return out.reshape(B, T, N, H).astype(q.dtype)  # [B,T,N,H]
