"""Jitted chunked prefill and decode step (donated paged cache), with sampling.

Both run the model's own forward (model/transformer.py: `embed`, `decoder`, whose one `block`
serves training too, and `logits`); the only serving-specific part is the `attend` function that
writes the new tokens' K/V into the sequence's pages and attends over the pages through
`paged_attention`: a prefill chunk is T tokens of one sequence at positions start..start+T-1, a
decode step one token for each of B sequences. The cache is the state threaded through the
layers' scan and is updated by scatters, so with donation XLA updates it in place.

Params are the pure-dict layout of `Transformer` (`nnx.to_pure_dict`), optionally with QArray
weights (model/quant.py); `linear` and `embed` dispatch on them.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from configs import Config
from model.attention import paged_attention
from model.transformer import decoder, embed, logits
from serving.kv_cache import KVCache, cache_shardings, slot_indices, write_layer
from serving.sampling import sample, top_logprobs


def _paged_attend(cfg: Config, page_table, positions, valid, lengths, cache_page_size: int, chunk: bool):
    """`attend` for model.transformer.block: store k/v [B,T,K,H] at `positions` [B,T] (where
    `valid`), then attend over the pages up to `lengths` [B]."""
    m = cfg.model
    pages, offsets = slot_indices(page_table, positions, valid, cache_page_size)

    def attend(q, k, v, layer, cache, window):                            # q [B,T,N,H]
        cache = write_layer(cache, layer, k, v, pages, offsets)
        # the stacked cache and the layer index, not a slice: see paged_xla.paged_attention_blocked
        out = paged_attention(q, cache.k, cache.v, page_table, lengths, k_scales=cache.k_scale,
                              v_scales=cache.v_scale, sliding_window=window,
                              logit_softcap=m.attn_logit_softcap, impl=m.attention_impl,
                              q_positions=positions if chunk else None, layer=layer)
        return out.astype(q.dtype), cache                                 # [B,T,N,H]
    return attend


def prefill(params: dict, cache: KVCache, tokens, start, length, page_row, temperature, top_k, top_p,
            key, step, next_tokens, *, cfg: Config, echo: bool = False):
    """One chunk of one sequence: tokens [1,Tb] at positions start.., valid up to `length` (the
    sequence's tokens so far, start < length <= start+Tb); page_row [1,M].

    Writes the chunk's K/V into the pages and returns (cache, a sample of the token after
    position length-1 (used when the chunk is the last), and, when echo, the logprobs of
    next_tokens [1,Tb] (token t+1 scored at t) with the top ids/logprobs [1,Tb,TOP_N]).
    """
    m, rules = cfg.model, cfg.mesh.rules
    B, T = tokens.shape
    positions = start + jnp.arange(T, dtype=jnp.int32)[None, :]          # [1,Tb]
    attend = _paged_attend(cfg, page_row, positions, positions < length, jnp.reshape(length, (1,)),
                           cache.page_size, chunk=True)
    h, cache = decoder(params, embed(params, tokens, m, rules), positions, attend, m, rules, cache)
    last = jax.lax.dynamic_slice_in_dim(h, length - 1 - start, 1, axis=1)  # [1,1,D]
    out = sample(logits(params, last, m, rules)[:, 0], temperature, top_k, top_p, key,
                 jnp.reshape(step, (1,)))
    if not echo:
        return cache, out, None
    logp, top_ids, top_lp = top_logprobs(logits(params, h, m, rules).reshape(B * T, -1))
    tok_lp = jnp.take_along_axis(logp, next_tokens.reshape(B * T, 1), axis=-1).reshape(B, T)
    return cache, out, (tok_lp, top_ids.reshape(B, T, -1), top_lp.reshape(B, T, -1))


def decode_step(params: dict, cache: KVCache, tokens, positions, page_table, temperature, top_k,
                top_p, keys, steps, *, cfg: Config):
    """One token for every slot: tokens/positions [B] (position < 0 marks an idle slot).

    Returns (cache, (next tokens [B], their logprobs [B], top ids/logprobs [B,TOP_N])).
    """
    m, rules = cfg.model, cfg.mesh.rules
    active = positions >= 0
    pos = jnp.maximum(positions, 0)[:, None]                              # [B,1]
    lengths = jnp.where(active, positions + 1, 0).astype(jnp.int32)       # [B]
    attend = _paged_attend(cfg, page_table, pos, active[:, None], lengths, cache.page_size, chunk=False)
    h, cache = decoder(params, embed(params, tokens[:, None], m, rules), pos, attend, m, rules, cache)
    return cache, sample(logits(params, h, m, rules)[:, 0], temperature, top_k, top_p, keys, steps)


def compile_fns(cfg: Config, mesh):
    """(prefill, decode) jitted with the cache donated; cfg and echo are static.

    Output shardings are pinned (cache as laid out by init_cache, the rest replicated) so every
    call sees the same input shardings as the one before it: no silent recompiles mid-serving.
    """
    rep = NamedSharding(mesh, PartitionSpec())
    cache_sh = cache_shardings(cfg, mesh, cfg.serve.kv_dtype)
    pre = jax.jit(functools.partial(prefill, cfg=cfg), static_argnames=("echo",), donate_argnums=(1,),
                  out_shardings=(cache_sh, rep, rep))
    dec = jax.jit(functools.partial(decode_step, cfg=cfg), donate_argnums=(1,), out_shardings=(cache_sh, rep))
    return pre, dec
