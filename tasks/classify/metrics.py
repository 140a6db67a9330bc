"""Classification metrics in plain numpy: accuracy, precision/recall/F1, confusion matrix, ROC.

Conventions follow scikit-learn (tests check equality against it): rows of the confusion matrix
are true classes and columns predicted ones; a precision or recall with an empty denominator is 0;
ROC-AUC is the area under the trapezoidal ROC curve, which equals the Mann-Whitney statistic with
ties counted as one half. Multi-class ROC-AUC is one-vs-rest, macro-averaged over the classes that
have both positive and negative examples (AUC is undefined for the others).
"""
from __future__ import annotations

import numpy as np


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """[C,C] counts: entry (i, j) is the number of class-i examples predicted as class j."""
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def accuracy(y_true, y_pred) -> float:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float(np.mean(y_true == y_pred)) if y_true.size else 0.0


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)


def precision_recall_f1(cm: np.ndarray) -> dict:
    """Per-class precision, recall, F1 and support [C] from a confusion matrix, plus macro and
    support-weighted averages of each."""
    cm = cm.astype(np.float64)
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    precision = _safe_div(tp, cm.sum(axis=0))
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    weights = support / max(support.sum(), 1.0)
    out = {"precision": precision, "recall": recall, "f1": f1, "support": support.astype(np.int64)}
    for name, values in (("precision", precision), ("recall", recall), ("f1", f1)):
        out[f"macro_{name}"] = float(values.mean()) if values.size else 0.0
        out[f"weighted_{name}"] = float((values * weights).sum())
    return out


def roc_curve(is_positive, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) with one point per distinct score, descending, starting at (0, 0)
    with threshold +inf (scikit-learn's roc_curve with drop_intermediate=False)."""
    y = np.asarray(is_positive, bool)
    s = np.asarray(scores, np.float64)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    # The last index of each run of equal scores: a threshold admits all tied examples at once.
    last = np.r_[np.nonzero(np.diff(s))[0], y.size - 1]
    tps = np.cumsum(y)[last].astype(np.float64)
    fps = (last + 1) - tps
    tps, fps = np.r_[0.0, tps], np.r_[0.0, fps]
    thresholds = np.r_[np.inf, s[last]]
    fpr = fps / fps[-1] if fps[-1] > 0 else np.full_like(fps, np.nan)
    tpr = tps / tps[-1] if tps[-1] > 0 else np.full_like(tps, np.nan)
    return fpr, tpr, thresholds


def binary_auc(is_positive, scores) -> float | None:
    """Area under the ROC curve; None when only one class is present."""
    y = np.asarray(is_positive, bool)
    if y.all() or not y.any():
        return None
    fpr, tpr, _ = roc_curve(y, scores)
    return float(np.trapezoid(tpr, fpr))


def roc_auc(y_true, probs: np.ndarray) -> dict:
    """ROC-AUC from class probabilities [N,C]: 'auc' (binary: of class 1; multi-class: one-vs-rest
    macro) and 'per_class' (one-vs-rest AUC of each class, None where undefined)."""
    y_true, probs = np.asarray(y_true), np.asarray(probs, np.float64)
    C = probs.shape[1]
    per_class = [binary_auc(y_true == c, probs[:, c]) for c in range(C)]
    if C == 2:
        return {"auc": per_class[1], "per_class": per_class}
    defined = [a for a in per_class if a is not None]
    return {"auc": float(np.mean(defined)) if defined else None, "per_class": per_class}


def classification_metrics(y_true, y_pred, probs: np.ndarray, class_names: list[str]) -> dict:
    """Everything `evaluate` reports, as JSON-ready values (lists, floats, None)."""
    C = len(class_names)
    cm = confusion_matrix(y_true, y_pred, C)
    prf = precision_recall_f1(cm)
    auc = roc_auc(y_true, probs)
    per_class = {name: {"precision": float(prf["precision"][i]), "recall": float(prf["recall"][i]),
                        "f1": float(prf["f1"][i]), "support": int(prf["support"][i]),
                        "roc_auc": auc["per_class"][i]}
                 for i, name in enumerate(class_names)}
    return {"n": int(len(y_true)), "accuracy": accuracy(y_true, y_pred),
            "macro_precision": prf["macro_precision"], "macro_recall": prf["macro_recall"],
            "macro_f1": prf["macro_f1"], "weighted_f1": prf["weighted_f1"],
            "roc_auc": auc["auc"], "roc_auc_kind": "binary" if C == 2 else "one-vs-rest macro",
            "per_class": per_class, "classes": list(class_names), "confusion_matrix": cm.tolist(),
            "missing_classes": [name for i, name in enumerate(class_names) if prf["support"][i] == 0]}
