"""The classifier: the decoder backbone, a pooling of its hidden states, a linear head, and its loss.

Parameters are {"backbone": <Transformer params>, "head_w": [D,C], "head_b": [C]}, so a language
model's params drop into "backbone" unchanged (fine-tuning from a Tessera or Hugging Face
checkpoint). Training is the Trainer's (training/loop.py) with this module's `LOSS`; batches are
tokens [B,T] right-padded, lengths [B], labels [B], per-row loss weights [B], and the step and
global row index of each row [B], from which dropout draws its randomness.

Dropout (task.dropout) is the classifier's own regulariser: on the token embeddings, on every
layer's attention output (through the `attend` function the decoder takes, so the shared model
code is untouched) and on the pooled vector. Its key for a row is
fold_in(fold_in(key(train.seed), step), row): a pure function of the step counter, so runs are
reproducible and a resumed run draws the masks it would have drawn, whatever the mesh or
train.grad_accum. With rate 0, or without step and row (evaluation), the forward pass is exactly
the plain one.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from configs import Config, ModelConfig
from model.kernels.reference import default_positions
from model.layers import param
from model.loss import chunk_size, token_nll
from model.transformer import Transformer, decoder, embed, full_attention
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


# fold_in tags of the dropout sites of a row's key: embeddings, pooled vector, then one per layer.
EMBED_SITE, POOLED_SITE, FIRST_LAYER_SITE = 0, 1, 2


def dropout_keys(seed: int, step: jax.Array, row: jax.Array) -> jax.Array:
    """Per-row PRNG keys [B] from the step counter [B] and the row's index in the global batch [B]."""
    base = jax.random.key(seed)
    return jax.vmap(lambda s, r: jax.random.fold_in(jax.random.fold_in(base, s), r))(step, row)


