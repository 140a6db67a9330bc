"""tasks.classify.metrics equals scikit-learn on random predictions (sklearn is test-only)."""
import numpy as np
import pytest

sk = pytest.importorskip("sklearn.metrics")

from tasks.classify import metrics as M  # noqa: E402


def random_case(seed: int, n: int, C: int, ties: bool = False):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, C, n)
    y_true[:C] = np.arange(C)  # every class present, so one-vs-rest AUC is defined for all
    logits = rng.normal(size=(n, C)) + 1.5 * np.eye(C)[y_true] * rng.random((n, 1))
    if ties:  # coarse scores make many ties, the hard case for ROC code
        logits = np.round(logits, 0)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y_true, probs.argmax(1), probs


@pytest.mark.parametrize("seed,n,C,ties", [(0, 200, 2, False), (1, 300, 5, False), (2, 150, 3, True),
                                           (3, 97, 7, True), (4, 40, 2, True)])
def test_metrics_match_sklearn(seed, n, C, ties):
    y_true, y_pred, probs = random_case(seed, n, C, ties)
    labels = list(range(C))
    got = M.classification_metrics(y_true, y_pred, probs, [f"c{i}" for i in labels])
    assert got["accuracy"] == pytest.approx(sk.accuracy_score(y_true, y_pred))
    np.testing.assert_array_equal(np.array(got["confusion_matrix"]), sk.confusion_matrix(y_true, y_pred, labels=labels))
    p, r, f, s = sk.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    for i in labels:
        pc = got["per_class"][f"c{i}"]
        assert (pc["precision"], pc["recall"], pc["f1"], pc["support"]) == pytest.approx((p[i], r[i], f[i], s[i]))
    assert got["macro_f1"] == pytest.approx(sk.f1_score(y_true, y_pred, average="macro", zero_division=0))
    assert got["weighted_f1"] == pytest.approx(sk.f1_score(y_true, y_pred, average="weighted", zero_division=0))
    assert got["macro_precision"] == pytest.approx(sk.precision_score(y_true, y_pred, average="macro", zero_division=0))
    assert got["macro_recall"] == pytest.approx(sk.recall_score(y_true, y_pred, average="macro", zero_division=0))
    if C == 2:
        want = sk.roc_auc_score(y_true, probs[:, 1])
    else:
        want = sk.roc_auc_score(y_true, probs, multi_class="ovr", average="macro")
    assert got["roc_auc"] == pytest.approx(want, abs=1e-12)
    for i in labels:
        assert got["per_class"][f"c{i}"]["roc_auc"] == pytest.approx(sk.roc_auc_score(y_true == i, probs[:, i]))


@pytest.mark.parametrize("ties", [False, True])
def test_roc_curve_matches_sklearn(ties):
    y_true, _, probs = random_case(5, 120, 2, ties)
    fpr, tpr, thr = M.roc_curve(y_true == 1, probs[:, 1])
    want = sk.roc_curve(y_true, probs[:, 1], drop_intermediate=False)
    for a, b in zip((fpr, tpr, thr), want):
        np.testing.assert_allclose(a, b)


def test_degenerate_cases():
    # A class never predicted: precision 0 (as sklearn with zero_division=0), no NaN.
    y_true, y_pred = np.array([0, 1, 2, 2]), np.array([0, 0, 2, 2])
    prf = M.precision_recall_f1(M.confusion_matrix(y_true, y_pred, 3))
    assert prf["precision"][1] == 0 and prf["f1"][1] == 0
    # One class only in y_true: AUC undefined, reported as None.
    assert M.binary_auc([True, True, True], [0.1, 0.5, 0.9]) is None
    out = M.roc_auc(np.array([0, 0, 1]), np.array([[0.9, 0.1, 0.0], [0.5, 0.3, 0.2], [0.2, 0.7, 0.1]]))
    assert out["per_class"][2] is None and out["auc"] == pytest.approx(1.0)
