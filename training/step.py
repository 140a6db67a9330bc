"""The pure train and eval steps, and their jitted, sharded forms.

State is a plain dict {params, opt_state, step} of arrays (params in nnx's pure-dict layout), so
it jits, donates and checkpoints without framework objects. What is learnt is a task's `TaskLoss`;
the language model's (`lm_loss`) reads batches of [B,T] arrays: inputs, targets, positions,
segment_ids (0 = padding) and loss_mask.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from configs import Config
from model.loss import chunk_size, token_nll as chunked_token_nll
from sharding.rules import BATCH

BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


class TaskLoss(NamedTuple):
    """A task's objective, as the one train step uses it.

    loss_fn(graphdef, params, batch) -> (objective_sum, aux): the objective summed over one
    micro-batch, and a dict of scalar sums; aux["weight"] is what the objective is a sum over
    (tokens, weighted rows), and gradients are divided by its total over the whole batch.
    summarize(aux totals) -> the step's metrics, "loss" among them.
    """
    loss_fn: Callable
    summarize: Callable


def token_nll(graphdef, params: dict, batch: dict):
    """Per-token negative log-likelihood [B,T] (nats) and log-partition [B,T]; the fp32 logits
    are made in chunks of positions when a row's pass 1 GiB (model/loss.py, model.logits_chunk)."""
    model = nnx.merge(graphdef, params)
    h = model.backbone(batch["inputs"], batch["positions"], batch["segment_ids"])  # [B,T,D]
    cfg = model.cfg
    return chunked_token_nll(model.params(), h, batch["targets"], cfg, model.rules,
                             chunk_size(cfg, h.shape[1]), scan=cfg.scan_layers)


def lm_loss(z_loss: float) -> TaskLoss:
    """Next-token cross-entropy (plus z_loss * log_z^2) over unmasked tokens; the logged loss is the
    mean nll per token, without the z term."""
    def loss_fn(graphdef, params: dict, batch: dict):
        nll, log_z = token_nll(graphdef, params, batch)
        mask = batch["loss_mask"].astype(jnp.float32)
        nll_sum = jnp.sum(nll * mask)
        objective = nll_sum + z_loss * jnp.sum(jnp.square(log_z) * mask)
        return objective, {"weight": jnp.sum(mask), "nll_sum": nll_sum}

    def summarize(aux):
        return {"loss": aux["nll_sum"] / jnp.maximum(aux["weight"], 1.0), "tokens": aux["weight"]}

    return TaskLoss(loss_fn, summarize)


def train_step(state: dict, batch: dict, *, graphdef, optimizer: optax.GradientTransformation,
               schedule: optax.Schedule, cfg: Config, loss: TaskLoss | None = None) -> tuple[dict, dict]:
    """One optimizer step over `grad_accum` micro-batches of `loss` (default: the LM's); the
    gradient is that of the objective's mean over the whole batch."""
    loss = loss or lm_loss(cfg.train.z_loss)
    A = cfg.train.grad_accum
    micro = jax.tree.map(lambda x: x.reshape(A, x.shape[0] // A, *x.shape[1:]), batch)  # [A,B/A,...]
    grad_fn = jax.grad(lambda p, b: loss.loss_fn(graphdef, p, b), has_aux=True)

    def accumulate(carry, mb):
        grads, sums = carry
        g, aux = grad_fn(state["params"], mb)
        return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, aux)), None

    zeros = jax.tree.map(jnp.zeros_like, state["params"])
    # The aux sums are the task's: their structure comes from an abstract trace (nothing is computed).
    aux_shape = jax.eval_shape(lambda b: loss.loss_fn(graphdef, state["params"], b)[1],
                               jax.tree.map(lambda x: x[0], micro))
    no_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape)
    (grads, sums), _ = jax.lax.scan(accumulate, (zeros, no_sums), micro)
    # An all-padding batch has a zero objective, so zero gradients, whatever this floor is.
    grads = jax.tree.map(lambda g: g / jnp.maximum(sums["weight"], 1e-9), grads)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {**loss.summarize(sums), "grad_norm": optax.global_norm(grads), "lr": schedule(state["step"])}
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


def to_global(batch: dict, shardings: dict) -> dict:
    """This process's rows -> global arrays, each key in its sharding (split over the data axes)."""
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v)) for k, v in batch.items()}


def jit_train_step(cfg: Config, graphdef, optimizer, schedule, mesh: Mesh, state_shardings,
                   loss: TaskLoss | None = None, batch_shardings: dict | None = None) -> Callable:
    """train_step under jit with explicit shardings and the state donated; `loss` and the
    shardings of its batch's keys default to the language model's.

    The mesh is put in context while tracing, so the model's activation constraints
    (sharding.rules.constrain) and the shard_map around Pallas kernels see it; without it they
    are no-ops and XLA guesses activation layouts (more memory, more communication)."""
    def fn(state, batch):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return train_step(state, batch, graphdef=graphdef, optimizer=optimizer, schedule=schedule, cfg=cfg,
                              loss=loss)
    data = batch_shardings or {k: batch_sharding(mesh) for k in BATCH_KEYS}
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(fn, in_shardings=(state_shardings, data), out_shardings=(state_shardings, replicated),
                   donate_argnums=0)


def jit_eval_step(graphdef, mesh: Mesh, param_shardings) -> Callable:
    """eval_step under jit; token_bytes is replicated."""
    data = {k: batch_sharding(mesh) for k in BATCH_KEYS}
    replicated = NamedSharding(mesh, PartitionSpec())
    fn = lambda params, batch, token_bytes: eval_step(params, batch, token_bytes, graphdef=graphdef)
    return jax.jit(fn, in_shardings=(param_shardings, data, replicated), out_shardings=replicated)
