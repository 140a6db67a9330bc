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

The backward. Plain autodiff keeps every block's fp32 probabilities from the forward until the
backward: N*T*T*(n+1)/(2n) floats per row, 4.8 GB per row for 32 heads at 8192. Above
RECOMPUTE_ABOVE_BYTES per row a custom VJP keeps only the output and each query's log-sum-exp
(flash attention's residuals, untiled) and recomputes one block's probabilities at a time in the
backward: one more QK^T matmul and more memory traffic (measured +10% on the attention of a TPU
layer at 4 x 4096), for a peak of one block's tensors instead of all of them.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from model.kernels.reference import attention_mask

MASK_VALUE = -1e30
# Query blocks per row: n blocks compute (n+1)/(2n) of the logits; 8 gets within 1/16 of the half
# that causality allows, and more (smaller) blocks only add small matmuls and compile time.
BLOCKS_PER_ROW = 8
MIN_BLOCK = 64  # below this the per-block matmuls are too small to run well on any backend
# Per-row size of the forward's saved fp32 probabilities above which the backward recomputes them.
RECOMPUTE_ABOVE_BYTES = 2 << 30


def _masked_logits(qg, k, q_pos, kv_pos, q_seg, kv_seg, *, sliding_window, logit_softcap, scale):
    """(fp32 logits [B,K,G,T,S] with hidden keys at MASK_VALUE, tanh of the soft cap or None,
    mask [B,1,1,T,S]) of grouped queries qg [B,T,K,G,H] over keys k [B,S,K,H]."""
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32) * scale
    capped = None
    if logit_softcap:
        capped = jnp.tanh(logits / logit_softcap)
        logits = logit_softcap * capped
    mask = attention_mask(q_pos, kv_pos, q_seg, kv_seg, causal=True,
                          sliding_window=sliding_window)[:, None, None]      # [B,1,1,T,S]
    return jnp.where(mask, logits, MASK_VALUE), capped, mask


