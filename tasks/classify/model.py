"""The classifier: the decoder backbone, a pooling of its hidden states, and a linear head.

Parameters are {"backbone": <Transformer params>, "head_w": [D,C], "head_b": [C]}, so a language
model's params drop into "backbone" unchanged (fine-tuning from a Tessera or Hugging Face
checkpoint). The jitted steps take params as a pure dict, as training/step.py does.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from configs import Config, ModelConfig
from model.layers import param
from model.transformer import Transformer
from model.init import match_shardings, pure_shardings
from sharding.rules import BATCH, RULES, state_shardings

BATCH_KEYS = ("tokens", "lengths", "labels", "valid")


def pool(h: jax.Array, lengths: jax.Array, how: str) -> jax.Array:
    """Hidden [B,T,D] -> [B,D]: the last real token (it has attended to the whole text under the
    causal mask) or the mean over real tokens. Rows are right-padded to `lengths` [B]."""
    if how == "last":
        idx = jnp.maximum(lengths - 1, 0)[:, None, None]                    # [B,1,1]
        return jnp.take_along_axis(h, idx, axis=1)[:, 0]                     # [B,D]
    mask = (jnp.arange(h.shape[1])[None, :] < lengths[:, None]).astype(h.dtype)  # [B,T]
    total = jnp.einsum("BTD,BT->BD", h, mask)
    return total / jnp.maximum(lengths, 1)[:, None].astype(h.dtype)


class Classifier(nnx.Module):
    """Transformer backbone + pooling + Linear D->C head (fp32 logits)."""

    def __init__(self, cfg: ModelConfig, num_classes: int, pooling: str, *, rngs: nnx.Rngs,
                 rules: str = "fsdp"):
        self.pooling = pooling
        self.backbone = Transformer(cfg, rngs=rngs, rules=rules)
        dt = jnp.dtype(cfg.param_dtype)
        self.head_w = param(rngs, (cfg.d_model, num_classes), ("embed", None), dt, std=cfg.init_std)
        self.head_b = param(rngs, (num_classes,), (None,), dt, "zeros")

    def __call__(self, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
        """tokens [B,T] right-padded, lengths [B] -> logits [B,C] (fp32)."""
        T = tokens.shape[1]
        segment_ids = (jnp.arange(T)[None, :] < lengths[:, None]).astype(jnp.int32)  # [B,T], 0 = pad
        h = self.backbone.backbone(tokens, None, segment_ids)                # [B,T,D]
        pooled = pool(h, lengths, self.pooling).astype(jnp.float32)          # [B,D]
        return pooled @ self.head_w[...].astype(jnp.float32) + self.head_b[...].astype(jnp.float32)


def build(cfg: Config, num_classes: int, rules: str | None = None, seed: int | None = None) -> Classifier:
    seed = cfg.train.seed if seed is None else seed
    return Classifier(cfg.model, num_classes, cfg.task.pooling, rngs=nnx.Rngs(seed),
                      rules=rules or cfg.mesh.rules)


def layout(cfg: Config, num_classes: int, mesh: Mesh, optimizer=None, rules: str | None = None):
    """(graphdef, abstract state, state shardings) for params (and opt_state/step with an optimizer),
    all in the pure-dict layout; nothing is allocated."""
    rules = rules or cfg.mesh.rules
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build(cfg, num_classes, rules)))
    param_sh = pure_shardings(state_shardings(abstract, mesh, RULES[rules]))
    params = nnx.to_pure_dict(abstract)
    if optimizer is None:
        return graphdef, {"params": params}, {"params": param_sh}
    opt_abstract = jax.eval_shape(optimizer.init, params)
    state = {"params": params, "opt_state": opt_abstract, "step": jax.ShapeDtypeStruct((), jnp.int32)}
    shardings = {"params": param_sh, "opt_state": match_shardings(opt_abstract, param_sh, mesh),
                 "step": NamedSharding(mesh, PartitionSpec())}
    return graphdef, state, shardings


def init_state(cfg: Config, num_classes: int, optimizer, shardings, backbone: dict | None = None) -> dict:
    """Fresh train state created inside jit in its shardings; `backbone` (pure-dict LM params)
    replaces the random backbone when fine-tuning from a checkpoint."""
    def init(backbone):
        params = nnx.to_pure_dict(nnx.state(build(cfg, num_classes)))
        if backbone is not None:
            params["backbone"] = backbone
        return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}

    if backbone is None:
        return jax.jit(lambda: init(None), out_shardings=shardings)()
    return jax.jit(init, in_shardings=(shardings["params"]["backbone"],), out_shardings=shardings)(backbone)


def batch_shardings(mesh: Mesh) -> dict:
    rows = NamedSharding(mesh, PartitionSpec(BATCH))
    return {"tokens": NamedSharding(mesh, PartitionSpec(BATCH, None)), "lengths": rows, "labels": rows,
            "valid": rows}


def loss_sums(graphdef, params: dict, batch: dict, weights: jax.Array):
    """(weighted NLL sum, (weight sum, unweighted NLL sum, correct count, row count)). Padding rows
    (valid 0) add nothing; class weights scale each row's NLL by its true class's weight."""
    logits = nnx.merge(graphdef, params)(batch["tokens"], batch["lengths"])   # [B,C]
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["labels"][:, None], axis=-1)[:, 0]
    valid = batch["valid"]
    w = weights[batch["labels"]] * valid
    correct = jnp.sum((jnp.argmax(logits, -1) == batch["labels"]) * valid)
    return jnp.sum(w * nll), (jnp.sum(w), jnp.sum(nll * valid), correct, jnp.sum(valid))


def train_step(state: dict, batch: dict, weights: jax.Array, *, graphdef, optimizer, schedule,
               grad_accum: int) -> tuple[dict, dict]:
    """One optimizer step over `grad_accum` micro-batches; the loss is the weighted mean NLL."""
    A = grad_accum
    micro = jax.tree.map(lambda x: x.reshape(A, x.shape[0] // A, *x.shape[1:]), batch)  # [A,B/A,...]
    grad_fn = jax.grad(lambda p, b: loss_sums(graphdef, p, b, weights), has_aux=True)

    def accumulate(carry, mb):
        grads, sums = carry
        g, aux = grad_fn(state["params"], mb)
        return (jax.tree.map(jnp.add, grads, g), tuple(s + a for s, a in zip(sums, aux))), None

    zeros = jax.tree.map(jnp.zeros_like, state["params"])
    (grads, (wsum, nll, correct, rows)), _ = jax.lax.scan(accumulate, (zeros, (0.0,) * 4), micro)
    grads = jax.tree.map(lambda g: g / jnp.maximum(wsum, 1e-9), grads)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": nll / jnp.maximum(rows, 1.0), "accuracy": correct / jnp.maximum(rows, 1.0),
               "grad_norm": optax.global_norm(grads), "lr": schedule(state["step"])}
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics


def jit_train_step(graphdef, optimizer, schedule, grad_accum: int, mesh: Mesh, state_sh):
    fn = lambda state, batch, weights: train_step(state, batch, weights, graphdef=graphdef, optimizer=optimizer,
                                                  schedule=schedule, grad_accum=grad_accum)
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(fn, in_shardings=(state_sh, batch_shardings(mesh), replicated),
                   out_shardings=(state_sh, replicated), donate_argnums=0)


def jit_predict(graphdef, mesh: Mesh, param_sh):
    """params, tokens [B,T], lengths [B] -> class probabilities [B,C] (fp32, replicated)."""
    bs = batch_shardings(mesh)
    fn = lambda params, tokens, lengths: jax.nn.softmax(nnx.merge(graphdef, params)(tokens, lengths), -1)
    return jax.jit(fn, in_shardings=(param_sh, bs["tokens"], bs["lengths"]),
                   out_shardings=NamedSharding(mesh, PartitionSpec()))


def predict_probs(predict_fn, params, tokens, lengths, batch_size: int):
    """Class probabilities [N,C] (numpy) in batches of `batch_size` rows; the last batch is padded
    with copies of row 0 so every call has the one compiled shape."""
    import numpy as np
    out = []
    for start in range(0, len(tokens), batch_size):
        tok, ln = tokens[start:start + batch_size], lengths[start:start + batch_size]
        n = len(tok)
        if n < batch_size:
            tok = np.concatenate([tok, np.repeat(tok[:1], batch_size - n, 0)])
            ln = np.concatenate([ln, np.repeat(ln[:1], batch_size - n, 0)])
        out.append(np.asarray(predict_fn(params, tok, ln))[:n])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
