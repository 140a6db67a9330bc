"""A Llama-family decoder: weights in an NNX module, the forward pass as pure functions of them.

Weights are plain arrays with a leading layer axis, run under scan. `block` is the only decoder
layer: training, evaluation, classification, serving prefill and decode all run it, and differ
only in the `attend` function they hand it (full attention over the rows themselves, or writes
into and reads from the paged KV cache, serving/decode.py) and the `state` it threads through the
layers (the cache). int8 weights (model/quant.py QArrays) go through the same `linear` and
`embed`. Variants by config: GQA, tied embeddings, q/k/v bias (Qwen2), q/k RMSNorm (Qwen3),
sliding window (Mistral), Llama-3 or linear RoPE scaling, and Gemma 2/3's GeGLU, (1 + w) norms,
scaled embeddings, post norms, soft caps, query_pre_attn_scalar and alternating local/global
layers (`global_every`), run as a scan over groups of layers with static per-layer windows.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from configs import ModelConfig
from model.attention import attention
from model.kernels.reference import default_positions
from model.layers import (apply_rope, compute_dtype, gated_activation, linear, param, rms_norm,
                          rope_frequencies)
from model.quant import QArray, take_rows
from sharding.rules import constrain

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_saveable,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# Below this many rows the gate and up weights are not stacked into one matmul: stacking copies
# them, which a training batch amortises (10% faster CPU steps at 2048 rows, docs/results.md) but
# decode steps and serving's prefill chunks, bound by reading the weights, would pay in full.
FUSED_GATE_UP_MIN_ROWS = 2048

# attend(q [B,T,N,H], k, v [B,T,K,H], layer index, state, window) -> (attention output [B,T,N,H],
# state); window is the layer's static sliding window (0 = full causal).
Attend = Callable[..., tuple[jax.Array, object]]


class Layers(nnx.Module):
    """All L decoder blocks' weights, each with a leading `layers` axis."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        L, D, N, K, H, F = (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads,
                            cfg.resolved_head_dim, cfg.mlp_dim)
        dt, std = jnp.dtype(cfg.param_dtype), cfg.init_std
        p = lambda shape, axes, init="normal": param(rngs, shape, axes, dt, init, std)
        one = 1.0 - cfg.norm_offset  # norm weights stored as HF does; effective scale starts at 1
        self.attn_norm = p((L, D), ("layers", "norm"), one)
        self.wq = p((L, D, N, H), ("layers", "embed", "heads", "head_dim"))
        self.wk = p((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"))
        self.wv = p((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"))
        self.wo = p((L, N, H, D), ("layers", "heads", "head_dim", "embed"))
        if cfg.qkv_bias:
            self.bq = p((L, N, H), ("layers", "heads", "head_dim"), "zeros")
            self.bk = p((L, K, H), ("layers", "kv_heads", "head_dim"), "zeros")
            self.bv = p((L, K, H), ("layers", "kv_heads", "head_dim"), "zeros")
        if cfg.qk_norm:
            self.q_norm = p((L, H), ("layers", "norm"), one)
            self.k_norm = p((L, H), ("layers", "norm"), one)
        if cfg.post_norms:
            self.post_attn_norm = p((L, D), ("layers", "norm"), one)
            self.post_mlp_norm = p((L, D), ("layers", "norm"), one)
        self.mlp_norm = p((L, D), ("layers", "norm"), one)
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
        q = rms_norm(q, p["q_norm"], cfg.norm_eps, cfg.norm_offset)
        k = rms_norm(k, p["k_norm"], cfg.norm_eps, cfg.norm_offset)
    q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    H = cfg.resolved_head_dim
    if cfg.query_pre_attn_scalar and cfg.query_pre_attn_scalar != H:
        # The kernels scale logits by H**-0.5; the model wants query_pre_attn_scalar**-0.5.
        q = q * jnp.asarray((H / cfg.query_pre_attn_scalar) ** 0.5, q.dtype)
    return q, k, v


def mlp(p: dict, x: jax.Array, cfg: ModelConfig, rules: str) -> jax.Array:
    """Gated MLP, SwiGLU or GeGLU (tanh GELU): [B,T,D] -> [B,T,D]."""
    if isinstance(p["w_gate"], QArray) or x.shape[0] * x.shape[1] < FUSED_GATE_UP_MIN_ROWS:
        gate, up = linear("BTD,DF->BTF", x, p["w_gate"]), linear("BTD,DF->BTF", x, p["w_up"])
    else:  # one matmul for both: [D,2,F] is [D,2F] in memory, and F keeps its sharding
        w = jnp.stack([p["w_gate"], p["w_up"]], axis=1)
        both = linear("BTD,DCF->BTCF", x, w)                                # [B,T,2,F]
        gate, up = both[:, :, 0], both[:, :, 1]
    h = constrain(gated_activation(gate, up, cfg.mlp_activation), ("batch", "seq", "act_mlp"), rules)
    return linear("BTF,FD->BTD", h, p["w_down"])


def layer_kinds(cfg: ModelConfig) -> tuple[tuple[int, bool], ...]:
    """(static sliding window, local RoPE) of every layer: all alike when global_every is 0, else
    layer i is global (full attention, rope_theta, scaled) iff (i+1) % global_every == 0."""
    g = cfg.global_every
    if not g:
        return ((cfg.sliding_window, False),) * cfg.n_layers
    return tuple((0, False) if (i + 1) % g == 0 else (cfg.sliding_window, True) for i in range(cfg.n_layers))


def full_attention(cfg: ModelConfig, positions, segment_ids=None) -> Attend:
    """`attend` for causal attention of rows over themselves: training, evaluation, prefill."""
    def attend(q, k, v, layer, state, window):
        out = attention(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                        q_positions=positions, kv_positions=positions, causal=True,
                        sliding_window=window, logit_softcap=cfg.attn_logit_softcap,
                        impl=cfg.attention_impl, block_q=cfg.attn_block_q, block_kv=cfg.attn_block_kv,
                        self_attention=True)
        return out, state                                                   # [B,T,N,H]
    return attend


def block(p: dict, x: jax.Array, positions, attend: Attend, layer, state, cfg: ModelConfig, rules: str,
          kind: tuple[int, bool]):
    """One pre-norm decoder block on x [B,T,D] -> (x [B,T,D], attention state). kind: the
    layer's (static window, local RoPE), from layer_kinds."""
    window, local = kind
    norm = lambda y, w: rms_norm(y, w, cfg.norm_eps, cfg.norm_offset)
    q, k, v = project_qkv(p, norm(x, p["attn_norm"]), positions, cfg, rope_frequencies(cfg, local))
    q = constrain(q, ("batch", "seq", "act_heads", None), rules)
    attn, state = attend(q, k, v, layer, state, window)                     # [B,T,N,H]
    out = linear("BTNH,NHD->BTD", attn, p["wo"])
    x = x + (norm(out, p["post_attn_norm"]) if cfg.post_norms else out)
    out = mlp(p, norm(x, p["mlp_norm"]), cfg, rules)
    x = x + (norm(out, p["post_mlp_norm"]) if cfg.post_norms else out)
    return constrain(x, ("batch", "seq", "act_embed"), rules), state


def embed(params: dict, tokens: jax.Array, cfg: ModelConfig, rules: str) -> jax.Array:
    """tokens [B,T] -> [B,T,D] in the compute dtype, from a float or a row-quantized int8 table."""
    table = params["embedding"]                                             # [V,D]
    if not isinstance(table, QArray):
        # Gather from a replicated table: a lookup into a sharded table makes XLA replicate anyway.
        table = constrain(table, (None, None), rules)
    x = take_rows(table, tokens, compute_dtype(cfg))
    if cfg.embed_scale:  # as HF Gemma: the normalizer sqrt(D) rounded to the compute dtype
        x = x * jnp.asarray(cfg.d_model ** 0.5, x.dtype)
    return constrain(x, ("batch", "seq", "act_embed"), rules)


def decoder(params: dict, x: jax.Array, positions, attend: Attend, cfg: ModelConfig, rules: str,
            state=None, *, remat: str = "none", scan: bool = True):
    """The L blocks over embedded x [B,T,D] -> (final-normed hidden [B,T,D], attention state).

    `state` rides along the layers (the paged KV cache when serving), so with donation XLA
    updates it in place; `remat` is a REMAT_POLICIES key, for training only. Layers run as a
    scan over groups of g = global_every layers (weights [L/g, g, ...], the g blocks unrolled in
    the body, each with its static window and RoPE), then a scan over the L % g local layers left.
    """
    kinds = layer_kinds(cfg)

    def one(carry, p, layer, kind):
        x, state = carry
        return block(p, x, positions, attend, layer, state, cfg, rules, kind)

    if remat != "none":
        one = jax.checkpoint(one, policy=REMAT_POLICIES[remat], static_argnums=(3,))
    L, g = cfg.n_layers, max(cfg.global_every, 1)
    carry = (x, state)
    xs = (params["layers"], jnp.arange(L, dtype=jnp.int32))
    if not scan:
        for i in range(L):
            carry = one(carry, *jax.tree.map(lambda w: w[i], xs), kinds[i])
    else:
        full = L - L % g if g > 1 else 0  # g = 1: one plain scan, no [L, 1, ...] reshape

        def group(carry, xs):                                               # xs: [g, ...] leaves
            for j in range(g):
                carry = one(carry, *jax.tree.map(lambda w: w[j], xs), kinds[j])
            return carry, None

        if full:
            grouped = jax.tree.map(lambda w: w[:full].reshape(full // g, g, *w.shape[1:]), xs)
            carry, _ = jax.lax.scan(group, carry, grouped)
        if full < L:  # the leftover layers (all of them when g = 1) are one kind: a plain scan
            rest = lambda carry, xs: (one(carry, *xs, kinds[full]), None)
            carry, _ = jax.lax.scan(rest, carry, jax.tree.map(lambda w: w[full:], xs) if full else xs)
    x, state = carry
    return rms_norm(x, params["final_norm"], cfg.norm_eps, cfg.norm_offset), state


def logits(params: dict, h: jax.Array, cfg: ModelConfig, rules: str) -> jax.Array:
    """Hidden [B,T,D] -> fp32 logits [B,T,V]: tied or separate head, float or int8."""
    if cfg.tie_embeddings and isinstance(params["embedding"], QArray):
        out = params["embedding"].matmul_rows(h).astype(jnp.float32)       # int8 [V,D] in place
    else:
        w = params["embedding"].T if cfg.tie_embeddings else params["lm_head"]  # [D,V]
        out = linear("BTD,DV->BTV", h, w).astype(jnp.float32)
    if cfg.final_logit_softcap:
        out = cfg.final_logit_softcap * jnp.tanh(out / cfg.final_logit_softcap)
    return constrain(out, ("batch", "seq", "act_vocab"), rules)


def hidden(params: dict, tokens, cfg: ModelConfig, rules: str, positions=None, segment_ids=None,
           *, remat: str = "none", scan: bool = True) -> jax.Array:
    """Cache-free pass of tokens [B,T] (positions, segment_ids [B,T] for packed rows) over
    pure-dict params -> final hidden [B,T,D]."""
    B, T = tokens.shape
    positions = default_positions(B, T) if positions is None else positions
    attend = full_attention(cfg, positions, segment_ids)
    h, _ = decoder(params, embed(params, tokens, cfg, rules), positions, attend, cfg, rules,
                   remat=remat, scan=scan)
    return h


def forward(params: dict, tokens, cfg: ModelConfig, rules: str, positions=None, segment_ids=None) -> jax.Array:
    """Cache-free tokens [B,T] -> fp32 logits [B,T,V] (the reference the serving tests use)."""
    return logits(params, hidden(params, tokens, cfg, rules, positions, segment_ids), cfg, rules)


class Transformer(nnx.Module):
    """Decoder-only LM parameters; its methods run the pure functions above on them.

    `rules` names the logical-axis table used for activation constraints.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, rules: str = "fsdp"):
        self.cfg, self.rules = cfg, rules
        dt = jnp.dtype(cfg.param_dtype)
        self.embedding = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), dt, std=cfg.init_std)
        self.layers = Layers(cfg, rngs)
        self.final_norm = param(rngs, (cfg.d_model,), ("norm",), dt, 1.0 - cfg.norm_offset)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), dt, std=cfg.init_std)

    def params(self) -> dict:
        """The weights as a pure dict of arrays (the layout the functions above take)."""
        return nnx.to_pure_dict(nnx.state(self))

    def embed(self, tokens: jax.Array) -> jax.Array:
        """tokens [B,T] -> [B,T,D] in the compute dtype."""
        return embed(self.params(), tokens, self.cfg, self.rules)

    def backbone(self, tokens, positions=None, segment_ids=None) -> jax.Array:
        """tokens [B,T] (positions, segment_ids [B,T] for packed rows) -> final hidden [B,T,D]."""
        return hidden(self.params(), tokens, self.cfg, self.rules, positions, segment_ids,
                      remat=self.cfg.remat, scan=self.cfg.scan_layers)

    def logits(self, h: jax.Array) -> jax.Array:
        """Hidden [B,T,D] -> fp32 logits [B,T,V]."""
        return logits(self.params(), h, self.cfg, self.rules)

    def __call__(self, tokens, positions=None, segment_ids=None) -> jax.Array:
        """tokens [B,T] (positions, segment_ids [B,T] for packed rows) -> logits [B,T,V]."""
        return self.logits(self.backbone(tokens, positions, segment_ids))