def dropout(x: jax.Array, keys: jax.Array, site, rate: float) -> jax.Array:
    """Inverted dropout of x [B,...] with each row's mask drawn from fold_in(keys[b], site)."""
    keep = jax.vmap(lambda k: jax.random.bernoulli(jax.random.fold_in(k, site), 1.0 - rate, x.shape[1:]))(keys)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def next_token_nll(backbone: Transformer, h: jax.Array, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
    """Mean next-token NLL of each row's own text [B] (nats), through the backbone's LM head as the
    language-model loss computes it (model/loss.py): hidden h [B,T,D] at positions 0..len-2
    predicts tokens 1..len-1; padding is not scored."""
    cfg, T = backbone.cfg, tokens.shape[1]
    targets = jnp.roll(tokens, -1, axis=1)                                   # [B,T], last column unused
    nll, _ = token_nll(backbone.params(), h, targets, cfg, backbone.rules, chunk_size(cfg, T))  # [B,T]
    mask = (jnp.arange(T)[None, :] < (lengths - 1)[:, None]).astype(jnp.float32)  # [B,T]
    return jnp.sum(nll * mask, 1) / jnp.maximum(jnp.sum(mask, 1), 1.0)


class Classifier(nnx.Module):
    """Transformer backbone + pooling + Linear D->C head (fp32 logits); `dropout` is the training
    rate (task.dropout), `seed` the base of its keys (train.seed), `lm_loss_weight` the weight of
    the auxiliary next-token loss on each text (task.lm_loss_weight; 0 = none)."""

    def __init__(self, cfg: ModelConfig, num_classes: int, pooling: str, *, rngs: nnx.Rngs,
                 rules: str = "fsdp", dropout: float = 0.0, seed: int = 0, lm_loss_weight: float = 0.0):
        self.pooling, self.dropout, self.seed, self.lm_loss_weight = pooling, dropout, seed, lm_loss_weight
        self.backbone = Transformer(cfg, rngs=rngs, rules=rules)
        dt = jnp.dtype(cfg.param_dtype)
        self.head_w = param(rngs, (cfg.d_model, num_classes), ("embed", None), dt, std=cfg.init_std)
        self.head_b = param(rngs, (num_classes,), (None,), dt, "zeros")

    def _hidden_with_dropout(self, tokens, segment_ids, keys) -> jax.Array:
        """The backbone's pass (model.transformer.hidden) with dropout on the embeddings and on
        each layer's attention output: [B,T] -> [B,T,D]."""
        bb, rate = self.backbone, self.dropout
        params, cfg = bb.params(), bb.cfg
        positions = default_positions(*tokens.shape)
        x = dropout(embed(params, tokens, cfg, bb.rules), keys, EMBED_SITE, rate)   # [B,T,D]
        attend_all = full_attention(cfg, positions, segment_ids)

        def attend(q, k, v, layer, state, window):                           # layer: traced under scan
            out, state = attend_all(q, k, v, layer, state, window)           # [B,T,N,H]
            return dropout(out, keys, FIRST_LAYER_SITE + layer, rate), state

        h, _ = decoder(params, x, positions, attend, cfg, bb.rules, remat=cfg.remat, scan=cfg.scan_layers)
        return h

    def __call__(self, tokens: jax.Array, lengths: jax.Array, step: jax.Array | None = None,
                 row: jax.Array | None = None) -> jax.Array:
        """tokens [B,T] right-padded, lengths [B] -> logits [B,C] (fp32). Given the step [B] and
        global row index [B] of each row (training), dropout applies at rate self.dropout."""
        return self.train_outputs(tokens, lengths, step, row)[0]

    def train_outputs(self, tokens: jax.Array, lengths: jax.Array, step: jax.Array | None = None,
                      row: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
        """(class logits [B,C], each row's mean next-token NLL [B] or None): the NLL, through
        the backbone's LM head, only when self.lm_loss_weight > 0."""
        T = tokens.shape[1]
        segment_ids = (jnp.arange(T)[None, :] < lengths[:, None]).astype(jnp.int32)  # [B,T], 0 = pad
        train = self.dropout > 0 and step is not None
        if train:
            keys = dropout_keys(self.seed, step, row)                        # [B]
            h = self._hidden_with_dropout(tokens, segment_ids, keys)         # [B,T,D]
        else:
            h = self.backbone.backbone(tokens, None, segment_ids)            # [B,T,D]
        pooled = pool(h, lengths, self.pooling).astype(jnp.float32)          # [B,D]
        if train:
            pooled = dropout(pooled, keys, POOLED_SITE, self.dropout)
        out = pooled @ self.head_w[...].astype(jnp.float32) + self.head_b[...].astype(jnp.float32)
        lm_nll = next_token_nll(self.backbone, h, tokens, lengths) if self.lm_loss_weight > 0 else None
        return out, lm_nll


def build(cfg: Config, num_classes: int):
    """The classifier's builder (`() -> Classifier`) for training.state's layout and init."""
    return lambda: Classifier(cfg.model, num_classes, cfg.task.pooling, rngs=nnx.Rngs(cfg.train.seed),
                              rules=cfg.mesh.rules, dropout=cfg.task.dropout, seed=cfg.train.seed,
                              lm_loss_weight=cfg.task.lm_loss_weight)


def batch_shardings(mesh: Mesh) -> dict:
    """tokens [B,T] and the per-row keys [B]: rows over the data axes."""
    rows = NamedSharding(mesh, PartitionSpec(BATCH))
    return {"tokens": NamedSharding(mesh, PartitionSpec(BATCH, None)), "lengths": rows, "labels": rows,
            "weights": rows, "step": rows, "row": rows}


def loss_fn(graphdef, params: dict, batch: dict):
    """(objective sum, sums for the metrics) of one micro-batch: each row's class NLL scaled by its
    weight (its true class's weight, 1 without task.class_weights), plus task.lm_loss_weight
    times the row's mean next-token NLL on its own text, scaled the same way."""
    model = nnx.merge(graphdef, params)
    logits, lm_nll = model.train_outputs(batch["tokens"], batch["lengths"], batch.get("step"),
                                         batch.get("row"))                    # [B,C], [B] or None
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["labels"][:, None], axis=-1)[:, 0]  # [B]
    correct = jnp.sum(jnp.argmax(logits, -1) == batch["labels"])
    per_row = nll if lm_nll is None else nll + model.lm_loss_weight * lm_nll
    aux = {"weight": jnp.sum(batch["weights"]), "nll_sum": jnp.sum(nll), "correct": correct.astype(jnp.float32),
           "rows": jnp.float32(nll.shape[0])}
    if lm_nll is not None:
        aux["lm_nll_sum"] = jnp.sum(lm_nll)
    return jnp.sum(batch["weights"] * per_row), aux


def summarize(aux: dict) -> dict:
    """The logged loss is the unweighted mean class NLL per row; accuracy is the batch's; lm_loss
    the mean next-token NLL per row when the auxiliary loss is on."""
    rows = jnp.maximum(aux["rows"], 1.0)
    out = {"loss": aux["nll_sum"] / rows, "accuracy": aux["correct"] / rows}
    if "lm_nll_sum" in aux:
        out["lm_loss"] = aux["lm_nll_sum"] / rows
    return out


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
