"""Next-token cross-entropy from final hidden states, with the fp32 logits one chunk at a time.

The logits of a whole batch are the largest tensor of a long-context step: [B,T,V] fp32 is
8.4 GB per chip for Llama 3 8B at 2 x 8192 rows per chip, and its gradient as much again. Cut
along the sequence into chunks of `chunk` positions, each chunk's logits are made, reduced to
(nll, log_z) and dropped; the backward recomputes them chunk by chunk (jax.checkpoint), for the
cost of one more output-projection matmul.

When: `model.logits_chunk` positions, or by default (0) only when one row's fp32 logits pass
CHUNK_ABOVE_BYTES, since below that chunking costs more than it saves (measured on a Llama 2 7B
step at 4 x 4096 per chip: +0.7 GiB and +1% estimated step time at 2048-position chunks). Rows
that stay whole take the plain path, so short-sequence training and CPUs compile what they did
before.

How: a scan over the chunks (lax.map) in the scanned model, which keeps one chunk's logits live
at a time; with model.scan_layers false a Python loop, as everything else is then unrolled: the
cost analysis counts a loop's body once (compile.py's estimate compiles unroll), while unrolled
chunks let XLA schedule several at once (llama3-8b at 2 x 8192 then needs 36 GB of temporaries
on a 32 GB v6e chip instead of fitting).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from configs import ModelConfig
from model.transformer import logits as output_logits

CHUNK_ABOVE_BYTES = 1 << 30  # a row's fp32 logits above this are made in chunks (logits_chunk 0)


def _nll(params: dict, h: jax.Array, targets: jax.Array, cfg: ModelConfig, rules: str):
    """h [B,c,D], targets [B,c] -> (nll, log_z) [B,c] in nats."""
    logits = output_logits(params, h, cfg, rules)                             # [B,c,V] fp32
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_z - target_logit, log_z


def chunk_size(cfg: ModelConfig, length: int) -> int:
    """Positions per logits chunk for rows of `length` (0 = whole rows): cfg.logits_chunk when
    positive, whole rows when -1, and for 0 whole rows unless a row's fp32 logits pass
    CHUNK_ABOVE_BYTES, then the largest power of two of positions whose logits stay under it."""
    if cfg.logits_chunk:
        return max(cfg.logits_chunk, 0)
    per_position = 4 * cfg.vocab_size
    if length * per_position <= CHUNK_ABOVE_BYTES:
        return 0
    return 1 << max((CHUNK_ABOVE_BYTES // per_position).bit_length() - 1, 0)


def token_nll(params: dict, h: jax.Array, targets: jax.Array, cfg: ModelConfig, rules: str,
              chunk: int = 0, scan: bool = True) -> tuple[jax.Array, jax.Array]:
    """Per-token NLL and log-partition [B,T] of hidden h [B,T,D] against targets [B,T]; logits
    are built `chunk` positions at a time when T is longer (0 = whole rows), in a scan or (scan
    False) a Python loop over the chunks."""
    B, T, D = h.shape
    if chunk <= 0 or T <= chunk:
        return _nll(params, h, targets, cfg, rules)
    nll_of = jax.checkpoint(lambda hc, tc: _nll(params, hc, tc, cfg, rules))  # backward recomputes
    if not scan:
        parts = [nll_of(h[:, s:s + chunk], targets[:, s:s + chunk]) for s in range(0, T, chunk)]
        return tuple(jnp.concatenate(p, axis=1) for p in zip(*parts))       # ([B,T], [B,T])
    n = -(-T // chunk)
    pad = n * chunk - T                                                      # the last chunk's tail
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    hs = jnp.moveaxis(h.reshape(B, n, chunk, D), 1, 0)                       # [n,B,c,D]
    ts = jnp.moveaxis(targets.reshape(B, n, chunk), 1, 0)                    # [n,B,c]
    nll, log_z = jax.lax.map(lambda x: nll_of(*x), (hs, ts))                 # [n,B,c] each
    unchunk = lambda a: jnp.moveaxis(a, 0, 1).reshape(B, n * chunk)[:, :T]
    return unchunk(nll), unchunk(log_z)
