"""Fine-tune the decoder backbone with a classification head on CSV data.

  python train.py configs/tasks/classify.yaml [data.path=FILE.csv] [data.val_path=VAL.csv] [k=v ...]

With no data.path the embedded stdlib task is used (tasks/classify/stdlib_dataset.py). The run
directory is a classification checkpoint: config.yaml, labels.json, the tokenizer, checkpoints/,
metrics.jsonl and TensorBoard events, and val/ (the final validation report). Running the same
command again resumes from the newest checkpoint.
"""
from __future__ import annotations

import dataclasses
import math
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from configs import Config, ConfigError
from configs.loader import validate
from tasks.classify import model as cm
from tasks.classify.dataset import (DatasetError, LabelMap, class_weights, encode_texts, read_csv,
                                    stratified_split, train_tokenizer)
from tasks.classify.evaluate import write_report


def load_data(cfg: Config, run_dir: Path):
    """(train Examples, val Examples): data.path (or the stdlib CSV) split stratified, or
    data.val_path as the validation set."""
    path = cfg.data.path
    if not path:
        from tasks.classify import stdlib_dataset
        path = run_dir / "stdlib_classify.csv"
        if not path.is_file():
            stdlib_dataset.write_csv(path, seed=cfg.data.shuffle_seed)
    dc = cfg.data
    ex = read_csv(path, dc.text_column, dc.label_column)
    if dc.val_path:
        return ex, read_csv(dc.val_path, dc.text_column, dc.label_column)
    if not 0 < dc.val_fraction < 1:
        raise ConfigError(f"data.val_fraction must be in (0, 1) without data.val_path; got {dc.val_fraction}")
    labels = np.array(LabelMap.from_labels(ex.labels).encode(ex))
    train_idx, val_idx = stratified_split(labels, dc.val_fraction, dc.shuffle_seed)
    if val_idx.size == 0:
        raise DatasetError(f"{path}: too few rows per class for a validation split; give data.val_path")
    return ex.subset(train_idx), ex.subset(val_idx)


def copy_tokenizer(tokenizer, run_dir: Path) -> None:
    """Put the tokenizer's files in the run directory so the checkpoint is self-contained."""
    from interop.tokenizers import TOKENIZER_FILES
    src = Path(tokenizer.path)
    files = [src.parent / f for f in TOKENIZER_FILES] if src.name == "tokenizer.json" else [src]
    for f in files:
        dst = run_dir / ("tokenizer.model" if f == src and f.suffix == ".model" else f.name)
        if f.is_file() and f.resolve() != dst.resolve():
            shutil.copyfile(f, dst)


def setup_tokenizer(cfg: Config, run_dir: Path, texts: list[str], init_tokenizer):
    """The run's tokenizer (kept in run_dir): resumed, data.tokenizer, the init checkpoint's,
    or a new one trained on the training texts."""
    from interop.tokenizers import SentencePieceTokenizer, has_tokenizer, load_tokenizer_dir
    if has_tokenizer(run_dir):
        return load_tokenizer_dir(run_dir)
    if cfg.data.tokenizer:
        if not Path(cfg.data.tokenizer).is_file():
            raise ConfigError(f"data.tokenizer file not found: {cfg.data.tokenizer}")
        tok = SentencePieceTokenizer(cfg.data.tokenizer)
    elif init_tokenizer is not None:
        tok = init_tokenizer
    else:
        return train_tokenizer(texts, cfg.model.vocab_size, run_dir / "tokenizer.model",
                               cfg.data.tokenizer_sample_bytes)
    copy_tokenizer(tok, run_dir)
    return load_tokenizer_dir(run_dir)


def batch_rows(step: int, batch_size: int, n: int, seed: int) -> np.ndarray:
    """Row indices of training batch `step`: epochs of seeded permutations laid end to end, so a
    resumed run sees exactly the batches it would have seen."""
    start = step * batch_size
    idx, pos = [], start
    while len(idx) < batch_size:
        epoch, offset = divmod(pos, n)
        perm = np.random.default_rng((seed, epoch)).permutation(n)
        take = perm[offset:offset + batch_size - len(idx)]
        idx.extend(take.tolist())
        pos += take.size
    return np.asarray(idx)


def to_global(arrays: dict, shardings: dict) -> dict:
    """Global batch (the same on every process) -> sharded arrays from this process's rows."""
    pi, pc = jax.process_index(), jax.process_count()
    out = {}
    for k, v in arrays.items():
        b = v.shape[0] // pc
        out[k] = jax.make_array_from_process_local_data(shardings[k], np.asarray(v[pi * b:(pi + 1) * b]))
    return out


