"""Classification quality tools: the TF-IDF + logistic-regression baseline and its report line,
dropout (rate 0 is the plain forward pass; rate > 0 changes training outputs only, reproducibly
from the step counter) and keeping the best evaluation's params."""
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import load_config
from test_classify_train import TINY, easy_csv

TOKENS = jnp.array([[1, 50, 60, 70, 2, 0, 0, 0], [1, 9, 8, 7, 6, 5, 4, 2]])  # [B,T]
LENGTHS = jnp.array([5, 8])


def tiny_cfg(*extra):
    return load_config("configs/tasks/classify.yaml", TINY + list(extra))


def make(dropout: float, pooling: str = "mean"):
    from tasks.classify.model import Classifier
    cfg = tiny_cfg()
    return nnx.split(Classifier(cfg.model, 3, pooling, rngs=nnx.Rngs(0), dropout=dropout, seed=0))


def run(graphdef, params, step=None, row=None):
    fn = jax.jit(lambda p, t, n, s, r: nnx.merge(graphdef, p)(t, n, s, r))  # eager NNX is slow on 8 devices
    return np.asarray(fn(params, TOKENS, LENGTHS, step, row))


def rows_at(step: int):
    return jnp.full((2,), step, jnp.int32), jnp.arange(2, dtype=jnp.int32)


# --- baseline ----------------------------------------------------------------------------------

def read(path):
    from tasks.classify.dataset import LabelMap, read_csv
    ex = read_csv(path)
    labels = LabelMap.from_labels(ex.labels)
    return ex, labels, labels.encode(ex)


def test_baseline_fits_an_easy_csv(tmp_path):
    pytest.importorskip("sklearn")
    from tasks.classify.baseline import baseline_line, baseline_metrics
    train, train_labels, y_train = read(easy_csv(tmp_path / "train.csv", 240, 0))
    test, _, _ = read(easy_csv(tmp_path / "test.csv", 60, 1))
    y_test = train_labels.encode(test)
    m = baseline_metrics(train.texts, y_train, test.texts, y_test, train_labels.names)
    assert m["accuracy"] >= 0.95 and m["macro_f1"] >= 0.95, m
    assert (m["train_rows"], m["eval_rows"]) == (240, 60)
    line = baseline_line(m)
    assert line.startswith("baseline tfidf+logreg: accuracy ") and "same 240 training rows" in line


def test_baseline_line_without_sklearn(tmp_path, monkeypatch):
    from tasks.classify.baseline import baseline_line, baseline_metrics, sklearn_available
    monkeypatch.setitem(sys.modules, "sklearn", None)  # `import sklearn` now raises ImportError
    assert not sklearn_available()
    ex, labels, y = read(easy_csv(tmp_path / "d.csv", 30, 0))
    assert baseline_metrics(ex.texts, y, ex.texts, y, labels.names) is None
    line = baseline_line(None)
    assert "not computed" in line and "pip install 'tessera[baseline]'" in line and "\n" not in line


# --- dropout -----------------------------------------------------------------------------------

# Comparisons between separately compiled programs (with and without step/row inputs, another
# graphdef) allow fp32 rounding: XLA may fuse them differently on another CPU.
SAME = dict(rtol=1e-6, atol=1e-6)


def test_dropout_zero_is_the_plain_forward_pass():
    """Rate 0: step and row change nothing, and the output is the backbone -> pool -> head of
    before dropout existed (to fp32 rounding: they are separate compiles)."""
    from tasks.classify.model import pool
    graphdef, params = make(0.0)
    plain = run(graphdef, params)
    np.testing.assert_allclose(run(graphdef, params, *rows_at(3)), plain, **SAME)

    def old_path(p, t, n):  # the classifier's forward pass as it was written before dropout
        m = nnx.merge(graphdef, p)
        seg = (jnp.arange(t.shape[1])[None, :] < n[:, None]).astype(jnp.int32)
        h = pool(m.backbone.backbone(t, None, seg), n, "mean").astype(jnp.float32)
        return h @ m.head_w[...].astype(jnp.float32) + m.head_b[...].astype(jnp.float32)
    np.testing.assert_allclose(np.asarray(jax.jit(old_path)(params, TOKENS, LENGTHS)), plain, **SAME)


def test_dropout_path_with_nothing_dropped_matches_the_backbone():
    """The dropout forward pass (embed -> decoder with a wrapping attend) is the backbone's own
    computation: with a keep probability of 1 it gives the same logits."""
    graphdef, params = make(1e-12)  # > 0 takes the dropout path; every unit is (almost surely) kept
    np.testing.assert_allclose(run(graphdef, params, *rows_at(0)), run(graphdef, params), rtol=1e-5, atol=1e-6)


def test_dropout_changes_training_outputs_only_and_reproducibly():
    graphdef, params = make(0.3)
    _, plain_params = make(0.0)
    evaluation = run(graphdef, params)
    np.testing.assert_allclose(evaluation, run(make(0.0)[0], plain_params), **SAME)  # eval: no dropout
    step3, again, step4 = run(graphdef, params, *rows_at(3)), run(graphdef, params, *rows_at(3)), \
        run(graphdef, params, *rows_at(4))
    assert not np.allclose(step3, evaluation)
    np.testing.assert_array_equal(step3, again)  # the masks are a function of (seed, step, row)
    assert not np.allclose(step3, step4)


