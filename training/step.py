"""The pure train and eval steps, and their jitted, sharded forms.

State is a plain dict {params, opt_state, step} of arrays (params in nnx's pure-dict layout), so
it jits, donates and checkpoints without framework objects. Batches are dicts of [B,T] arrays:
inputs, targets, positions, segment_ids (0 = padding) and loss_mask.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from configs import Config
from sharding.rules import BATCH

BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


def token_nll(graphdef, params: dict, batch: dict):
    """Per-token negative log-likelihood [B,T] (nats) and log-partition [B,T]."""
    model = nnx.merge(graphdef, params)
    logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])  # [B,T,V] fp32
    log_z = jax.nn.logsumexp(logits, axis=-1)                                  # [B,T]
    target_logit = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    return log_z - target_logit, log_z


def loss_sums(graphdef, params: dict, batch: dict, z_loss: float):
    """(objective summed over unmasked tokens, (nll sum, token count)) for one micro-batch."""
    nll, log_z = token_nll(graphdef, params, batch)
    mask = batch["loss_mask"].astype(jnp.float32)
    nll_sum = jnp.sum(nll * mask)
    objective = nll_sum + z_loss * jnp.sum(jnp.square(log_z) * mask)
    return objective, (nll_sum, jnp.sum(mask))


def train_step(state: dict, batch: dict, *, graphdef, optimizer: optax.GradientTransformation,
               schedule: optax.Schedule, cfg: Config) -> tuple[dict, dict]:
    """One optimizer step over `grad_accum` micro-batches; loss is the mean over all tokens."""
    A = cfg.train.grad_accum
    micro = jax.tree.map(lambda x: x.reshape(A, x.shape[0] // A, *x.shape[1:]), batch)  # [A,B/A,T]
    grad_fn = jax.grad(lambda p, b: loss_sums(graphdef, p, b, cfg.train.z_loss), has_aux=True)

    def accumulate(carry, mb):
        grads, nll_sum, tokens = carry
        g, (n, t) = grad_fn(state["params"], mb)
        return (jax.tree.map(jnp.add, grads, g), nll_sum + n, tokens + t), None

    zeros = jax.tree.map(jnp.zeros_like, state["params"])
    (grads, nll_sum, tokens), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0), micro)
    denom = jnp.maximum(tokens, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": nll_sum / denom, "grad_norm": optax.global_norm(grads),
               "lr": schedule(state["step"]), "tokens": tokens}
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics


def eval_step(params: dict, batch: dict, token_bytes: jax.Array, *, graphdef) -> dict:
    """Sums for validation loss and bits per byte: nll (nats), tokens, UTF-8 bytes of targets."""
    nll, _ = token_nll(graphdef, params, batch)
    mask = batch["loss_mask"].astype(jnp.float32)
    return {"nll_sum": jnp.sum(nll * mask), "tokens": jnp.sum(mask),
            "bytes": jnp.sum(token_bytes[batch["targets"]] * mask)}


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows split over the data-parallel axes, sequence whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH, None))


def jit_train_step(cfg: Config, graphdef, optimizer, schedule, mesh: Mesh, state_shardings) -> Callable:
    """train_step under jit with explicit shardings and the state donated.

    The mesh is put in context while tracing, so the model's activation constraints
    (sharding.rules.constrain) and the shard_map around Pallas kernels see it; without it they
    are no-ops and XLA guesses activation layouts (more memory, more communication)."""
    def fn(state, batch):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return train_step(state, batch, graphdef=graphdef, optimizer=optimizer, schedule=schedule, cfg=cfg)
    data = {k: batch_sharding(mesh) for k in BATCH_KEYS}
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(fn, in_shardings=(state_shardings, data), out_shardings=(state_shardings, replicated),
                   donate_argnums=0)


def jit_eval_step(graphdef, mesh: Mesh, param_shardings) -> Callable:
    """eval_step under jit; token_bytes is replicated."""
    data = {k: batch_sharding(mesh) for k in BATCH_KEYS}
    replicated = NamedSharding(mesh, PartitionSpec())
    fn = lambda params, batch, token_bytes: eval_step(params, batch, token_bytes, graphdef=graphdef)
    return jax.jit(fn, in_shardings=(param_shardings, data, replicated), out_shardings=replicated)
