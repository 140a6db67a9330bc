"""Parameter counts and model FLOPs per token, from the config alone."""
from __future__ import annotations

from configs import ModelConfig


def param_count(cfg: ModelConfig) -> int:
    """Exact parameter count of model.transformer.Transformer for this config."""
    D, N, K, H, F, L, V = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim,
                           cfg.mlp_dim, cfg.n_layers, cfg.vocab_size)
    attn = D * N * H + 2 * D * K * H + N * H * D
    if cfg.qkv_bias:
        attn += N * H + 2 * K * H
    if cfg.qk_norm:
        attn += 2 * H
    per_layer = attn + 3 * D * F + 2 * D
    head = 0 if cfg.tie_embeddings else D * V
    return V * D + L * per_layer + D + head


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True) -> float:
    """Model FLOPs per token: 2 per weight multiply-add, attention counted once (causal half).

    forward = 2 * (matmul weights, including the output projection, excluding the embedding
    lookup) + 2 * 2 * L * N * H * S_eff, where S_eff is the mean number of visible keys:
    (T + 1) / 2 for causal attention, or about the window W when W < T. Training = 3 x forward
    (backward is twice the forward). Remat recomputation is not counted (it is not model work).
    """
    D, N, K, H, F, L, V = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim,
                           cfg.mlp_dim, cfg.n_layers, cfg.vocab_size)
    matmul_weights = L * (D * N * H + 2 * D * K * H + N * H * D + 3 * D * F) + D * V
    visible = (seq_len + 1) / 2
    if cfg.sliding_window and cfg.sliding_window < seq_len:
        W = cfg.sliding_window
        visible = (W * (W + 1) / 2 + (seq_len - W) * W) / seq_len
    forward = 2 * matmul_weights + 4 * L * N * H * visible
    return 3 * forward if training else forward
