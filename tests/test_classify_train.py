"""Fine-tuning a tiny classifier on an easy synthetic CSV, then `evaluate.py classify` on it;
pooling; initialising the backbone from a language-model checkpoint; SIGTERM and resume (the
classifier trains through the one Trainer)."""
import csv
import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT
from configs import load_config

TINY = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.mlp_dim=128",
        "model.vocab_size=512", "model.max_seq_len=64", "data.seq_len=32", "task.max_len=32",
        "train.batch_size=16", "train.warmup_steps=20", "train.lr=2e-3", "checkpoint.async_save=false"]

WORDS = {"sport": ["goal", "match", "team", "score"], "food": ["bread", "soup", "apple", "cheese"],
         "tech": ["laptop", "server", "compiler", "kernel"]}
FILLER = ["the", "a", "today", "was", "quite", "and", "this", "we", "saw", "very", "some", "of"]


def easy_csv(path, n, seed):
    """Each text holds one keyword of its class among random filler words."""
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "label"])
        for i in range(n):
            label = rng.choice(sorted(WORDS))
            words = rng.choices(FILLER, k=rng.randint(3, 12))
            words.insert(rng.randint(0, len(words)), rng.choice(WORDS[label]))
            w.writerow([f"row{i}", " ".join(words), label])
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import train
    tmp = tmp_path_factory.mktemp("classify")
    data = easy_csv(tmp / "train.csv", 480, 0)
    run = tmp / "run"
    rc = train.main(["configs/tasks/classify.yaml", f"data.path={data}", f"train.run_dir={run}",
                     "train.steps=160", "train.eval_every=80", "train.log_every=40", "checkpoint.every=80"] + TINY)
    assert rc == 0
    return tmp, run


def test_finetune_reaches_high_validation_accuracy(trained):
    _, run = trained
    metrics = json.loads((run / "val" / "metrics.json").read_text())
    assert metrics["accuracy"] >= 0.95, metrics["accuracy"]
    assert metrics["classes"] == ["food", "sport", "tech"] and 40 <= metrics["n"] <= 60
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_accuracy" in r for r in rows) and any("loss" in r for r in rows)
    assert list((run / "tensorboard").iterdir()), "TensorBoard events missing"
    for name in ("config.yaml", "labels.json", "tokenizer.model"):
        assert (run / name).is_file()
    # The result is the best evaluation (the preset's task.best_by), and the report says which.
    best = json.loads((run / "best" / "best.json").read_text())
    evals = [(r["step"], r) for r in rows if "val_accuracy" in r]
    from tasks.classify.best import best_step
    assert best["step"] == best_step(evals, "val_accuracy") == metrics["step"]
    assert metrics["accuracy"] == pytest.approx(best["metrics"]["val_accuracy"])
    assert "baseline_tfidf_logreg" in metrics


