"""Causal attention of rows over themselves in plain jnp, skipping the blocks the mask hides.

The `xla` implementation for training, evaluation and cache-free forward passes. The reference
(reference.py) computes every [T,S] logit and masks half of them away; here the queries are cut
into static blocks of `block` rows, and query block i attends only to keys 0 .. (i+1)*block - 1
(and, with a sliding window W, not before i*block - W + 1). With n blocks that is (n+1)/(2n) of
the logits, their softmax and both matmuls, forward and backward, and the fp32 [B,K,G,T,S]
intermediates shrink alike, which is most of the win on CPUs and of the memory on accelerators.

Why skipping by index is exact here: queries and keys are the same rows, and positions increase
along a row within each segment (packing and padding both produce that). A key after its query
in the row is then either in another segment or at a later position, so masked either way; a key
W or more indices before it is W or more positions before it. The reference's masking rules apply
inside each block unchanged. One difference: padding (segment 0, positions all 0 when packed)
may see later padding in the reference and not here; padding outputs differ, nothing else does,
and every loss masks them.

Probabilities meet V in V's dtype with fp32 accumulation: bf16 on TPU/GPU runs at the matmul unit's
native rate, where an fp32 cast would force multi-pass fp32 matmuls; fp32 on CPU is unchanged.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from model.kernels.reference import attention_mask

MASK_VALUE = -1e30
# Query blocks per row: n blocks compute (n+1)/(2n) of the logits; 8 gets within 1/16 of the half
# that causality allows, and more (smaller) blocks only add small matmuls and compile time.
BLOCKS_PER_ROW = 8
MIN_BLOCK = 64  # below this the per-block matmuls are too small to run well on any backend


def _attend(q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, sliding_window, logit_softcap, scale):
    """Masked softmax attention of q [B,T,N,H] over k/v [B,S,K,H] -> [B,T,N,H] (fp32 logits)."""
    B, T, N, H = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, N // K, H)                                      # [B,T,K,G,H]
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32) * scale
    if logit_softcap:
        logits = logit_softcap * jnp.tanh(logits / logit_softcap)
    mask = attention_mask(q_pos, kv_pos, q_seg, kv_seg, causal=True,
                          sliding_window=sliding_window)[:, None, None]      # [B,1,1,T,S]
    logits = jnp.where(mask, logits, MASK_VALUE)
    # Every query sees at least itself (same segment, same position), so no row is all-masked
    # and the softmax needs no guard for empty rows, unlike the reference's general case.
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(B, T, N, H).astype(q.dtype)


def key_spans(length: int, block: int, sliding_window: int = 0) -> list[tuple[int, int, int, int]]:
    """[(q_start, q_end, k_start, k_end)] per query block: the static key range it can see."""
    spans = []
    for start in range(0, length, block):
        end = min(start + block, length)
        k_start = max(0, start - sliding_window + 1) if sliding_window else 0
        spans.append((start, end, k_start, end))
    return spans


def causal_self_attention(q, k, v, positions, segment_ids=None, *, sliding_window: int = 0,
                          logit_softcap: float = 0.0, block: int = 0) -> jax.Array:
    """q [B,T,N,H], k/v [B,T,K,H] of the same rows, positions (and segment_ids) [B,T] ->
    [B,T,N,H]: equal to attention_reference(q, k, v, causal=True, ...) with the rows' own
    positions and segments as both query and key sides. block: query rows per block (0 = about
    T / BLOCKS_PER_ROW, at least MIN_BLOCK)."""
    B, T, N, H = q.shape
    block = block or max(MIN_BLOCK, -(-T // BLOCKS_PER_ROW))
    if segment_ids is None:
        segment_ids = jnp.zeros((B, T), jnp.int32)
    scale = H ** -0.5
    outs = []
    for qs, qe, ks, ke in key_spans(T, block, sliding_window):
        outs.append(_attend(q[:, qs:qe], k[:, ks:ke], v[:, ks:ke], positions[:, qs:qe],
                            positions[:, ks:ke], segment_ids[:, qs:qe], segment_ids[:, ks:ke],
                            sliding_window=sliding_window, logit_softcap=logit_softcap, scale=scale))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
