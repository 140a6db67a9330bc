"""Evaluate a classification checkpoint on a CSV: metrics.json, predictions.csv and PNG plots.

A classification checkpoint is a run directory written by tasks/classify/train.py: config.yaml
(task.num_classes set), labels.json (class names in index order), the tokenizer, checkpoints/.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import jax
import numpy as np

from configs import ConfigError
from sharding.mesh import data_parallel_size
from tasks.classify import model as cm
from tasks.classify.dataset import Examples, LabelMap, encode_texts, read_csv
from tasks.classify.metrics import classification_metrics


def load_classifier(run_dir: str | Path, mesh, overrides=()):
    """(cfg, graphdef, params, tokenizer, LabelMap) of a classification run directory."""
    from interop.tokenizers import has_tokenizer, load_tokenizer_dir
    from store.checkpoint import read_config, restore_params
    from training.state import abstract_with_shardings, param_layout
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"checkpoint directory not found: {run_dir}")
    cfg = read_config(run_dir, list(overrides))
    if cfg.task.kind != "classify":
        raise ConfigError(f"{run_dir} is a language-model checkpoint (task.kind {cfg.task.kind}); "
                          "use `evaluate.py lm` or `evaluate.py choice`")
    labels = LabelMap.load(run_dir / "labels.json")
    if not has_tokenizer(run_dir):
        raise ConfigError(f"{run_dir} has no tokenizer (tokenizer.model or tokenizer.json)")
    graphdef, abstract, shardings = param_layout(cfg, mesh, cm.build(cfg, len(labels.names)))
    params = restore_params(result_dir(run_dir, cfg)[0], abstract_with_shardings(abstract, shardings))
    return cfg, graphdef, params, load_tokenizer_dir(run_dir), labels


def result_dir(run_dir: str | Path, cfg) -> tuple[Path, str]:
    """(directory to restore params from, what they are): RUN_DIR/best when the run kept its best
    evaluation (task.best_by), else the run's newest checkpoint."""
    from tasks.classify.best import BEST_DIR, read_record
    run_dir = Path(run_dir)
    record = read_record(run_dir)
    if cfg.task.best_by != "last" and record is not None and (run_dir / BEST_DIR / "checkpoints").is_dir():
        return run_dir / BEST_DIR, f"step {record['step']}, the best evaluation by {record['best_by']}"
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").glob("[0-9]*") if p.name.isdigit())
    return run_dir, f"step {steps[-1]}, the newest checkpoint" if steps else "the newest checkpoint"


def run_baseline(cfg, run_dir: str | Path, labels: LabelMap, texts: list[str], y_true: np.ndarray) -> dict | None:
    """The TF-IDF + logistic-regression baseline fitted on the run's training split (re-read from
    its data.path exactly as training split it) and scored on `texts`; None without scikit-learn,
    {"skipped": reason} when the training data is no longer readable."""
    from tasks.classify.baseline import baseline_metrics, sklearn_available
    from tasks.classify.train import load_data
    if not sklearn_available():
        return None
    try:
        train_ex, _ = load_data(cfg, Path(run_dir))
        y_train = labels.encode(train_ex)
    except ConfigError as e:
        return {"skipped": f"the run's training data is not readable ({e})"}
    return baseline_metrics(train_ex.texts, y_train, texts, y_true, labels.names, cfg.train.seed)


def predict(cfg, graphdef, params, tokenizer, texts: list[str], mesh, batch_size: int | None = None):
    """Class probabilities [N,C] for `texts`, tokenized as in training (task.max_len)."""
    tokens, lengths = encode_texts(texts, tokenizer, cfg.task.max_len)
    rows = data_parallel_size(mesh)  # every call splits evenly over the batch axes
    batch_size = -(-(batch_size or cfg.train.batch_size) // rows) * rows
    fn = cm.jit_predict(graphdef, mesh, jax.tree.map(lambda p: p.sharding, params))  # restored in place
    return cm.predict_probs(fn, params, tokens, lengths, batch_size)


def write_report(out_dir: str | Path, ex: Examples, probs: np.ndarray, class_names: list[str],
                 y_true: np.ndarray | None, extra: dict | None = None) -> dict | None:
    """Write predictions.csv (id, true label, predicted label, p_<class>...) and, with labels,
    metrics.json, confusion_matrix.png and roc_curves.png. Returns the metrics (or None)."""
    from tasks.classify.plots import plot_confusion, plot_roc
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pred = probs.argmax(axis=1)
    with open(out / "predictions.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "true_label", "predicted_label"] + [f"p_{c}" for c in class_names])
        for i in range(len(ex)):
            true = ex.labels[i] if ex.labels is not None else ""
            w.writerow([ex.ids[i], true, class_names[pred[i]]] + [f"{p:.6f}" for p in probs[i]])
    if y_true is None:
        return None
    metrics = classification_metrics(y_true, pred, probs, class_names)
    nll = -np.log(np.maximum(probs[np.arange(len(y_true)), y_true], 1e-12))
    metrics["loss"] = float(nll.mean())
    metrics.update(extra or {})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    plot_confusion(np.array(metrics["confusion_matrix"]), class_names, out / "confusion_matrix.png")
    plot_roc(y_true, probs, class_names, out / "roc_curves.png")
    return metrics


def evaluate_csv(run_dir: str | Path, csv_path: str | Path, out_dir: str | Path, mesh,
                 text_column: str | None = None, label_column: str | None = None,
                 batch_size: int | None = None, overrides=()) -> dict | None:
    """The `evaluate.py classify` command: predictions for every row, metrics when labelled;
    `overrides` (key=value) apply to the run's saved config."""
    cfg, graphdef, params, tokenizer, labels = load_classifier(run_dir, mesh, overrides)
    ex = read_csv(csv_path, text_column or cfg.data.text_column, label_column or cfg.data.label_column,
                  require_labels=False)
    y_true = labels.encode(ex) if ex.labels is not None else None
    probs = predict(cfg, graphdef, params, tokenizer, ex.texts, mesh, batch_size)
    extra = {"checkpoint": str(run_dir), "params": result_dir(run_dir, cfg)[1], "data": str(csv_path)}
    if y_true is not None:
        extra["baseline_tfidf_logreg"] = run_baseline(cfg, run_dir, labels, ex.texts, y_true)
    return write_report(out_dir, ex, probs, labels.names, y_true, extra)
