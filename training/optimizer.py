"""AdamW with warmup + decay schedules, global-norm clipping, and no decay on norms and biases."""
from __future__ import annotations

import jax
import optax

from configs import TrainConfig

NO_DECAY = ("attn_norm", "mlp_norm", "post_attn_norm", "post_mlp_norm", "final_norm", "q_norm", "k_norm", "bq", "bk",
            "bv")


def learning_rate(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup to cfg.lr, then cosine / linear decay to lr * min_lr_ratio, or constant."""
    warmup = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
    decay_steps = max(cfg.steps - cfg.warmup_steps, 1)
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, end, decay_steps)
    else:
        decay = optax.constant_schedule(cfg.lr)
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def decay_mask(params: dict) -> dict:
    """True for weights that get weight decay: matrices, not norm scales or biases."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) not in NO_DECAY, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """The full update rule applied once per (accumulated) step."""
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    parts.append(optax.adamw(learning_rate(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)
