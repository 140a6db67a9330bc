"""Jitted prefill (bucketed prompt lengths) and decode step (donated paged cache), with sampling.

Both run the model's own forward (model/transformer.py: `embed`, `decoder`, whose one `block`
serves training too, and `logits`); the only serving-specific part is the `attend` function that
decides where K/V go: prefill attends over the prompt itself and writes its K/V into the
sequence's pages, decode writes one token per slot and attends through `paged_attention`. The
cache is the state threaded through the layers' scan and is updated by scatters, so with donation
XLA updates it in place.

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
from model.kernels.reference import default_positions
from model.transformer import decoder, embed, full_attention, logits
from serving.kv_cache import KVCache, cache_shardings, slot_indices, write_layer
from serving.sampling import sample, top_logprobs


def prefill(params: dict, cache: KVCache, tokens, length, page_row, temperature, top_k, top_p, key,
            *, cfg: Config, echo: bool = False):
    """One prompt: tokens [1,Tb] (Tb a bucket, padded after `length`), page_row [1,M].

    Writes K/V of positions < length into the pages, returns (cache, sample of the next token,
    and, when echo, prompt logprobs [1,Tb] and their top ids/logprobs [1,Tb,TOP_N]).
    """
    m, rules = cfg.model, cfg.mesh.rules
    B, T = tokens.shape
    positions = default_positions(B, T)                                   # [1,Tb]
    pages, offsets = slot_indices(page_row, positions, positions < length, cache.page_size)
    over_prompt = full_attention(m, positions)

    def attend(q, k, v, layer, cache, window):                            # [1,Tb,N|K,H]
        cache = write_layer(cache, layer, k, v, pages, offsets)
        return over_prompt(q, k, v, layer, None, window)[0], cache

    h, cache = decoder(params, embed(params, tokens, m, rules), positions, attend, m, rules, cache)
    last = jax.lax.dynamic_slice_in_dim(h, length - 1, 1, axis=1)         # [1,1,D]
    out = sample(logits(params, last, m, rules)[:, 0], temperature, top_k, top_p, key,
                 jnp.zeros((B,), jnp.int32))
    if not echo:
        return cache, out, None
    logp, top_ids, top_lp = top_logprobs(logits(params, h, m, rules).reshape(B * T, -1))
    nxt = jnp.roll(tokens, -1, axis=1).reshape(B * T)                     # token t+1 scored at t
    tok_lp = jnp.take_along_axis(logp, nxt[:, None], axis=-1).reshape(B, T)
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
    pages, offsets = slot_indices(page_table, pos, active[:, None], cache.page_size)

    def attend(q, k, v, layer, cache, window):                            # q [B,1,N,H]
        cache = write_layer(cache, layer, k, v, pages, offsets)
        kp, vp, ks, vs = cache.layer(layer)                               # [P,ps,K,H] (+[P,ps,K])
        out = paged_attention(q, kp, vp, page_table, lengths, k_scales=ks, v_scales=vs,
                              sliding_window=window, logit_softcap=m.attn_logit_softcap,
                              impl=m.attention_impl)
        return out.astype(q.dtype), cache                                 # [B,1,N,H]

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
