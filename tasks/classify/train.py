"""Fine-tune the decoder backbone with a classification head on CSV data.

  python train.py configs/tasks/classify.yaml [data.path=FILE.csv] [data.val_path=VAL.csv] [k=v ...]

With no data.path the embedded stdlib task is used (tasks/classify/stdlib_dataset.py). The run
directory is a classification checkpoint: config.yaml, labels.json, the tokenizer, checkpoints/,
metrics.jsonl and TensorBoard events, and val/ (the final validation report). Running the same
command again resumes from the newest checkpoint.
"""
from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path

import jax
import numpy as np

from configs import Config, ConfigError
from model.stats import flops_per_token
from tasks.classify import model as cm
from tasks.classify.best import BestKeeper
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


def init_tokenizer(init_from: str):
    """The tokenizer of a train.init_from checkpoint (its directory's, or its config's data.tokenizer), or None."""
    from interop.load import checkpoint_config, load_tokenizer_for
    return load_tokenizer_for(Path(init_from), checkpoint_config(init_from))


def setup_tokenizer(cfg: Config, run_dir: Path, texts: list[str]):
    """The run's tokenizer (kept in run_dir): resumed, data.tokenizer, the init checkpoint's,
    or a new one trained on the training texts."""
    from interop.tokenizers import SentencePieceTokenizer, has_tokenizer, load_tokenizer_dir
    if has_tokenizer(run_dir):
        return load_tokenizer_dir(run_dir)
    tok = None
    if cfg.data.tokenizer:
        if not Path(cfg.data.tokenizer).is_file():
            raise ConfigError(f"data.tokenizer file not found: {cfg.data.tokenizer}")
        tok = SentencePieceTokenizer(cfg.data.tokenizer)
    elif cfg.train.init_from:
        tok = init_tokenizer(cfg.train.init_from)
    if tok is None:
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


class ClassifyTask:
    """Text classification as a task of the one Trainer (training/loop.py): CSV rows -> batches,
    the classifier and its loss (tasks/classify/model.py), validation metrics and the val/ report."""

    name = "classify"
    loss = cm.LOSS

    def configure(self, cfg: Config) -> Config:
        """Read the data and settle task.num_classes from the training labels."""
        self.run_dir = run_dir = Path(cfg.train.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
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
        self.y_train, self.y_val = self.labels.encode(self.train_ex), self.labels.encode(self.val_ex)
        # data.seq_len (LM packing) is unused here but must fit the model (an init_from model's
        # context may be shorter) for the saved config to load again.
        data = dataclasses.replace(cfg.data, seq_len=min(cfg.data.seq_len, cfg.model.max_seq_len))
        return dataclasses.replace(cfg, data=data, task=dataclasses.replace(cfg.task, num_classes=C))

    def setup(self, cfg: Config) -> None:
        """Tokenizer, encoded texts and per-class loss weights."""
        self.cfg = cfg
        self.tokenizer = setup_tokenizer(cfg, self.run_dir, self.train_ex.texts)
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"tokenizer {self.tokenizer.path} has {self.tokenizer.vocab_size} tokens but "
                              f"model.vocab_size is {cfg.model.vocab_size}")
        if cfg.task.max_len > cfg.model.max_seq_len:
            raise ConfigError(f"task.max_len ({cfg.task.max_len}) exceeds model.max_seq_len ({cfg.model.max_seq_len})")
        self.x_train = encode_texts(self.train_ex.texts, self.tokenizer, cfg.task.max_len)
        self.x_val = encode_texts(self.val_ex.texts, self.tokenizer, cfg.task.max_len)
        C = cfg.task.num_classes
        self.class_weights = class_weights(self.y_train, C) if cfg.task.class_weights else np.ones(C, np.float32)
        m = cfg.model
        self.tokens_per_batch = cfg.train.batch_size * cfg.task.max_len  # padding included: it is computed
        # The backbone's FLOPs without the LM's output projection (6 D V per token in training):
        # the head reads one pooled vector per row.
        self.flops_per_token = flops_per_token(m, cfg.task.max_len) - 6 * m.d_model * m.vocab_size
        self.eval_label = "validation accuracy"
        self.best = BestKeeper(self.run_dir, cfg.task.best_by)

    def describe(self) -> str:
        """One line on what is being trained."""
        t = self.cfg.task
        return (f"classify: {len(self.y_train)} train / {len(self.y_val)} validation rows, "
                f"{len(self.labels.names)} classes, tokenizer {self.tokenizer.vocab_size} tokens, "
                f"max_len {t.max_len}, {t.pooling} pooling, dropout {t.dropout:g}, result: "
                + ("the last step" if t.best_by == "last" else f"the best evaluation by {t.best_by}"))

    def save_files(self, run_dir: Path) -> None:
        """labels.json: the class names in index order (the tokenizer is already there)."""
        if jax.process_index() == 0:
            self.labels.save(run_dir / "labels.json")

    def build_model(self):
        """The classifier whose params are trained."""
        return cm.build(self.cfg, self.cfg.task.num_classes)()

    def pretrained(self, params: dict) -> dict:
        """A language model's params are the classifier's backbone; the head starts fresh."""
        return {"backbone": params}

    def checkpoint_meta(self) -> dict:
        return {"task": "classify", "classes": self.labels.names}

    def batch_shardings(self, mesh) -> dict:
        return cm.batch_shardings(mesh)

    def batch(self, step: int) -> dict:
        """This process's rows of training batch `step` (the global batch is the same everywhere)."""
        rows = batch_rows(step, self.cfg.train.batch_size, len(self.y_train), self.cfg.train.seed)
        b = rows.size // jax.process_count()
        first = jax.process_index() * b
        rows = rows[first:first + b]
        tokens, lengths = self.x_train
        labels = self.y_train[rows]
        # step and row (the row's index in the global batch) seed dropout: model.dropout_keys.
        return {"tokens": tokens[rows], "lengths": lengths[rows], "labels": labels,
                "weights": self.class_weights[labels], "step": np.full(b, step, np.int32),
                "row": np.arange(first, first + b, dtype=np.int32)}

    def compile_eval(self, graphdef, mesh, param_shardings) -> None:
        self.predict_fn = cm.jit_predict(graphdef, mesh, param_shardings)

    def evaluate(self, params) -> dict:
        """Validation metrics over the whole validation split; its probabilities are kept for the report."""
        from tasks.classify.metrics import classification_metrics
        self.val_probs = probs = cm.predict_probs(self.predict_fn, params, *self.x_val, self.cfg.train.batch_size)
        m = classification_metrics(self.y_val, probs.argmax(1), probs, self.labels.names)
        nll = -np.log(np.maximum(probs[np.arange(len(self.y_val)), self.y_val], 1e-12)).mean()
        return {"val_loss": float(nll), "val_accuracy": m["accuracy"], "val_macro_f1": m["macro_f1"],
                "val_weighted_f1": m["weighted_f1"],
                "val_roc_auc": m["roc_auc"] if m["roc_auc"] is not None else float("nan")}

    def after_evaluation(self, step: int, metrics: dict, params) -> None:
        """Keep these params if they are the best so far (task.best_by)."""
        self.best.offer(step, metrics, params)

    def baseline(self, eval_texts: list[str], eval_labels: np.ndarray) -> dict | None:
        """The TF-IDF + logistic-regression baseline fitted on this run's training split and
        scored on the given rows; None without scikit-learn."""
        from tasks.classify.baseline import baseline_metrics
        return baseline_metrics(self.train_ex.texts, self.y_train, eval_texts, eval_labels, self.labels.names,
                                self.cfg.train.seed)

    def eval_message(self, step: int, m: dict) -> str:
        return (f"step {step}: validation accuracy {m['val_accuracy']:.4f}, macro F1 {m['val_macro_f1']:.4f}, "
                f"loss {m['val_loss']:.4f}")

    def close(self) -> None:
        """Batches are index math over encoded rows in memory: nothing runs in the background."""

    def write_report(self, step: int, extra: dict | None = None) -> None:
        """val/: the report of the last evaluation, as `evaluate.py classify` writes it."""
        if jax.process_index() == 0:
            write_report(self.run_dir / "val", self.val_ex, self.val_probs, self.labels.names, self.y_val,
                         {"checkpoint": str(self.run_dir), "data": "validation split", "step": step, **(extra or {})})


