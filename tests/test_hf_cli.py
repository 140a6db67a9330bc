"""`python -m interop.hf`: import/export with tokenizers, and bad input failing cleanly.

Bad input (unsupported architecture, missing shard, shape mismatch, ...) must give a one-line
error naming the field, tensor or file, exit code 2, and leave nothing at OUT_DIR. An HF directory
with its tokenizer is also used as it is: served (Qwen3) and fine-tuned from with train.init_from.
"""
from __future__ import annotations

import json
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)  # tiny models: threads only contend on the shared 2-core machines

from configs import load_config  # noqa: E402
from interop.hf import main  # noqa: E402
from interop.load import load_checkpoint  # noqa: E402
from interop.tokenizers import HFTokenizer  # noqa: E402
from sharding.mesh import make_mesh  # noqa: E402
from store.checkpoint import write_config  # noqa: E402
from conftest import ROOT  # noqa: E402

TEXT = "Hello, wörld! Привет мир. 你好，世界。 🙂"


def save_tiny_model(path, family: str = "Llama", config_extra: dict | None = None, **save_kwargs):
    """A 2-layer random model of `family` plus a byte-level BPE tokenizer with a chat template;
    returns the torch model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    torch.manual_seed(0)
    config = getattr(transformers, {"Gemma3": "Gemma3TextConfig"}.get(family, f"{family}Config"))(**{
        **dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1),
        **(config_extra or {})})
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    with torch.no_grad():  # norm scales away from their all-ones init, so a q/k norm mix-up shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path, **save_kwargs)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator([TEXT] * 8, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    fast.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "tiny-llama"
    save_tiny_model(path)
    return path


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    """A tiny Qwen3: q/k norm, head_dim 32 (not hidden / heads = 16), GQA, tied embeddings."""
    path = tmp_path_factory.mktemp("hf") / "tiny-qwen3"
    model = save_tiny_model(path, "Qwen3", dict(head_dim=32, tie_word_embeddings=True, rope_theta=1000000.0))
    return path, model


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(load_config("tiny"))


def run_cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()  # drop earlier output (e.g. transformers' progress bars)
    code = main([*argv, "--quiet"])
    return code, capsys.readouterr().err.strip()


def assert_clean_failure(code: int, err: str, out_dir, *fragments):
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for fragment in fragments:
        assert fragment in err, err
    assert not out_dir.exists()
    assert not list(out_dir.parent.glob(f".{out_dir.name}.*")), "temporary directory left behind"


def test_import_export_with_tokenizer(hf_dir, tmp_path, capsys, mesh):
    run_dir, out_dir, bf16_dir = tmp_path / "run", tmp_path / "export", tmp_path / "bf16"
    assert run_cli(capsys, "import", str(hf_dir), str(run_dir))[0] == 0
    for name in ("config.yaml", "tokenizer.json", "tokenizer_config.json", "hf_config.json"):
        assert (run_dir / name).is_file(), name
    cfg, graphdef, state, tok = load_checkpoint(run_dir, mesh)
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert isinstance(tok, HFTokenizer)
    assert tok.encode(TEXT) == hf_tok.encode(TEXT, add_special_tokens=False)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user] hi\n"

    assert run_cli(capsys, "export", str(run_dir), str(out_dir))[0] == 0
    assert transformers.AutoTokenizer.from_pretrained(out_dir).encode(TEXT) == hf_tok.encode(TEXT)
    config = json.loads((out_dir / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (0, 1)

    # bfloat16 export: transformers reads it as bf16; loading it back gives the bf16-rounded values
    # (as fp32 by default, bf16 with model.param_dtype=bfloat16).
    assert run_cli(capsys, "export", str(run_dir), str(bf16_dir), "--dtype", "bfloat16")[0] == 0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(bf16_dir)
    assert reloaded.model.embed_tokens.weight.dtype == torch.bfloat16
    cfg16, _, state16, _ = load_checkpoint(bf16_dir, mesh, overrides=["model.param_dtype=bfloat16"], progress=False)
    assert cfg16.model.param_dtype == "bfloat16" and cfg.model.param_dtype == "float32"
    expected = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16), nnx.to_pure_dict(state))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.to_pure_dict(state16)), expected)


def test_unsupported_architecture_subprocess(hf_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in hf_dir.iterdir():
        (bad / f.name).symlink_to(f)
    (bad / "config.json").unlink()
    config = json.loads((hf_dir / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    out_dir = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "interop.hf", "import", str(bad), str(out_dir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert_clean_failure(proc.returncode, proc.stderr.strip(), out_dir, "GPT2LMHeadModel", "'architectures'")


def edited_copy(hf_dir, dst, **config_changes):
    """A copy of hf_dir with config.json fields changed."""
    dst.mkdir()
    for f in hf_dir.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    config = json.loads((hf_dir / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, **config_changes}))
    return dst


@pytest.mark.parametrize("change, fragments", [
    (dict(intermediate_size=96), ["tensor 'model.layers.0.mlp.gate_proj.weight' has shape [128, 64]",
                                  "[96, 64]"]),
    (dict(num_hidden_layers=3), ["tensor 'model.layers.2.input_layernorm.weight' is missing"]),
    (dict(num_hidden_layers=1), ["unexpected tensor 'model.layers.1."]),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), ["'yarn'", "'rope_parameters.rope_type'"]),
    (dict(hidden_act="gelu"), ["'hidden_act'"]),
    (dict(hidden_size=None), ["'hidden_size'"]),
])
def test_bad_config_fails_cleanly(hf_dir, tmp_path, capsys, change, fragments):
    bad = edited_copy(hf_dir, tmp_path / "bad", **change)
    out_dir = tmp_path / "out"
    assert_clean_failure(*run_cli(capsys, "import", str(bad), str(out_dir)), out_dir, *fragments)


def test_missing_shard_fails_cleanly(tmp_path, capsys):
    hf = tmp_path / "sharded"
    save_tiny_model(hf, max_shard_size="60KB")
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (hf / victim).unlink()
    out_dir = tmp_path / "out"
    assert_clean_failure(*run_cli(capsys, "import", str(hf), str(out_dir)), out_dir, f"missing shard '{victim}'")


def test_failure_while_writing_leaves_nothing(hf_dir, tmp_path, capsys, monkeypatch):
    import store.checkpoint

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(store.checkpoint, "save_params", disk_full)
    out_dir = tmp_path / "out"
    with pytest.raises(OSError):
        main(["import", str(hf_dir), str(out_dir), "--quiet"])
    assert not out_dir.exists() and not list(tmp_path.glob(".out.*"))


def test_existing_output_and_unexportable_model(hf_dir, tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("mine")
    code, err = run_cli(capsys, "import", str(hf_dir), str(out_dir))
    assert code == 2 and "already exists" in err and (out_dir / "keep.txt").read_text() == "mine"

    run_dir = tmp_path / "qk"  # q/k norm exports as Qwen3, whose only bias switch adds an o_proj bias
    write_config(run_dir, load_config("tiny", ["model.qk_norm=true", "model.qkv_bias=true"]))
    code, err = run_cli(capsys, "export", str(run_dir), str(tmp_path / "exp"))
    assert code == 2 and "model.qkv_bias" in err and not (tmp_path / "exp").exists()


def test_checkpoint_config_and_adopt_architecture(hf_dir, tmp_path, mesh):
    from configs import ConfigError
    from interop.load import adopt_architecture, checkpoint_config
    src = checkpoint_config(hf_dir)
    assert (src.model.d_model, src.model.vocab_size, src.model.n_kv_heads) == (64, 320, 2)
    cfg = adopt_architecture(load_config("tiny", ["model.remat=full"]), src)
    assert cfg.model.d_model == 64 and cfg.model.remat == "full" and not cfg.model.tie_embeddings
    with pytest.raises(ConfigError, match="neither a Tessera run directory"):
        checkpoint_config(tmp_path)
    (tmp_path / "config.json").write_bytes((hf_dir / "config.json").read_bytes())
    with pytest.raises(ConfigError, match=r"no \*.safetensors weights"):
        load_checkpoint(tmp_path, mesh)


def serve_greedy(path, model, overrides: list[str], expect=lambda cfg, tok: None):
    """Serve 16 greedy tokens after a 16-token prompt from the directory `path`; returns the token
    ids, their served logprobs and transformers' logprobs [n,V] teacher-forced on them."""
    from serving.engine import Engine
    from serving.load import load_for_serving
    from serving.sampling import SamplingParams
    cfg, mesh, params, tok = load_for_serving(str(path), overrides)
    expect(cfg, tok)
    prompt, n = tok.encode(TEXT)[:16], 16
    eng = Engine(cfg, params, tok, mesh=mesh).start()
    try:
        out = eng.generate(prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    finally:
        eng.stop()
    ids = np.array(out["token_ids"])
    assert len(ids) == n
    with torch.no_grad():  # transformers teacher-forced on the served tokens
        logits = model(torch.tensor([prompt + ids.tolist()])).logits[0, len(prompt) - 1:-1]
    return ids, np.array(out["logprobs"]), torch.log_softmax(logits.float(), -1).numpy()


def assert_served_matches(ids, served, logp, bound: float, what: str, top1: bool = True) -> None:
    """Served logprobs within `bound` of transformers'; with top1, the served token is
    transformers' argmax wherever its top-2 margin is beyond rounding."""
    diff = float(np.abs(served - logp[np.arange(len(ids)), ids]).max())
    print(f"serve {what}: max abs logprob diff {diff:.2e}")
    assert diff <= bound, diff
    if top1:
        top2 = np.sort(logp, axis=-1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 2e-4
        assert clear.mean() >= 0.9 and (logp.argmax(-1)[clear] == ids[clear]).all()


def test_serve_qwen3_hf_directory(qwen3_dir):
    """The serving loader takes a Qwen3 HF directory as it is; paged greedy decoding picks
    transformers' tokens with its logprobs."""
    path, model = qwen3_dir

    def expect(cfg, tok):
        assert cfg.model.qk_norm and cfg.model.resolved_head_dim == 32 and isinstance(tok, HFTokenizer)
    assert_served_matches(*serve_greedy(path, model, ["serve.kv_dtype=float32"], expect), 1e-4, "qwen3")


GEMMA_DIRS = {  # 4 layers, window 8 < the 32 tokens served, head_dim 16; Gemma 2 with soft caps,
    # Gemma 3 with 1 group of 3 layers and 1 local layer left, linear RoPE scaling on the global one
    "Gemma2": dict(num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
                   attn_logit_softcapping=3.0, final_logit_softcapping=5.0, attn_implementation="eager"),
    "Gemma3": dict(num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                   sliding_window_pattern=3, attn_implementation="eager",
                   rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
}


@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
@pytest.mark.parametrize("family", sorted(GEMMA_DIRS))
def test_serve_gemma_hf_directory(family, int8, tmp_path):
    """A Gemma 2 / Gemma 3 HF directory served as it is: paged greedy decoding (local and global
    layers, soft caps) picks transformers' tokens with its logprobs. With int8 weights and an int8
    cache the logprobs of the served tokens stay within 0.15 of transformers' (measured 0.025 to
    0.039; a missing norm offset, soft cap or window moves them by O(1))."""
    model = save_tiny_model(tmp_path / family, family, GEMMA_DIRS[family])
    overrides = ["serve.kv_dtype=int8", "serve.int8_weights=true"] if int8 else ["serve.kv_dtype=float32"]

    def expect(cfg, tok):
        assert cfg.model.post_norms and cfg.model.global_every == {"Gemma2": 2, "Gemma3": 3}[family]
    # int8 rounding may flip near-ties, so the served tokens can leave transformers' greedy path
    assert_served_matches(*serve_greedy(tmp_path / family, model, overrides, expect), 0.15 if int8 else 1e-4,
                          f"{family} ({'int8' if int8 else 'fp32'})", top1=not int8)


def test_train_init_from_qwen3_hf_directory(qwen3_dir, tmp_path):
    """train.init_from takes a Qwen3 HF directory: its architecture, tokenizer and weights."""
    from training.loop import Trainer
    path, _ = qwen3_dir
    text = tmp_path / "text.txt"
    text.write_text((TEXT + "\n") * 200)
    cfg = load_config("tiny", [f"data.path={text}", f"data.val_path={text}", "data.seq_len=32",
                               "train.batch_size=8", "train.eval_batches=1", f"train.init_from={path}",
                               f"train.run_dir={tmp_path / 'run'}"])
    run = Trainer(cfg, log_enabled=False)
    try:
        m = run.cfg.model
        assert (m.qk_norm, m.head_dim, m.tie_embeddings, m.rope_theta) == (True, 32, True, 1e6)
        assert (tmp_path / "run" / "tokenizer.json").is_file()
        _, _, expected, _ = load_checkpoint(path, run.mesh, progress=False)
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(run.state["params"]),
                     jax.tree.map(np.asarray, nnx.to_pure_dict(expected)))
    finally:
        run.close()
