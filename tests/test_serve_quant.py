"""int8 weights: the QArray matmul, size, quality against bf16, the offline int8 checkpoint, CLI."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import serve_helpers as H
from model.quant import QArray, quantize, quantize_params, tree_nbytes
from model.transformer import forward
from serving.load import load_for_serving, save_int8


@pytest.mark.parametrize("act_quant", [True, False])
@pytest.mark.parametrize("eq,xs,ws,contract", [
    ("BTD,DNH->BTNH", (2, 3, 32), (32, 4, 8), (0,)),
    ("BTNH,NHD->BTD", (2, 3, 4, 8), (4, 8, 32), (0, 1)),
    ("BTD,DV->BTV", (2, 3, 32), (32, 50), (0,)),
])
def test_qarray_matmul_close_to_float(eq, xs, ws, contract, act_quant):
    kx, kw = jax.random.split(jax.random.key(0))
    x, w = jax.random.normal(kx, xs), jax.random.normal(kw, ws)
    q = quantize(w, contract, act_quant)
    assert q.values.dtype == jnp.int8 and q.scale.dtype == jnp.float32
    ref = jnp.einsum(eq, x, w)
    got = q.matmul(eq, x)
    assert got.shape == ref.shape
    rel = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
    assert rel < (0.02 if act_quant else 0.01), rel


@pytest.mark.parametrize("eq,xs,ws,contract", [
    ("BTD,DNH->BTNH", (2, 1, 32), (32, 4, 8), (0,)),
    ("BTNH,NHD->BTD", (2, 1, 4, 8), (4, 8, 32), (0, 1)),
    ("TBD,DF->TBF", (1, 2, 32), (32, 24), (0,)),
])
def test_qarray_matmul_of_one_row_is_that_row_of_many(eq, xs, ws, contract):
    """One row (a batch-1 decode step) is padded to two for XLA CPU's fast int8 dot: the result
    is the row itself, as computed beside any other row (activations are quantized per row)."""
    kx, kw = jax.random.split(jax.random.key(3))
    x, q = jax.random.normal(kx, xs), quantize(jax.random.normal(kw, ws), contract)
    axis = 1 if eq.startswith("T") else 0
    one = jax.lax.slice_in_dim(x, 0, 1, axis=axis)
    got, many = q.matmul(eq, one), q.matmul(eq, x)
    assert got.shape == jax.lax.slice_in_dim(many, 0, 1, axis=axis).shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(jax.lax.slice_in_dim(many, 0, 1, axis=axis)),
                               rtol=1e-6, atol=1e-6)


def test_tied_embedding_transpose_and_rows():
    w = jax.random.normal(jax.random.key(1), (50, 16))  # [V,D]
    q = quantize(w, (1,))
    h = jax.random.normal(jax.random.key(2), (1, 2, 16))
    ref = jnp.einsum("BTD,DV->BTV", h, w.T)
    assert float(jnp.abs(q.T.matmul("BTD,DV->BTV", h) - ref).max()) < 0.1 * float(jnp.abs(ref).max())


@pytest.mark.parametrize("act_quant", [True, False])
@pytest.mark.parametrize("lead", [(1, 1), (3, 1), (2, 5)])
def test_matmul_rows_equals_the_transposed_head(lead, act_quant):
    """The tied int8 head's fast form (rows contracted in place, one row padded to two) computes
    exactly what the [D,V] einsum does, for one row and for many."""
    w = jax.random.normal(jax.random.key(1), (50, 16))  # [V,D]
    q = quantize(w, (1,), act_quant)
    h = jax.random.normal(jax.random.key(2), (*lead, 16))
    got = q.matmul_rows(h)
    assert got.shape == (*lead, 50) and got.dtype == h.dtype
    np.testing.assert_allclose(np.asarray(got), np.asarray(q.T.matmul("BTD,DV->BTV", h)), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def trained():
    run = H.checkpoint(H.TRAIN_STEPS)
    cfg, _, params, tok = load_for_serving(str(run), int8=False)
    return run, cfg, params, tok


def test_int8_bytes_and_quality_vs_bf16(trained):
    _, cfg, params, tok = trained
    bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    q = jax.jit(quantize_params)(params)
    assert isinstance(q["layers"]["wq"], QArray) and isinstance(q["embedding"], QArray)
    ratio = tree_nbytes(q) / tree_nbytes(bf16)
    assert ratio <= 0.55, ratio
    _, held = H.corpus()
    ids = np.array([1] + tok.encode(held), np.int32)
    T = cfg.model.max_seq_len
    n = (len(ids) - 1) // T
    x = ids[: n * T + 1]
    inputs = x[:-1].reshape(n, T)                       # [B,T]
    targets = x[1:].reshape(n, T)
    fwd = jax.jit(lambda p, t: forward(p, t, cfg.model, cfg.mesh.rules))
    lb, lq = fwd(bf16, inputs), fwd(q, inputs)          # [B,T,V]
    agree = float(jnp.mean(jnp.argmax(lb, -1) == jnp.argmax(lq, -1)))
    nll = lambda lg: float(-jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(lg), targets[..., None], -1)))
    ppl_b, ppl_q = np.exp(nll(lb)), np.exp(nll(lq))
    print(f"int8/bf16 bytes {ratio:.3f}, top-1 agreement {agree:.4f}, ppl bf16 {ppl_b:.3f} int8 {ppl_q:.3f}")
    assert agree >= 0.95, agree
    assert abs(ppl_q / ppl_b - 1) <= 0.02, (ppl_b, ppl_q)


def test_offline_int8_checkpoint_roundtrip(trained, tmp_path):
    run, cfg, params, tok = trained
    q = jax.jit(quantize_params)(params)
    out = tmp_path / "int8"
    save_int8(str(out), cfg, q, tok.path)
    cfg2, _, q2, tok2 = load_for_serving(str(out))
    assert cfg2.serve.int8_weights and tok2.vocab_size == tok.vocab_size
    for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(q2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert type(q2["layers"]["w_up"]) is QArray


def test_int8_checkpoint_carries_the_tokenizer_files(trained, tmp_path):
    """save_int8 stores the tokenizer under the name the loader reads (tokenizer.json stays JSON),
    with the files beside it in an HF layout that set the chat template and stop ids."""
    from interop.tokenizers import HFTokenizer, load_tokenizer_dir
    tokenizers = pytest.importorskip("tokenizers")
    _, cfg, _, tok = trained
    params = {"w": jnp.zeros((2,), jnp.float32)}
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "tokenizer.model").write_bytes(open(tok.path, "rb").read())
    (hf / "tokenizer_config.json").write_text('{"chat_template": "{{ messages[0].content }}"}')
    (hf / "generation_config.json").write_text('{"eos_token_id": [2, 5]}')
    save_int8(str(tmp_path / "sp"), cfg, params, str(hf / "tokenizer.model"))
    sp = load_tokenizer_dir(tmp_path / "sp")
    assert sp.vocab_size == tok.vocab_size and sp.eos_ids == (2, 5)
    assert sp.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi"
    words = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "hi": 1}, unk_token="<unk>"))
    words.save(str(hf / "tokenizer.json"))
    save_int8(str(tmp_path / "json"), cfg, params, str(hf / "tokenizer.json"))
    assert isinstance(load_tokenizer_dir(tmp_path / "json"), HFTokenizer)
    other = tmp_path / "elsewhere.model"  # a data.tokenizer file of any name: just the model
    other.write_bytes(open(tok.path, "rb").read())
    save_int8(str(tmp_path / "plain"), cfg, params, str(other))
    assert sorted(p.name for p in (tmp_path / "plain").iterdir() if "tokenizer" in p.name) == ["tokenizer.model"]


def test_cli_bad_checkpoint_exits_2(tmp_path):
    r = subprocess.run([sys.executable, str(H.ROOT / "serve.py"), str(tmp_path / "missing"), "--prompt", "x"],
                       capture_output=True, text=True, timeout=120, cwd=H.ROOT)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "not found" in r.stderr


@pytest.mark.slow
def test_cli_prompt_prints_completion():
    run = H.checkpoint(H.TRAIN_STEPS)
    r = subprocess.run([sys.executable, str(H.ROOT / "serve.py"), str(run), "--int8", "--prompt", "def f(",
                        "--max-tokens", "8"], capture_output=True, text=True, timeout=300, cwd=H.ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("def f(") and len(r.stdout.strip()) > len("def f(")
