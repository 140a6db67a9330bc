"""A Llama-family decoder as an NNX module: per-layer weights stacked along L and run under scan.

Weights are plain arrays with a leading layer axis, so one block function serves scan, the
unrolled loop, remat and the serving engine. Variants by config: GQA, tied embeddings, q/k/v
bias (Qwen2), q/k RMSNorm (Qwen3), sliding window (Mistral), Llama-3 RoPE scaling.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from configs import ModelConfig
from model.attention import attention
from model.kernels.reference import default_positions
from model.layers import apply_rope, compute_dtype, linear, param, rms_norm, rope_frequencies
from sharding.rules import constrain

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_saveable,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Layers(nnx.Module):
    """All L decoder blocks' weights, each with a leading `layers` axis."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        L, D, N, K, H, F = (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads,
                            cfg.resolved_head_dim, cfg.mlp_dim)
        dt, std = jnp.dtype(cfg.param_dtype), cfg.init_std
        p = lambda shape, axes, init="normal": param(rngs, shape, axes, dt, init, std)
        self.attn_norm = p((L, D), ("layers", "norm"), "ones")
        self.wq = p((L, D, N, H), ("layers", "embed", "heads", "head_dim"))
        self.wk = p((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"))
        self.wv = p((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"))
        self.wo = p((L, N, H, D), ("layers", "heads", "head_dim", "embed"))
        if cfg.qkv_bias:
            self.bq = p((L, N, H), ("layers", "heads", "head_dim"), "zeros")
            self.bk = p((L, K, H), ("layers", "kv_heads", "head_dim"), "zeros")
            self.bv = p((L, K, H), ("layers", "kv_heads", "head_dim"), "zeros")
        if cfg.qk_norm:
            self.q_norm = p((L, H), ("layers", "norm"), "ones")
            self.k_norm = p((L, H), ("layers", "norm"), "ones")
        self.mlp_norm = p((L, D), ("layers", "norm"), "ones")
        self.w_gate = p((L, D, F), ("layers", "embed", "mlp"))
        self.w_up = p((L, D, F), ("layers", "embed", "mlp"))
        self.w_down = p((L, F, D), ("layers", "mlp", "embed"))


def project_qkv(p: dict, x: jax.Array, positions: jax.Array, cfg: ModelConfig, inv_freq):
    """Normed x [B,T,D] -> rotated q [B,T,N,H], k [B,T,K,H], v [B,T,K,H] for one layer."""
    q = linear("BTD,DNH->BTNH", x, p["wq"])
    k = linear("BTD,DKH->BTKH", x, p["wk"])
    v = linear("BTD,DKH->BTKH", x, p["wv"])
    if cfg.qkv_bias:
        q, k, v = q + p["bq"].astype(q.dtype), k + p["bk"].astype(k.dtype), v + p["bv"].astype(v.dtype)
    if cfg.qk_norm:
        q, k = rms_norm(q, p["q_norm"], cfg.norm_eps), rms_norm(k, p["k_norm"], cfg.norm_eps)
    return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v


def mlp(p: dict, x: jax.Array, rules: str) -> jax.Array:
    """SwiGLU: [B,T,D] -> [B,T,D]."""
    gate = linear("BTD,DF->BTF", x, p["w_gate"])
    up = linear("BTD,DF->BTF", x, p["w_up"])
    h = constrain(jax.nn.silu(gate) * up, ("batch", "seq", "act_mlp"), rules)
    return linear("BTF,FD->BTD", h, p["w_down"])


def block(p: dict, x: jax.Array, positions, segment_ids, cfg: ModelConfig, rules: str) -> jax.Array:
    """One pre-norm decoder block on [B,T,D] with full (training/prefill) attention."""
    inv_freq = rope_frequencies(cfg)
    h = rms_norm(x, p["attn_norm"], cfg.norm_eps)
    q, k, v = project_qkv(p, h, positions, cfg, inv_freq)
    q = constrain(q, ("batch", "seq", "act_heads", None), rules)
    attn = attention(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                     q_positions=positions, kv_positions=positions, causal=True,
                     sliding_window=cfg.sliding_window, logit_softcap=cfg.attn_logit_softcap,
                     impl=cfg.attention_impl, block_q=cfg.attn_block_q,
                     block_kv=cfg.attn_block_kv)                               # [B,T,N,H]
    x = x + linear("BTNH,NHD->BTD", attn, p["wo"])
    x = x + mlp(p, rms_norm(x, p["mlp_norm"], cfg.norm_eps), rules)
    return constrain(x, ("batch", "seq", "act_embed"), rules)


class Transformer(nnx.Module):
    """Decoder-only LM. `rules` names the logical-axis table used for activation constraints."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, rules: str = "fsdp"):
        self.cfg, self.rules = cfg, rules
        dt = jnp.dtype(cfg.param_dtype)
        self.embedding = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), dt, std=cfg.init_std)
        self.layers = Layers(cfg, rngs)
        self.final_norm = param(rngs, (cfg.d_model,), ("norm",), dt, "ones")
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), dt, std=cfg.init_std)

    def embed(self, tokens: jax.Array) -> jax.Array:
        """tokens [B,T] -> [B,T,D] in the compute dtype."""
        # Gather from a replicated table: a lookup into a sharded table makes XLA replicate anyway.
        table = constrain(self.embedding[...], (None, None), self.rules)  # [V,D]
        x = jnp.take(table, tokens, axis=0).astype(compute_dtype(self.cfg))
        return constrain(x, ("batch", "seq", "act_embed"), self.rules)

    def backbone(self, tokens, positions=None, segment_ids=None) -> jax.Array:
        """tokens [B,T] -> final normed hidden states [B,T,D]."""
        cfg = self.cfg
        B, T = tokens.shape
        positions = default_positions(B, T) if positions is None else positions
        segment_ids = jnp.ones((B, T), jnp.int32) if segment_ids is None else segment_ids
        layer_params = nnx.to_pure_dict(nnx.state(self.layers))
        step = lambda x, p: block(p, x, positions, segment_ids, cfg, self.rules)
        if cfg.remat != "none":
            step = jax.checkpoint(step, policy=REMAT_POLICIES[cfg.remat])
        x = self.embed(tokens)
        if cfg.scan_layers:
            x, _ = jax.lax.scan(lambda x, p: (step(x, p), None), x, layer_params)
        else:
            for i in range(cfg.n_layers):
                x = step(x, jax.tree.map(lambda w: w[i], layer_params))
        return rms_norm(x, self.final_norm[...], cfg.norm_eps)

    def logits(self, h: jax.Array) -> jax.Array:
        """Hidden [B,T,D] -> fp32 logits [B,T,V]."""
        w = self.embedding[...].T if self.cfg.tie_embeddings else self.lm_head[...]  # [D,V]
        logits = linear("BTD,DV->BTV", h, w).astype(jnp.float32)
        return constrain(logits, ("batch", "seq", "act_vocab"), self.rules)

    def __call__(self, tokens, positions=None, segment_ids=None) -> jax.Array:
        """tokens [B,T] (positions, segment_ids [B,T] for packed rows) -> logits [B,T,V]."""
        return self.logits(self.backbone(tokens, positions, segment_ids))
