"""Jitted prefill (bucketed prompt lengths) and decode step (donated paged cache), with sampling.

Both run the model's own layer math (`project_qkv`, `mlp`, `linear`, `rms_norm`) under a scan over
the stacked layer weights; the only serving-specific part is where K/V go: prefill attends over
the prompt itself and writes its K/V into the sequence's pages, decode writes one token per slot
and attends through `paged_attention`. The cache rides in the scan carry and is updated by
scatters, so with donation XLA updates it in place.

Params are the pure-dict layout of `Transformer` (`nnx.to_pure_dict`), optionally with QArray
weights (model/quant.py); `linear` dispatches on them.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from configs import Config, ModelConfig
from model.attention import attention, paged_attention
from model.kernels.reference import default_positions
from model.layers import compute_dtype, linear, rms_norm, rope_frequencies
from model.quant import take_rows
from model.transformer import mlp, project_qkv
from serving.kv_cache import KVCache, cache_shardings, slot_indices, write_layer
from serving.sampling import sample, top_logprobs


def output_logits(params: dict, h: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Hidden [B,T,D] -> fp32 logits [B,T,V] (tied or separate head, float or int8)."""
    w = params["embedding"].T if cfg.tie_embeddings else params["lm_head"]  # [D,V]
    return linear("BTD,DV->BTV", h, w).astype(jnp.float32)


def _attn_out(p: dict, x, attn):
    return x + linear("BTNH,NHD->BTD", attn, p["wo"])  # [B,T,D]


def _layer_inputs(params: dict, cfg: ModelConfig):
    return params["layers"], jnp.arange(cfg.n_layers, dtype=jnp.int32)


def prefill(params: dict, cache: KVCache, tokens, length, page_row, temperature, top_k, top_p, key,
            *, cfg: Config, echo: bool = False):
    """One prompt: tokens [1,Tb] (Tb a bucket, padded after `length`), page_row [1,M].

    Writes K/V of positions < length into the pages, returns (cache, sample of the next token,
    and, when echo, prompt logprobs [1,Tb] and their top ids/logprobs [1,Tb,TOP_N]).
    """
    m, rules = cfg.model, cfg.mesh.rules
    B, T = tokens.shape
    inv_freq = rope_frequencies(m)
    positions = default_positions(B, T)                                   # [1,Tb]
    pages, offsets = slot_indices(page_row, positions, positions < length, cache.page_size)
    x = take_rows(params["embedding"], tokens, compute_dtype(m))          # [1,Tb,D]

    def layer(carry, xs):
        x, cache = carry
        p, i = xs
        h = rms_norm(x, p["attn_norm"], m.norm_eps)
        q, k, v = project_qkv(p, h, positions, m, inv_freq)               # [1,Tb,N|K,H]
        cache = write_layer(cache, i, k, v, pages, offsets)
        attn = attention(q, k, v, q_positions=positions, kv_positions=positions, causal=True,
                         sliding_window=m.sliding_window, logit_softcap=m.attn_logit_softcap,
                         impl=m.attention_impl)                           # [1,Tb,N,H]
        x = _attn_out(p, x, attn)
        x = x + mlp(p, rms_norm(x, p["mlp_norm"], m.norm_eps), rules)
        return (x, cache), None

    (x, cache), _ = jax.lax.scan(layer, (x, cache), _layer_inputs(params, m))
    h = rms_norm(x, params["final_norm"], m.norm_eps)                    # [1,Tb,D]
    last = jax.lax.dynamic_slice_in_dim(h, length - 1, 1, axis=1)         # [1,1,D]
    logits = output_logits(params, last, m)[:, 0]                         # [1,V]
    out = sample(logits, temperature, top_k, top_p, key, jnp.zeros((B,), jnp.int32))
    if not echo:
        return cache, out, None
    logp, top_ids, top_lp = top_logprobs(output_logits(params, h, m).reshape(B * T, -1))
    nxt = jnp.roll(tokens, -1, axis=1).reshape(B * T)                     # token t+1 scored at t
    tok_lp = jnp.take_along_axis(logp, nxt[:, None], axis=-1).reshape(B, T)
    return cache, out, (tok_lp, top_ids.reshape(B, T, -1), top_lp.reshape(B, T, -1))


def decode_step(params: dict, cache: KVCache, tokens, positions, page_table, temperature, top_k,
                top_p, keys, steps, *, cfg: Config):
    """One token for every slot: tokens/positions [B] (position < 0 marks an idle slot).

    Returns (cache, (next tokens [B], their logprobs [B], top ids/logprobs [B,TOP_N])).
    """
    m, rules = cfg.model, cfg.mesh.rules
    inv_freq = rope_frequencies(m)
    active = positions >= 0
    pos = jnp.maximum(positions, 0)[:, None]                              # [B,1]
    lengths = jnp.where(active, positions + 1, 0).astype(jnp.int32)       # [B]
    pages, offsets = slot_indices(page_table, pos, active[:, None], cache.page_size)
    x = take_rows(params["embedding"], tokens[:, None], compute_dtype(m))  # [B,1,D]

    def layer(carry, xs):
        x, cache = carry
        p, i = xs
        h = rms_norm(x, p["attn_norm"], m.norm_eps)
        q, k, v = project_qkv(p, h, pos, m, inv_freq)                     # [B,1,N|K,H]
        cache = write_layer(cache, i, k, v, pages, offsets)
        kp, vp, ks, vs = cache.layer(i)                                   # [P,ps,K,H] (+[P,ps,K])
        attn = paged_attention(q, kp, vp, page_table, lengths, k_scales=ks, v_scales=vs,
                               sliding_window=m.sliding_window, logit_softcap=m.attn_logit_softcap,
                               impl=m.attention_impl).astype(x.dtype)     # [B,1,N,H]
        x = _attn_out(p, x, attn)
        x = x + mlp(p, rms_norm(x, p["mlp_norm"], m.norm_eps), rules)
        return (x, cache), None

    (x, cache), _ = jax.lax.scan(layer, (x, cache), _layer_inputs(params, m))
    logits = output_logits(params, rms_norm(x, params["final_norm"], m.norm_eps), m)[:, 0]  # [B,V]
    return cache, sample(logits, temperature, top_k, top_p, keys, steps)


def full_forward(params: dict, tokens, *, cfg: Config):
    """Cache-free forward of tokens [B,T] -> fp32 logits [B,T,V] (the exactness reference)."""
    m, rules = cfg.model, cfg.mesh.rules
    B, T = tokens.shape
    inv_freq = rope_frequencies(m)
    positions = default_positions(B, T)
    x = take_rows(params["embedding"], tokens, compute_dtype(m))

    def layer(x, p):
        h = rms_norm(x, p["attn_norm"], m.norm_eps)
        q, k, v = project_qkv(p, h, positions, m, inv_freq)
        attn = attention(q, k, v, q_positions=positions, kv_positions=positions, causal=True,
                         sliding_window=m.sliding_window, logit_softcap=m.attn_logit_softcap,
                         impl=m.attention_impl)
        x = _attn_out(p, x, attn)
        return x + mlp(p, rms_norm(x, p["mlp_norm"], m.norm_eps), rules), None

    x, _ = jax.lax.scan(layer, x, params["layers"])
    return output_logits(params, rms_norm(x, params["final_norm"], m.norm_eps), m)


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
