"""Batched on-device sampling: greedy, temperature, top-k, top-p, per-request seeds, logprobs.

Every slot carries its own parameters, so one jitted function serves any mix of requests.
Randomness is `fold_in(PRNGKey(seed), step)` per request: a request's samples do not depend on
which other requests share the batch (continuous batching gives the same output as running
alone). Logprobs are those of the model's raw distribution (temperature 1, no truncation),
as OpenAI reports them.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

TOP_N = 20  # top logprobs computed per position (OpenAI allows up to 20)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One request's decoding settings (validated by serving.http before reaching the engine)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                    # 0 disables
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None       # number of top alternatives; None = no logprobs
    echo: bool = False                # return the prompt (and its logprobs) too


def seed_key(seed: int) -> np.ndarray:
    """Raw threefry key data [2] uint32 of PRNGKey(seed), built on the host."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)


def top_logprobs(logits: jax.Array):
    """logits [B,V] -> (log-softmax [B,V], top ids [B,TOP_N], top logprobs [B,TOP_N])."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    top_lp, top_ids = jax.lax.top_k(logp, min(TOP_N, logp.shape[-1]))
    return logp, top_ids.astype(jnp.int32), top_lp


def sample(logits: jax.Array, temperature, top_k, top_p, keys, steps):
    """Pick one token per row.

    logits [B,V] fp32; temperature [B] (<= 0 means greedy); top_k [B] int (0 = off);
    top_p [B] in (0,1]; keys [B,2] uint32 raw key data; steps [B] int (folded into the key).
    Returns (tokens [B] int32, chosen logprobs [B], top ids [B,TOP_N], top logprobs [B,TOP_N]).
    """
    logits = logits.astype(jnp.float32)
    B, V = logits.shape
    logp, top_ids, top_lp = top_logprobs(logits)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled():
        scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
        order = jnp.argsort(-scaled, axis=-1)                        # [B,V] best first
        srt = jnp.take_along_axis(scaled, order, axis=-1)
        rank = jnp.arange(V)[None, :]
        keep = rank < jnp.where(top_k > 0, top_k, V)[:, None]
        probs = jax.nn.softmax(jnp.where(keep, srt, -jnp.inf), axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs                  # mass ranked above each token
        keep &= (before < top_p[:, None]) | (rank == 0)
        final = jnp.where(keep, srt, -jnp.inf)
        ks = jax.vmap(lambda k, s: jax.random.fold_in(jax.random.wrap_key_data(k), s))(keys, steps)
        pick = jax.vmap(jax.random.categorical)(ks, final)           # [B] rank index
        tok = jnp.take_along_axis(order, pick[:, None], axis=-1)[:, 0].astype(jnp.int32)
        return jnp.where(temperature > 0, tok, greedy)

    tokens = jax.lax.cond(jnp.any(temperature > 0), sampled, lambda: greedy)
    chosen = jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
    return tokens, chosen, top_ids, top_lp
