"""PNG plots of a classification report: the confusion matrix and one-vs-rest ROC curves."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks.classify.metrics import binary_auc, roc_curve


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt
    return plt


def plot_confusion(cm: np.ndarray, class_names: list[str], path: str | Path) -> None:
    """Counts with row-normalised colour (so small classes stay readable), true classes down."""
    plt = _pyplot()
    cm = np.asarray(cm)
    C = len(class_names)
    size = max(4.0, 0.6 * C + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(C):
        for j in range(C):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(C), class_names, rotation=45, ha="right")
    ax.set_yticks(range(C), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix (accuracy {np.trace(cm) / max(cm.sum(), 1):.3f})")
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of true class")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_roc(y_true: np.ndarray, probs: np.ndarray, class_names: list[str], path: str | Path) -> None:
    """ROC curve of the positive class (binary) or of each class against the rest."""
    plt = _pyplot()
    C = len(class_names)
    fig, ax = plt.subplots(figsize=(6, 5.5))
    classes = [1] if C == 2 else range(C)
    curves = 0
    for c in classes:
        auc = binary_auc(y_true == c, probs[:, c])
        if auc is None:  # the class is absent (or alone) in y_true: no curve exists
            continue
        fpr, tpr, _ = roc_curve(y_true == c, probs[:, c])
        ax.plot(fpr, tpr, lw=1.5, label=f"{class_names[c]} (AUC {auc:.3f})")
        curves += 1
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC" if C == 2 else "ROC, one-vs-rest")
    if curves:
        ax.legend(loc="lower right", fontsize=8)
    else:  # e.g. a file holding one class only: say so on the plot instead of an empty legend
        ax.text(0.5, 0.3, "no ROC curve: the labels hold no class\nwith both positive and negative rows",
                ha="center", va="center", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
