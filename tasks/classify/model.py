"""The classifier: the decoder backbone, a pooling of its hidden states, a linear head, and its loss.

Parameters are {"backbone": <Transformer params>, "head_w": [D,C], "head_b": [C]}, so a language
model's params drop into "backbone" unchanged (fine-tuning from a Tessera or Hugging Face
checkpoint). Training is the Trainer's (training/loop.py) with this module's `LOSS`; batches are
tokens [B,T] right-padded, lengths [B], labels [B] and per-row loss weights [B].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from configs import Config, ModelConfig
from model.layers import param
from model.transformer import Transformer
from sharding.rules import BATCH
from training.step import TaskLoss


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


def build(cfg: Config, num_classes: int):
    """The classifier's builder (`() -> Classifier`) for training.state's layout and init."""
    return lambda: Classifier(cfg.model, num_classes, cfg.task.pooling, rngs=nnx.Rngs(cfg.train.seed),
                              rules=cfg.mesh.rules)


def batch_shardings(mesh: Mesh) -> dict:
    """tokens [B,T] and the per-row keys [B]: rows over the data axes."""
    rows = NamedSharding(mesh, PartitionSpec(BATCH))
    return {"tokens": NamedSharding(mesh, PartitionSpec(BATCH, None)), "lengths": rows, "labels": rows,
            "weights": rows}


def loss_fn(graphdef, params: dict, batch: dict):
    """(weighted NLL sum, sums for the metrics) of one micro-batch; each row's NLL is scaled by its
    weight (its true class's weight, 1 without task.class_weights)."""
    logits = nnx.merge(graphdef, params)(batch["tokens"], batch["lengths"])   # [B,C]
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["labels"][:, None], axis=-1)[:, 0]  # [B]
    correct = jnp.sum(jnp.argmax(logits, -1) == batch["labels"])
    return jnp.sum(batch["weights"] * nll), {"weight": jnp.sum(batch["weights"]), "nll_sum": jnp.sum(nll),
                                             "correct": correct.astype(jnp.float32),
                                             "rows": jnp.float32(nll.shape[0])}


def summarize(aux: dict) -> dict:
    """The logged loss is the unweighted mean NLL per row; accuracy is the batch's."""
    rows = jnp.maximum(aux["rows"], 1.0)
    return {"loss": aux["nll_sum"] / rows, "accuracy": aux["correct"] / rows}


LOSS = TaskLoss(loss_fn, summarize)


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
