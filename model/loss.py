"""Next-token cross-entropy from final hidden states, with the fp32 logits one chunk at a time.

The logits of a whole batch are the largest tensor of a long-context step: [B,T,V] fp32 is
8.4 GB per chip for Llama 3 8B at 2 x 8192 rows per chip, and its gradient as much again. Cut
along the sequence into chunks of `chunk` positions, each chunk's logits are made, reduced to
(nll, log_z) and dropped; the backward recomputes them chunk by chunk (jax.checkpoint inside a
scan), for the cost of one more output-projection matmul. Rows no longer than one chunk take the
plain path, so short-sequence training and CPUs compile exactly what they did before.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from configs import ModelConfig
from model.transformer import logits as output_logits


def _nll(params: dict, h: jax.Array, targets: jax.Array, cfg: ModelConfig, rules: str):
    """h [B,c,D], targets [B,c] -> (nll, log_z) [B,c] in nats."""
    logits = output_logits(params, h, cfg, rules)                             # [B,c,V] fp32
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_z - target_logit, log_z


def token_nll(params: dict, h: jax.Array, targets: jax.Array, cfg: ModelConfig, rules: str,
              chunk: int = 0) -> tuple[jax.Array, jax.Array]:
    """Per-token NLL and log-partition [B,T] of hidden h [B,T,D] against targets [B,T]; logits
    are built `chunk` positions at a time when T is longer (0 = whole rows)."""
    B, T, D = h.shape
    if chunk <= 0 or T <= chunk:
        return _nll(params, h, targets, cfg, rules)
    n = -(-T // chunk)
    pad = n * chunk - T                                                      # the last chunk's tail
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    hs = jnp.moveaxis(h.reshape(B, n, chunk, D), 1, 0)                       # [n,B,c,D]
    ts = jnp.moveaxis(targets.reshape(B, n, chunk), 1, 0)                    # [n,B,c]
    body = jax.checkpoint(lambda x: _nll(params, x[0], x[1], cfg, rules))   # backward recomputes
    nll, log_z = jax.lax.map(body, (hs, ts))                                 # [n,B,c] each
    unchunk = lambda a: jnp.moveaxis(a, 0, 1).reshape(B, n * chunk)[:, :T]
    return unchunk(nll), unchunk(log_z)
