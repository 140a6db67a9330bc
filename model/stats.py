"""Parameter counts and model FLOPs per token, from the config alone."""
from __future__ import annotations

from configs import ModelConfig
from model.transformer import layer_kinds


def param_count(cfg: ModelConfig) -> int:
    """Exact parameter count of model.transformer.Transformer for this config."""
    D, N, K, H, F, L, V = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim,
                           cfg.mlp_dim, cfg.n_layers, cfg.vocab_size)
    attn = D * N * H + 2 * D * K * H + N * H * D
    if cfg.qkv_bias:
        attn += N * H + 2 * K * H
    if cfg.qk_norm:
        attn += 2 * H
    per_layer = attn + 3 * D * F + (4 if cfg.post_norms else 2) * D
    head = 0 if cfg.tie_embeddings else D * V
    return V * D + L * per_layer + D + head


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True) -> float:
    """Model FLOPs per token: 2 per weight multiply-add, attention counted once (causal half).

    forward = 2 * (matmul weights, including the output projection, excluding the embedding
    lookup) + 2 * 2 * N * H * (sum over layers of S_eff), where S_eff is the mean number of
    visible keys: (T + 1) / 2 for causal attention, or about the layer's window W when W < T.
    Training = 3 x forward (backward is twice the forward). Remat recomputation is not counted (it is not model work).
    """
    D, N, K, H, F, L, V = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim,
                           cfg.mlp_dim, cfg.n_layers, cfg.vocab_size)
    matmul_weights = L * (D * N * H + 2 * D * K * H + N * H * D + 3 * D * F) + D * V

    def visible(W: int) -> float:
        if W and W < seq_len:
            return (W * (W + 1) / 2 + (seq_len - W) * W) / seq_len
        return (seq_len + 1) / 2

    visible_sum = sum(visible(W) for W, _ in layer_kinds(cfg))  # per layer: its own window
    forward = 2 * matmul_weights + 4 * N * H * visible_sum
    return 3 * forward if training else forward
