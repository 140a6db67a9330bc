"""Directories laid out as real Hugging Face releases (tests/hf_release.py: Llama 3 and Qwen2
style, bf16 weights in several shards, 131072 positions): prompts start with BOS exactly when
transformers' tokenizer puts one there, and the loader reads config and weights with fp32 logits
equal to transformers' on the same bf16 weights."""
from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)  # tiny models: threads only contend on the shared 2-core machines

from configs import load_config  # noqa: E402
from hf_release import STYLES, release  # noqa: E402
from interop.load import checkpoint_config, hf_config, load_checkpoint  # noqa: E402
from interop.tokenizers import HFTokenizer, SentencePieceTokenizer, load_tokenizer_dir  # noqa: E402
from serving.openai import encode  # noqa: E402
from sharding.mesh import make_mesh  # noqa: E402
from test_hf_interop import FP32, forward, hf_logits  # noqa: E402
from test_hf_tokenizers import write_sentencepiece  # noqa: E402

TEXTS = ["def main(argv):\n    return 0\n", " leading space", "ünïcödé 🙂 你好", "", "<|eot_id|> as text"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]


def transformers_ids(path, text: str) -> list[int]:
    return transformers.AutoTokenizer.from_pretrained(path)(text)["input_ids"]


@pytest.mark.parametrize("style,add_bos", [("llama3", True), ("qwen2", False)])
def test_prompt_ids_match_transformers(style, add_bos):
    """(a) Llama 3: BOS from tokenizer.json's TemplateProcessing; (b) Qwen2: no BOS token at all."""
    path = release(style)
    tok, theirs = load_tokenizer_dir(path), transformers.AutoTokenizer.from_pretrained(path)
    assert isinstance(tok, HFTokenizer) and tok.add_bos is add_bos
    assert (theirs.bos_token_id is None) == (style == "qwen2")
    assert tok.bos_id == (-1 if theirs.bos_token_id is None else theirs.bos_token_id)
    for text in TEXTS:
        assert encode(tok, text) == theirs(text)["input_ids"], text
    # A chat prompt: the template writes the BOS text itself (Llama 3), which must not double it.
    rendered = tok.apply_chat_template(MESSAGES)
    assert rendered == theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert encode(tok, rendered) == theirs.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True,
                                                               return_dict=False)


def test_bos_defined_but_not_added_tokenizer_json(tmp_path):
    """(c) A tokenizer.json whose BOS is defined (bos_token set) but not added: add_bos_token
    false in tokenizer_config.json and a post-processor without it, as such a release is saved."""
    from tokenizers import Tokenizer, processors
    src, path = release("llama3"), tmp_path / "tok"
    path.mkdir()
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(src / name, path / name)
    backend = Tokenizer.from_file(str(src / "tokenizer.json"))
    backend.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1")
    backend.save(str(path / "tokenizer.json"))
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    tok = load_tokenizer_dir(path)
    assert tok.bos_id >= 0 and tok.bos_token == "<|begin_of_text|>" and tok.add_bos is False
    assert transformers.AutoTokenizer.from_pretrained(path).bos_token_id == tok.bos_id
    for text in TEXTS:
        assert encode(tok, text) == transformers_ids(path, text), text


@pytest.mark.parametrize("add_bos_token", [False, True, None])
def test_sentencepiece_bos_follows_tokenizer_config(tmp_path, add_bos_token):
    """(c) for tokenizer.model (Llama 2 style, <s> defined): tokenizer_config.json's add_bos_token
    decides. Without one, BOS is added: LlamaTokenizer's documented default, what transformers 4
    does (transformers 5.x adds none then, so that case is not compared with it)."""
    from data import Tokenizer
    write_sentencepiece(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    if add_bos_token is None:
        del config["add_bos_token"]
    else:
        config["add_bos_token"] = add_bos_token
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer_dir(tmp_path)
    assert isinstance(tok, SentencePieceTokenizer) and tok.bos_id == 1
    assert tok.add_bos is (add_bos_token is not False)
    assert Tokenizer(tmp_path / "tokenizer.model").add_bos is True  # Tessera's own: BOS whenever there is one
    for text in (TEXTS[0], TEXTS[2], "The quick brown fox."):  # (a leading space is a different story)
        ids = encode(tok, text)
        assert (ids[:1] == [1]) == tok.add_bos
        if add_bos_token is not None:
            assert ids == transformers_ids(tmp_path, text), text


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(load_config("tiny"))  # fsdp over the 8 fake CPU devices


@pytest.mark.parametrize("style", STYLES)
def test_loader_reads_sharded_bf16_release(style, mesh):
    path = release(style)
    config = json.loads((path / "config.json").read_text())
    shards = set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(shards) >= 2 and all((path / s).is_file() for s in shards)
    assert (config.get("torch_dtype") or config.get("dtype")) == "bfloat16"
    assert checkpoint_config(path).model.max_seq_len == hf_config(path).model.max_seq_len == 131072

    cfg, graphdef, state, tok = load_checkpoint(path, mesh, overrides=FP32, progress=False)
    assert cfg.model.vocab_size == config["vocab_size"] >= tok.vocab_size
    assert cfg.model.qkv_bias == (style == "qwen2")
    if style == "llama3":
        m = cfg.model
        assert (m.rope_scaling_type, m.rope_scaling_factor, m.rope_original_max_len) == ("llama3", 8.0, 8192)
    # transformers' fp32 reference of the same bf16 weights (bf16 -> fp32 is exact).
    model = transformers.AutoModelForCausalLM.from_pretrained(path).float().eval()
    assert model.model.embed_tokens.weight.dtype == torch.float32
    ids = np.random.default_rng(0).integers(0, config["vocab_size"], (2, 32), dtype=np.int64)
    got = np.asarray(forward(graphdef, state, jnp.asarray(ids, jnp.int32)))
    diff = float(np.abs(got - hf_logits(model, ids)).max())
    print(f"{style}: max abs logits diff {diff:.2e}")
    assert diff <= 1e-4, diff