def test_dropout_keys_depend_on_step_and_row_not_on_batch_layout():
    """A row's mask comes from (step, global row index), so splitting the batch (micro-batches,
    processes) draws the same masks."""
    from tasks.classify.model import dropout, dropout_keys
    x = jnp.ones((4, 6, 5))
    step, row = jnp.full((4,), 7, jnp.int32), jnp.arange(4, dtype=jnp.int32)
    whole = dropout(x, dropout_keys(0, step, row), 0, 0.5)
    halves = jnp.concatenate([dropout(x[:2], dropout_keys(0, step[:2], row[:2]), 0, 0.5),
                              dropout(x[2:], dropout_keys(0, step[2:], row[2:]), 0, 0.5)])
    np.testing.assert_array_equal(whole, halves)
    assert set(np.unique(np.asarray(whole))) == {0.0, 2.0}  # inverted dropout: kept units scaled by 1/(1-p)


def test_dropout_rate_is_checked():
    from configs import ConfigError
    with pytest.raises(ConfigError, match="task.dropout"):
        tiny_cfg("task.dropout=1.0")


# --- best evaluation ---------------------------------------------------------------------------

def test_best_step_picks_the_best_validation_metric():
    from tasks.classify.best import best_step
    evals = [(100, {"val_accuracy": 0.80, "val_loss": 0.60}), (200, {"val_accuracy": 0.90, "val_loss": 0.40}),
             (300, {"val_accuracy": 0.90, "val_loss": 0.35}), (400, {"val_accuracy": 0.85, "val_loss": 0.30}),
             (500, {"val_accuracy": 0.70, "val_loss": float("nan")})]
    assert best_step(evals, "val_accuracy") == 300  # 0.90 twice: the lower loss wins
    assert best_step(evals, "val_loss") == 400
    assert best_step(evals[-1:], "val_loss") is None  # a NaN loss never wins


def test_best_keeper_saves_only_improvements_and_survives_a_restart(tmp_path):
    from store.checkpoint import restore_params
    from tasks.classify.best import BEST_DIR, BestKeeper, read_record
    params = lambda v: {"w": jnp.full((2, 3), v, jnp.float32)}
    keep = BestKeeper(tmp_path, "val_accuracy")
    assert keep.offer(100, {"val_accuracy": 0.5, "val_loss": 1.0}, params(1.0))
    assert keep.offer(200, {"val_accuracy": 0.7, "val_loss": 0.9}, params(2.0))
    assert not keep.offer(300, {"val_accuracy": 0.6, "val_loss": 0.5}, params(3.0))
    again = BestKeeper(tmp_path, "val_accuracy")  # a resumed run knows what it has to beat
    assert not again.offer(400, {"val_accuracy": 0.7, "val_loss": 0.95}, params(4.0))
    assert read_record(tmp_path)["step"] == 200
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params(0.0))
    np.testing.assert_array_equal(restore_params(tmp_path / BEST_DIR, abstract)["w"], params(2.0)["w"])
    assert not BestKeeper(tmp_path / "other", "last").offer(1, {"val_accuracy": 1.0, "val_loss": 0.0}, params(5.0))
    assert not (tmp_path / "other").exists()


# --- auxiliary language-model loss -------------------------------------------------------------

def test_lm_loss_is_the_next_token_nll_of_each_text():
    """task.lm_loss_weight adds weight * each row's mean next-token NLL over its real tokens, as the
    language model computes it from the backbone; 0 leaves the objective as it was."""
    from model.transformer import forward
    from tasks.classify.model import Classifier, loss_fn
    cfg = tiny_cfg()
    graphdef, params = nnx.split(Classifier(cfg.model, 3, "last", rngs=nnx.Rngs(0), lm_loss_weight=0.5))
    plain_def, _ = nnx.split(Classifier(cfg.model, 3, "last", rngs=nnx.Rngs(0)))
    batch = {"tokens": TOKENS, "lengths": LENGTHS, "labels": jnp.array([0, 2]), "weights": jnp.array([1.0, 2.0])}
    objective, aux = jax.jit(lambda p: loss_fn(graphdef, p, batch))(params)
    plain, plain_aux = jax.jit(lambda p: loss_fn(plain_def, p, batch))(params)
    assert "lm_nll_sum" not in plain_aux

    logits = np.asarray(forward(params["backbone"], TOKENS, cfg.model, "fsdp"), np.float64)  # [B,T,V]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    tok, n = np.asarray(TOKENS), np.asarray(LENGTHS)
    per_row = np.array([-np.mean([logp[b, t, tok[b, t + 1]] for t in range(n[b] - 1)]) for b in range(2)])
    np.testing.assert_allclose(float(aux["lm_nll_sum"]), per_row.sum(), rtol=1e-4)
    np.testing.assert_allclose(float(objective), float(plain) + 0.5 * float(per_row @ np.array([1.0, 2.0])),
                               rtol=1e-4)


def test_lm_loss_weight_is_checked():
    from configs import ConfigError
    with pytest.raises(ConfigError, match="task.lm_loss_weight"):
        tiny_cfg("task.lm_loss_weight=-1")
