"""A bag-of-n-grams baseline printed beside the model: TF-IDF + logistic regression.

The features are the usual strong setup for short texts: word 1-2-grams and character 2-5-grams
within word boundaries (`char_wb`), each sublinear-TF TF-IDF, concatenated; the classifier is
multinomial logistic regression (L2, C=10, lbfgs). It is fitted on the run's training split and
scored on exactly the rows the model is scored on, so the two figures are comparable.

scikit-learn is an optional extra (`pip install 'tessera[baseline]'`); without it the report
prints one line saying so and nothing fails.
"""
from __future__ import annotations

import warnings

import numpy as np

INSTALL_HINT = "pip install 'tessera[baseline]'  (or: pip install scikit-learn)"


def sklearn_available() -> bool:
    """Whether scikit-learn can be imported (the baseline is skipped, with a hint, when not)."""
    try:
        import sklearn  # noqa: F401
    except ImportError:
        return False
    return True


def tfidf_logreg_predict(train_texts: list[str], train_labels: np.ndarray, eval_texts: list[str],
                         num_classes: int, seed: int = 0) -> np.ndarray:
    """Class probabilities [N,C] for `eval_texts` from TF-IDF (word 1-2 + char_wb 2-5-grams) and
    logistic regression fitted on the training texts and class indices. Raises ImportError
    without scikit-learn."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import FeatureUnion

    features = FeatureUnion([
        # token_pattern keeps one-character tokens and punctuation runs: in code and short
        # texts "(", ":" or "!" carry signal that the default pattern drops.
        ("word", TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True, min_df=1,
                                 token_pattern=r"(?u)\b\w+\b|[^\w\s]+", max_features=200_000)),
        ("char", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2,
                                 max_features=300_000)),
    ])
    x_train = features.fit_transform(train_texts)
    clf = LogisticRegression(C=10.0, max_iter=2000, random_state=seed)
    with warnings.catch_warnings():
        # lbfgs stopping at max_iter still gives a usable reference; the report stays one line.
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x_train, train_labels)
    probs = np.zeros((len(eval_texts), num_classes), np.float64)
    # A class absent from training gets probability 0 (its column stays zero).
    probs[:, clf.classes_] = clf.predict_proba(features.transform(eval_texts))
    return probs


def baseline_metrics(train_texts: list[str], train_labels: np.ndarray, eval_texts: list[str],
                     eval_labels: np.ndarray, class_names: list[str], seed: int = 0) -> dict | None:
    """{"accuracy", "macro_f1", "train_rows", "eval_rows"} of the TF-IDF + logistic-regression
    baseline, or None without scikit-learn."""
    if not sklearn_available():
        return None
    from tasks.classify.metrics import accuracy, confusion_matrix, precision_recall_f1
    probs = tfidf_logreg_predict(train_texts, np.asarray(train_labels), eval_texts, len(class_names), seed)
    pred = probs.argmax(1)
    prf = precision_recall_f1(confusion_matrix(eval_labels, pred, len(class_names)))
    return {"accuracy": accuracy(eval_labels, pred), "macro_f1": prf["macro_f1"],
            "train_rows": len(train_texts), "eval_rows": len(eval_texts)}


def baseline_line(metrics: dict | None) -> str:
    """The report line: the baseline's figures, or how to get them."""
    if metrics is None:
        return f"baseline tfidf+logreg: not computed, scikit-learn is not installed ({INSTALL_HINT})"
    if "skipped" in metrics:
        return f"baseline tfidf+logreg: not computed, {metrics['skipped']}"
    return (f"baseline tfidf+logreg: accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['macro_f1']:.4f} "
            f"(trained on the same {metrics['train_rows']:,} training rows, scored on the same "
            f"{metrics['eval_rows']:,} rows)")
