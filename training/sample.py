"""Greedy samples from a trained model without a KV cache (for the demo and quick checks).

Each new token reruns the forward pass over a fixed-length buffer: one compilation, and causal
masking means the unused tail of the buffer never affects earlier positions.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def greedy_generate(graphdef, params, prompts: list[list[int]], max_new_tokens: int,
                    eos_id: int | None = None, buffer_len: int | None = None) -> list[list[int]]:
    """Greedy continuation token ids for each prompt (prompt excluded)."""
    B = len(prompts)
    T = buffer_len or max(len(p) for p in prompts) + max_new_tokens
    tokens = np.zeros((B, T), np.int32)
    lengths = np.array([len(p) for p in prompts])
    for b, p in enumerate(prompts):
        tokens[b, :len(p)] = p

    @jax.jit
    def next_tokens(params, tokens, lengths):
        logits = nnx.merge(graphdef, params)(tokens)                      # [B,T,V]
        last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [B,V]
        return jnp.argmax(last, axis=-1)

    out = [[] for _ in range(B)]
    done = np.zeros(B, bool)
    for _ in range(max_new_tokens):
        if done.all() or lengths.max() >= T:
            break
        nxt = np.asarray(next_tokens(params, jnp.asarray(tokens), jnp.asarray(lengths)))
        for b in range(B):
            if done[b] or lengths[b] >= T:
                continue
            tokens[b, lengths[b]] = nxt[b]
            lengths[b] += 1
            out[b].append(int(nxt[b]))
            done[b] = eos_id is not None and nxt[b] == eos_id
    return out
