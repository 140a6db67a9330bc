"""Language-model evaluation: perplexity / bits per byte and multiple-choice log-likelihoods equal
a direct computation with the model; bad JSONL is a one-line error with exit code 2."""
import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

import data
from configs import load_config

TINY = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.mlp_dim=128",
        "model.vocab_size=512", "model.max_seq_len=64", "data.seq_len=32", "train.batch_size=8"]
TEXT = ["def add(a, b):\n    return a + b\n", "class Point:\n    x = 0\n    y = 0\n", "import os\nprint(os.sep)\n"]


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    """A random tiny LM saved as a Tessera run directory with a trained tokenizer."""
    from model.transformer import Transformer
    from store.checkpoint import save_params
    tmp = tmp_path_factory.mktemp("lm")
    cfg = load_config("configs/tiny.yaml", TINY)
    model = Transformer(cfg.model, rngs=nnx.Rngs(3))
    save_params(tmp / "run", cfg, nnx.state(model))
    data.train_tokenizer(TEXT * 30, 512, tmp / "run" / "tokenizer.model", 1 << 20)
    return tmp


def direct_loglik(lm, ids):
    """Log-probabilities of ids[1:] given the prefix, by one unsharded forward pass."""
    model = nnx.merge(lm.graphdef, lm.params)
    logits = np.asarray(model(jax.numpy.asarray([ids[:-1]])))[0]
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    return logp[np.arange(len(ids) - 1), ids[1:]]


@pytest.fixture(scope="module")
def lm(lm_dir):
    from evaluate import eval_mesh
    from tasks.lm_eval import load_lm
    return load_lm(lm_dir / "run", eval_mesh())


def test_perplexity_and_bpb_match_direct_computation(lm, lm_dir):
    from tasks.lm_eval import perplexity
    text_dir = lm_dir / "texts"
    text_dir.mkdir()
    for i, t in enumerate(TEXT):
        (text_dir / f"{i}.py").write_text(t)
    got = perplexity(lm, str(text_dir), seq_len=64)  # one packed row: no document is cut
    tok = lm.tokenizer
    nll, n_tokens, n_bytes = 0.0, 0, 0
    table = data.token_bytes(tok)
    for t in TEXT:  # each document is scored as if alone (segment ids isolate it in the row)
        ids = [tok.bos_id] + tok.encode(t) + [tok.eos_id]
        assert len(ids) <= 32
        nll -= direct_loglik(lm, ids).sum()
        n_tokens += len(ids) - 1
        n_bytes += int(table[ids[1:]].sum())
    assert got["tokens"] == n_tokens and got["bytes"] == n_bytes == sum(len(t.encode()) for t in TEXT)
    assert got["perplexity"] == pytest.approx(math.exp(nll / n_tokens), rel=1e-4)
    assert got["bits_per_byte"] == pytest.approx(nll / (math.log(2) * n_bytes), rel=1e-4)


def test_multiple_choice_scores_are_loglikelihoods(lm, lm_dir):
    from tasks.lm_eval import continuation_ids, multiple_choice
    rows = [{"context": "def add(a, b):\n    return", "choices": [" a + b", " a - b", " None"], "answer": 0},
            {"question": "import", "endings": [" os", " sys"], "label": " sys"}]
    path = lm_dir / "mc.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = lm_dir / "mc_out"
    got = multiple_choice(lm, str(path), out_dir=out)
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    for r, p in zip(rows, preds):
        ctx = r.get("context", r.get("question"))
        for choice, ll in zip(r.get("choices", r.get("endings")), p["loglik"]):
            c_ids, k_ids = continuation_ids(lm.tokenizer, ctx, choice)
            want = direct_loglik(lm, c_ids + k_ids)[-len(k_ids):].sum()
            assert ll == pytest.approx(want, rel=1e-4, abs=1e-4)
        assert p["predicted"] == int(np.argmax(p["loglik"]))
    assert preds[1]["answer"] == 1 and got["n"] == 2
    assert got["chance"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert got["accuracy"] == np.mean([p["predicted"] == p["answer"] for p in preds])


@pytest.mark.parametrize("content,expect", [
    ('{"context": "a", "choices": ["b", "c"], "answer": 0}\nnot json\n', "line 2: not valid JSON"),
    ('{"context": "a", "choices": ["b"], "answer": 0}\n', "line 1: needs 'choices'"),
    ('{"context": "a", "choices": ["b", "c"], "answer": 5}\n', "line 1: 'answer' must be a choice index"),
    ('{"choices": ["b", "c"], "answer": 0}\n', "line 1: needs a string 'context'"),
])
def test_bad_choice_file_is_one_line_exit_2(lm_dir, capsys, content, expect):
    import evaluate
    path = lm_dir / "bad.jsonl"
    path.write_text(content)
    assert evaluate.main(["choice", str(lm_dir / "run"), str(path), "--out", str(lm_dir / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expect in err and str(path) in err, err


def test_evaluate_lm_command_writes_metrics(lm_dir, capsys):
    import evaluate
    f = lm_dir / "one.txt"
    f.write_text("".join(TEXT))
    assert evaluate.main(["lm", str(lm_dir / "run"), str(f), "--out", str(lm_dir / "lm_out")]) == 0
    metrics = json.loads((lm_dir / "lm_out" / "metrics.json").read_text())
    assert metrics["bits_per_byte"] > 0 and metrics["perplexity"] > 1
    assert metrics["bytes"] == len("".join(TEXT).encode())
    assert evaluate.main(["lm", str(lm_dir / "run"), str(lm_dir / "missing.txt")]) == 2
    assert "data path not found" in capsys.readouterr().err