def _attend(q, k, v, q_pos, kv_pos, q_seg, kv_seg, **kw):
    """Masked softmax attention of q [B,T,N,H] over k/v [B,S,K,H] -> [B,T,N,H] (fp32 logits)."""
    B, T, N, H = q.shape
    K = k.shape[2]
    logits, _, _ = _masked_logits(q.reshape(B, T, K, N // K, H), k, q_pos, kv_pos, q_seg, kv_seg, **kw)
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
                          logit_softcap: float = 0.0, block: int = 0, recompute: bool | None = None) -> jax.Array:
    """q [B,T,N,H], k/v [B,T,K,H] of the same rows, positions (and segment_ids) [B,T] ->
    [B,T,N,H]: equal to attention_reference(q, k, v, causal=True, ...) with the rows' own
    positions and segments as both query and key sides. block: query rows per block (0 = about
    T / BLOCKS_PER_ROW, at least MIN_BLOCK). recompute: the backward recomputes probabilities
    from the saved log-sum-exp (None: when a row's saved probabilities would pass
    RECOMPUTE_ABOVE_BYTES)."""
    B, T, N, H = q.shape
    block = block or max(MIN_BLOCK, -(-T // BLOCKS_PER_ROW))
    if segment_ids is None:
        segment_ids = jnp.zeros((B, T), jnp.int32)
    spans = tuple(key_spans(T, block, sliding_window))
    if recompute is None:
        recompute = 4 * N * sum((qe - qs) * (ke - ks) for qs, qe, ks, ke in spans) > RECOMPUTE_ABOVE_BYTES
    kw = dict(sliding_window=sliding_window, logit_softcap=float(logit_softcap), scale=H ** -0.5)
    if recompute:
        return _recomputing(q, k, v, positions, segment_ids, spans, tuple(kw.items()))
    outs = [_attend(q[:, qs:qe], k[:, ks:ke], v[:, ks:ke], positions[:, qs:qe], positions[:, ks:ke],
                    segment_ids[:, qs:qe], segment_ids[:, ks:ke], **kw) for qs, qe, ks, ke in spans]
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _recomputing(q, k, v, positions, segment_ids, spans, kw):
    """The blocked attention whose backward recomputes each block from the saved log-sum-exp."""
    return _recomputing_fwd(q, k, v, positions, segment_ids, spans, kw)[0]


def _recomputing_fwd(q, k, v, positions, segment_ids, spans, kw):
    B, T, N, H = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, N // K, H)
    outs, lses = [], []
    for qs, qe, ks, ke in spans:
        logits, _, _ = _masked_logits(qg[:, qs:qe], k[:, ks:ke], positions[:, qs:qe], positions[:, ks:ke],
                                      segment_ids[:, qs:qe], segment_ids[:, ks:ke], **dict(kw))
        top = jnp.max(logits, -1)                                           # [B,K,G,Tb]
        p = jnp.exp(logits - top[..., None])
        total = jnp.sum(p, -1)
        o = jnp.einsum("BKGTS,BSKH->BTKGH", p.astype(v.dtype), v[:, ks:ke], preferred_element_type=jnp.float32)
        outs.append((o / jnp.moveaxis(total, 3, 1)[..., None]).astype(q.dtype))
        lses.append(top + jnp.log(total))
    out = jnp.concatenate(outs, axis=1).reshape(B, T, N, H)
    return out, (q, k, v, positions, segment_ids, out, jnp.concatenate(lses, axis=3))


def _recomputing_bwd(spans, kw, residuals, d_out):
    """Per query block: P = exp(logits - lse), dV += P^T dO, dS = P (dO V^T - rowsum(dO O)),
    dQ = dS K, dK += dS^T Q (soft cap and scale applied through the chain rule)."""
    q, k, v, positions, segment_ids, out, lse = residuals
    B, T, N, H = q.shape
    K = k.shape[2]
    kw = dict(kw)
    qg, dog = q.reshape(B, T, K, N // K, H), d_out.reshape(B, T, K, N // K, H)
    delta = jnp.einsum("BTKGH,BTKGH->BKGT", dog.astype(jnp.float32),
                       out.reshape(dog.shape).astype(jnp.float32))          # [B,K,G,T]
    dqs, dk, dv = [], jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    for qs, qe, ks, ke in spans:
        logits, capped, mask = _masked_logits(qg[:, qs:qe], k[:, ks:ke], positions[:, qs:qe], positions[:, ks:ke],
                                              segment_ids[:, qs:qe], segment_ids[:, ks:ke], **kw)
        p = jnp.where(mask, jnp.exp(logits - lse[..., qs:qe, None]), 0.0)   # [B,K,G,Tb,Sb] fp32
        do = dog[:, qs:qe]
        dv = dv.at[:, ks:ke].add(jnp.einsum("BKGTS,BTKGH->BSKH", p.astype(do.dtype), do,
                                            preferred_element_type=jnp.float32))
        dp = jnp.einsum("BTKGH,BSKH->BKGTS", do, v[:, ks:ke], preferred_element_type=jnp.float32)
        ds = p * (dp - delta[..., qs:qe, None])
        if capped is not None:
            ds = ds * (1.0 - capped * capped)
        ds = (ds * kw["scale"]).astype(q.dtype)
        dqs.append(jnp.einsum("BKGTS,BSKH->BTKGH", ds, k[:, ks:ke], preferred_element_type=jnp.float32))
        dk = dk.at[:, ks:ke].add(jnp.einsum("BKGTS,BTKGH->BSKH", ds, qg[:, qs:qe],
                                            preferred_element_type=jnp.float32))
    dq = jnp.concatenate(dqs, axis=1).reshape(q.shape).astype(q.dtype)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None, None


_recomputing.defvjp(_recomputing_fwd, _recomputing_bwd)