def test_evaluate_classify_writes_report(trained, capsys):
    import evaluate
    tmp, run = trained
    test_csv = easy_csv(tmp / "test.csv", 64, 1)
    out = tmp / "eval"
    capsys.readouterr()
    assert evaluate.main(["classify", str(run), str(test_csv), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "the best evaluation by val_accuracy" in printed and "\nbaseline tfidf+logreg: " in printed
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy", "macro_f1", "weighted_f1", "roc_auc", "per_class", "confusion_matrix"):
        assert key in metrics
    assert metrics["accuracy"] >= 0.9 and metrics["roc_auc"] >= 0.95
    assert np.array(metrics["confusion_matrix"]).sum() == 64
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 64 and rows[0]["id"] == "row0"
    assert set(rows[0]) == {"id", "true_label", "predicted_label", "p_food", "p_sport", "p_tech"}
    assert abs(sum(float(rows[0][f"p_{c}"]) for c in WORDS) - 1) < 1e-4
    for png in ("confusion_matrix.png", "roc_curves.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert evaluate.main(["lm", str(run), str(test_csv)]) == 2  # a classifier is not a language model
    assert "use `evaluate.py classify`" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_continues_from_checkpoint(trained, capsys):
    """Running again with more steps restores step 160 instead of starting over."""
    import train
    tmp, run = trained
    rc = train.main(["configs/tasks/classify.yaml", f"data.path={tmp / 'train.csv'}", f"train.run_dir={run}",
                     "train.steps=170", "train.eval_every=0", "train.log_every=10"] + TINY)
    assert rc == 0
    err = capsys.readouterr().err
    assert "step 170/170" in err and "step 10/" not in err
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir())[-1] == 170


def test_pooling_last_and_mean():
    from tasks.classify.model import pool
    h = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
    lengths = jnp.array([2, 4])
    np.testing.assert_allclose(pool(h, lengths, "last"), np.stack([h[0, 1], h[1, 3]]))
    np.testing.assert_allclose(pool(h, lengths, "mean"), np.stack([h[0, :2].mean(0), h[1].mean(0)]))


def test_padding_does_not_change_logits():
    """A row's logits depend only on its real tokens, for either pooling."""
    from flax import nnx
    from tasks.classify.model import Classifier
    cfg = load_config("configs/tasks/classify.yaml", TINY)
    tokens = jnp.array([[1, 50, 60, 70, 2, 0, 0, 0]])
    for pooling in ("last", "mean"):
        graphdef, params = nnx.split(Classifier(cfg.model, 3, pooling, rngs=nnx.Rngs(0)))
        fn = jax.jit(lambda p, t, n: nnx.merge(graphdef, p)(t, n))  # eager NNX is slow on 8 devices
        both = fn(params, jnp.concatenate([tokens, tokens.at[:, 5:].set(99)]), jnp.array([5, 5]))
        np.testing.assert_allclose(both[0], both[1], rtol=1e-5, atol=1e-6)


def test_init_from_language_model_checkpoint(tmp_path):
    """train.init_from loads an LM run directory's weights and tokenizer into the backbone."""
    from flax import nnx
    from tasks.classify.dataset import train_tokenizer
    from tasks.classify.train import ClassifyTask
    from training.loop import Trainer
    from store.checkpoint import save_params
    from model.transformer import Transformer
    lm_cfg = load_config("configs/tiny.yaml", TINY)
    lm_dir = tmp_path / "lm"
    lm = Transformer(lm_cfg.model, rngs=nnx.Rngs(7))
    save_params(lm_dir, lm_cfg, nnx.state(lm))
    texts = [" ".join(random.Random(i).choices(FILLER, k=8)) for i in range(200)]
    tok = train_tokenizer(texts, 512, lm_dir / "tokenizer.model")
    data = easy_csv(tmp_path / "d.csv", 60, 2)
    cfg = load_config("configs/tasks/classify.yaml", TINY + [f"data.path={data}", f"train.init_from={lm_dir}",
                                                             f"train.run_dir={tmp_path / 'run'}"])
    run = Trainer(cfg, log_enabled=False, task=ClassifyTask())
    try:
        got = run.state["params"]["backbone"]["embedding"]
        np.testing.assert_array_equal(np.asarray(got), np.asarray(lm.embedding[...]))
        assert run.tokenizer.vocab_size == tok.vocab_size and (tmp_path / "run" / "tokenizer.model").is_file()
        assert run.cfg.task.num_classes == 3 and jax.tree.leaves(run.state["params"]["head_w"])
    finally:
        run.close()


def test_sigterm_saves_and_a_rerun_resumes(tmp_path):
    """SIGTERM mid-run saves the step reached and exits 0 without a report; the same command then
    resumes from that checkpoint (not from step 0) and writes val/."""
    run = tmp_path / "run"
    small = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1", "model.mlp_dim=64",
             "train.batch_size=8", "train.eval_every=0", "train.log_every=1", "checkpoint.every=100000"]
    args = ["train.py", "configs/tasks/classify.yaml", f"data.path={easy_csv(tmp_path / 'd.csv', 96, 3)}",
            f"train.run_dir={run}", *TINY, *small]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")

    def steps_logged() -> list[int]:
        path = run / "metrics.jsonl"
        rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        return [r["step"] for r in rows if "loss" in r]

    def saved() -> list[int]:
        return sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())

    proc = subprocess.Popen([sys.executable, *args, "train.steps=100000"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not steps_logged():
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "SIGTERM received: saving step" in err
    first = max(steps_logged())
    assert saved() == [first] and not (run / "val").exists()

    again = subprocess.run([sys.executable, *args, f"train.steps={first + 2}"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    logged = steps_logged()
    assert logged.count(1) == 1 and logged.count(first + 1) == 1  # resumed at `first`, not from 0
    assert saved() == [first, first + 2] and (run / "val" / "metrics.json").is_file()