def restore_best(trainer) -> dict:
    """The params kept as the best evaluation (RUN_DIR/best), restored in the trainer's shardings."""
    from store.checkpoint import restore_params
    from tasks.classify.best import BEST_DIR
    from training.state import abstract_with_shardings
    target = abstract_with_shardings(trainer.abstract["params"], trainer.shardings["params"])
    return restore_params(trainer.run_dir / BEST_DIR, target)


def final_validation(trainer, task: ClassifyTask, summary: dict) -> tuple[dict, int]:
    """(validation metrics, step) of the run's result, and the val/ report: the best evaluation's
    params when task.best_by keeps them (restored and scored again), else the final params. When
    the loop evaluated at its last step those metrics and probabilities are the final ones."""
    step, final = summary["step"], summary["final"]
    record = task.best.record if task.best.enabled else None
    if record is not None and record["step"] != step:
        metrics = task.evaluate(restore_best(trainer))
        step = record["step"]
    elif "val_accuracy" in final:
        metrics = {k: v for k, v in final.items() if k.startswith("val_")}
    else:
        metrics = trainer.evaluate()
        trainer.logger.log(step, metrics)
    baseline = task.baseline(task.val_ex.texts, task.y_val) if jax.process_index() == 0 else None
    task.write_report(step, {"final_step": summary["step"], "best_by": task.cfg.task.best_by,
                             "baseline_tfidf_logreg": baseline})
    return {**metrics, "baseline": baseline}, step


def result_line(step: int, final_step: int, best_by: str) -> str:
    """Which params the reported figures are of."""
    if best_by == "last" or step == final_step:
        return f"after {final_step} steps" + ("" if best_by == "last" else f" (the best by {best_by})")
    return f"of step {step}, the best evaluation by {best_by} (training ran {final_step} steps)"


def main(cfg: Config, args=None) -> int:
    """Entry from train.py when task.kind is classify; one-line errors exit 2."""
    from training.loop import Trainer
    task = ClassifyTask()
    try:
        trainer = Trainer(cfg, task=task)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        trainer.logger.message(task.describe())
        summary = trainer.run()
        if "stopped_by" in summary:  # the checkpoint is saved; the same command resumes and reports
            return 0
        out, step = final_validation(trainer, task, summary)
    finally:
        trainer.close()
    if jax.process_index() == 0:
        from tasks.classify.baseline import baseline_line
        print(f"validation accuracy {out['val_accuracy']:.4f}, macro F1 {out['val_macro_f1']:.4f}, "
              f"ROC-AUC {out['val_roc_auc']:.4f} {result_line(step, summary['step'], cfg.task.best_by)} "
              f"(report: {Path(cfg.train.run_dir) / 'val'})")
        print(baseline_line(out["baseline"]))
    return 0