class ClassifyRun:
    """Owns mesh, data, tokenizer, state and sinks of one classification run."""

    def __init__(self, cfg: Config, log_enabled: bool = True):
        from sharding.mesh import make_mesh
        from store.checkpoint import Checkpointer, write_config
        from training.metrics import MetricsLogger
        from training.optimizer import learning_rate, make_optimizer
        from training.state import abstract_with_shardings
        self.run_dir = run_dir = Path(cfg.train.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.mesh = make_mesh(cfg)
        if cfg.train.batch_size % (jax.process_count() * cfg.train.grad_accum):
            raise ConfigError(f"train.batch_size ({cfg.train.batch_size}) must divide over "
                              f"{jax.process_count()} processes x {cfg.train.grad_accum} micro-batches")
        self.train_ex, self.val_ex = load_data(cfg, run_dir)
        self.labels = LabelMap.from_labels(self.train_ex.labels)
        C = len(self.labels.names)
        if C < 2:
            raise DatasetError(f"{self.train_ex.source}: the training data has only one class "
                               f"('{self.labels.names[0]}')")
        if cfg.task.num_classes and cfg.task.num_classes != C:
            raise ConfigError(f"task.num_classes is {cfg.task.num_classes} but the training data has {C} classes")
        saved = run_dir / "labels.json"
        if saved.is_file() and LabelMap.load(saved).names != self.labels.names:
            raise ConfigError(f"train.run_dir {run_dir} holds a run with other classes; choose a new train.run_dir")
        y_train, self.y_val = self.labels.encode(self.train_ex), self.labels.encode(self.val_ex)

        init_backbone = init_tok = None
        self.checkpointer = Checkpointer(run_dir, cfg.checkpoint.keep, cfg.checkpoint.async_save)
        resuming = bool(self.checkpointer.steps())
        if cfg.train.init_from and not resuming:
            from flax import nnx
            from interop.load import load_checkpoint
            lm_cfg, _, lm_params, init_tok = load_checkpoint(cfg.train.init_from, self.mesh, cfg.mesh.rules)
            if lm_cfg.task.kind != "lm":
                raise ConfigError(f"train.init_from {cfg.train.init_from} is not a language-model checkpoint")
            # The architecture is the checkpoint's; execution choices (remat, attention) stay ours.
            keep = {k: getattr(cfg.model, k) for k in ("remat", "attention_impl", "scan_layers", "compute_dtype")}
            model = dataclasses.replace(lm_cfg.model, **keep)
            # data.seq_len (LM packing) is unused here but must fit the model for the saved config
            # to load again.
            cfg = dataclasses.replace(cfg, model=model, data=dataclasses.replace(
                cfg.data, seq_len=min(cfg.data.seq_len, model.max_seq_len)))
            init_backbone = nnx.to_pure_dict(lm_params)
        elif resuming:
            from store.checkpoint import read_config
            cfg = dataclasses.replace(cfg, model=read_config(run_dir).model)
        self.cfg = cfg = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, num_classes=C))
        validate(cfg)
        self.tokenizer = setup_tokenizer(cfg, run_dir, self.train_ex.texts, init_tok)
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"tokenizer {self.tokenizer.path} has {self.tokenizer.vocab_size} tokens but "
                              f"model.vocab_size is {cfg.model.vocab_size}")
        if cfg.task.max_len > cfg.model.max_seq_len:
            raise ConfigError(f"task.max_len ({cfg.task.max_len}) exceeds model.max_seq_len ({cfg.model.max_seq_len})")
        self.x_train = encode_texts(self.train_ex.texts, self.tokenizer, cfg.task.max_len)
        self.x_val = encode_texts(self.val_ex.texts, self.tokenizer, cfg.task.max_len)
        self.y_train = y_train
        w = class_weights(y_train, C) if cfg.task.class_weights else np.ones(C, np.float32)
        self.weights = jnp.asarray(w)
        write_config(run_dir, cfg)
        if jax.process_index() == 0:
            self.labels.save(saved)

        self.optimizer, self.schedule = make_optimizer(cfg.train), learning_rate(cfg.train)
        self.graphdef, abstract, self.shardings = cm.layout(cfg, C, self.mesh, self.optimizer)
        target = abstract_with_shardings(abstract, self.shardings)
        found = self.checkpointer.restore(target["params"], target["opt_state"])
        if found is not None:
            step, params, opt_state, _ = found
            self.state = {"params": params, "opt_state": opt_state,
                          "step": jax.device_put(jnp.asarray(step, jnp.int32), self.shardings["step"])}
            self.start_step = step
        else:
            self.state = cm.init_state(cfg, C, self.optimizer, self.shardings, init_backbone)
            self.start_step = 0
        self.train_fn = cm.jit_train_step(self.graphdef, self.optimizer, self.schedule, cfg.train.grad_accum,
                                          self.mesh, self.shardings)
        self.predict_fn = cm.jit_predict(self.graphdef, self.mesh, self.shardings["params"])
        self.batch_sh = cm.batch_shardings(self.mesh)
        self.logger = MetricsLogger(run_dir, cfg.train.steps, self.start_step, log_enabled)

    def batch(self, step: int) -> dict:
        cfg = self.cfg
        rows = batch_rows(step, cfg.train.batch_size, len(self.y_train), cfg.train.seed)
        tokens, lengths = self.x_train
        arrays = {"tokens": tokens[rows], "lengths": lengths[rows], "labels": self.y_train[rows],
                  "valid": np.ones(rows.size, np.float32)}
        return to_global(arrays, self.batch_sh)

    def validate(self) -> tuple[np.ndarray, dict]:
        """Validation probabilities [N,C] and the scalar metrics logged to TensorBoard."""
        from tasks.classify.metrics import classification_metrics
        probs = cm.predict_probs(self.predict_fn, self.state["params"], *self.x_val, self.cfg.train.batch_size)
        m = classification_metrics(self.y_val, probs.argmax(1), probs, self.labels.names)
        nll = -np.log(np.maximum(probs[np.arange(len(self.y_val)), self.y_val], 1e-12)).mean()
        return probs, {"val_loss": float(nll), "val_accuracy": m["accuracy"], "val_macro_f1": m["macro_f1"],
                       "val_weighted_f1": m["weighted_f1"],
                       "val_roc_auc": m["roc_auc"] if m["roc_auc"] is not None else float("nan")}

    def save(self, step: int, force: bool = False) -> None:
        meta = {"step": step, "task": "classify", "classes": self.labels.names}
        self.checkpointer.save(step, self.state["params"], self.state["opt_state"], meta, force=force)

    def run(self) -> dict:
        """Train to cfg.train.steps; returns the final validation metrics."""
        tc, log = self.cfg.train, self.logger
        log.message(f"classify: {len(self.y_train)} train / {len(self.y_val)} validation rows, "
                    f"{len(self.labels.names)} classes, tokenizer {self.tokenizer.vocab_size} tokens, "
                    f"max_len {self.cfg.task.max_len}, {self.cfg.task.pooling} pooling")
        step, t0, last = self.start_step, time.time(), {}
        while step < tc.steps:
            self.state, metrics = self.train_fn(self.state, self.batch(step), self.weights)
            step += 1
            if step % tc.log_every == 0 or step == tc.steps:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not math.isfinite(metrics["loss"]):
                    raise FloatingPointError(f"loss is {metrics['loss']} at step {step}; lower train.lr")
                metrics["step_time"] = (time.time() - t0) / tc.log_every
                log.log(step, metrics)
                log.message(f"step {step}/{tc.steps} | loss {metrics['loss']:.4f} | batch accuracy "
                            f"{metrics['accuracy']:.3f} | lr {metrics['lr']:.2e} | "
                            f"{1e3 * metrics['step_time']:.0f} ms/step")
                t0 = time.time()
            if tc.eval_every > 0 and step % tc.eval_every == 0 and step != tc.steps:
                _, last = self.validate()
                log.log(step, last)
                log.message(f"step {step}: validation accuracy {last['val_accuracy']:.4f}, "
                            f"macro F1 {last['val_macro_f1']:.4f}, loss {last['val_loss']:.4f}")
            if step % self.cfg.checkpoint.every == 0 or step == tc.steps:
                self.save(step, force=step == tc.steps)
        probs, last = self.validate()
        log.log(step, last)
        if jax.process_index() == 0:
            write_report(self.run_dir / "val", self.val_ex, probs, self.labels.names, self.y_val,
                         {"checkpoint": str(self.run_dir), "data": "validation split", "step": step})
        self.checkpointer.wait()
        return {"step": step, **last}

    def close(self) -> None:
        self.checkpointer.close()
        self.logger.close()


def main(cfg: Config, args=None) -> int:
    """Entry from train.py when task.kind is classify; one-line errors exit 2."""
    try:
        run = ClassifyRun(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        out = run.run()
    finally:
        run.close()
    if jax.process_index() == 0:
        print(f"validation accuracy {out['val_accuracy']:.4f}, macro F1 {out['val_macro_f1']:.4f}, "
              f"ROC-AUC {out['val_roc_auc']:.4f} after {out['step']} steps "
              f"(report: {Path(cfg.train.run_dir) / 'val'})")
    return 0
