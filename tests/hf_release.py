"""Tiny random Hugging Face model directories laid out as real releases are, built offline.

    make_release(path, "llama3" | "qwen2", seed=0) -> path
    release("llama3" | "qwen2", seed=0) -> path   # built once per test session; treat as read-only

Each directory holds what a published checkpoint ships: config.json (max_position_embeddings
131072, torch_dtype bfloat16; in the layout of the files on the hub, which transformers 4 wrote:
`torch_dtype`, `rope_theta` and `rope_scaling` rather than transformers 5's `dtype` and
`rope_parameters`), generation_config.json, bf16 weights in several
model-0000k-of-0000n.safetensors shards plus model.safetensors.index.json, and a byte-level BPE
tokenizer (trained here on Python standard library source, never downloaded) as tokenizer.json,
tokenizer_config.json (with the chat template) and special_tokens_map.json.

- llama3: LlamaForCausalLM with Llama 3.1's RoPE scaling (rope_type llama3, factor 8); BOS
  <|begin_of_text|> added by tokenizer.json's TemplateProcessing post-processor (the
  tokenizer_config.json says nothing about add_bos_token, as Meta's); stop ids <|end_of_text|>
  and <|eot_id|>; Llama 3's chat template; vocabulary exactly the tokenizer's.
- qwen2: Qwen2ForCausalLM (q/k/v biases); no BOS (bos_token null), eos <|im_end|>, pad and
  document end <|endoftext|>; ChatML template; vocab.json and merges.txt beside tokenizer.json;
  the model's vocabulary padded above the tokenizer's (151936 vs 151665 in Qwen2), so its last
  rows belong to no token.

torch and transformers are imported only when a directory is built (test-time references).
"""
from __future__ import annotations

import atexit
import functools
import inspect
import json
import shutil
import tempfile
from pathlib import Path

STYLES = ("llama3", "qwen2")
BPE_VOCAB = 384          # byte alphabet (256) + 128 merges
D_MODEL, N_LAYERS, N_HEADS, N_KV_HEADS, MLP = 64, 2, 4, 2, 128
MAX_POSITIONS = 131072
SHARD_SIZE = "100KB"     # ~270 KB of bf16 weights: three shards

# The pre-tokenizer split patterns of the real tokenizer.json files (then byte-level encoding).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Meta-Llama-3-8B-Instruct's chat template, verbatim.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Qwen2-7B-Instruct's ChatML template, verbatim.
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def corpus() -> str:
    """Tokenizer training text: the source of a few standard-library modules (ships with Python)."""
    import glob, shlex, string, textwrap  # noqa: E401
    return "".join(inspect.getsource(m) for m in (textwrap, string, shlex, glob))


def _added(token: str, special: bool = True) -> dict:
    return {"content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": special}


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def build_tokenizer(style: str):
    """A trained byte-level BPE `tokenizers.Tokenizer` with `style`'s special tokens after the
    learned vocabulary (as in the real files) and, for llama3, the BOS post-processor."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    if style == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT if style == "llama3" else QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus().splitlines(keepends=True), trainer)
    tok.add_special_tokens(LLAMA3_SPECIALS if style == "llama3" else QWEN2_SPECIALS)
    if style == "llama3":
        bos = ("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1", special_tokens=[bos])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def write_tokenizer(path: Path, style: str) -> dict:
    """The tokenizer files of a `style` release; returns {special token: id}."""
    tok = build_tokenizer(style)
    tok.save(str(path / "tokenizer.json"))
    specials = LLAMA3_SPECIALS if style == "llama3" else QWEN2_SPECIALS
    ids = {s: tok.token_to_id(s) for s in specials}
    decoder = {str(i): _added(s) for s, i in ids.items()}
    if style == "llama3":  # Llama 3.1 Instruct's layout
        config = {"added_tokens_decoder": decoder, "bos_token": "<|begin_of_text|>", "chat_template": LLAMA3_TEMPLATE,
                  "clean_up_tokenization_spaces": True, "eos_token": "<|eot_id|>",
                  "model_input_names": ["input_ids", "attention_mask"], "model_max_length": MAX_POSITIONS,
                  "tokenizer_class": "PreTrainedTokenizerFast"}
        special_map = {"bos_token": _added("<|begin_of_text|>"), "eos_token": _added("<|eot_id|>")}
    else:  # Qwen2 Instruct's layout, vocab.json and merges.txt included
        tok.model.save(str(path))
        config = {"add_prefix_space": False, "added_tokens_decoder": decoder,
                  "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "bos_token": None,
                  "chat_template": QWEN2_TEMPLATE, "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>",
                  "errors": "replace", "model_max_length": MAX_POSITIONS, "pad_token": "<|endoftext|>",
                  "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}
        special_map = {"additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
                       "eos_token": _added("<|im_end|>"), "pad_token": _added("<|endoftext|>")}
    for value in special_map.values():
        if isinstance(value, dict):
            value.pop("special")
    _write_json(path / "tokenizer_config.json", config)
    _write_json(path / "special_tokens_map.json", special_map)
    return ids


def model_config(style: str, vocab_size: int, ids: dict):
    """The transformers config of a tiny `style` model (GQA 4:2, 131072 positions)."""
    import transformers
    common = dict(vocab_size=vocab_size, hidden_size=D_MODEL, intermediate_size=MLP, num_hidden_layers=N_LAYERS,
                  num_attention_heads=N_HEADS, num_key_value_heads=N_KV_HEADS, max_position_embeddings=MAX_POSITIONS,
                  tie_word_embeddings=False)
    if style == "llama3":
        return transformers.LlamaConfig(
            **common, rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=ids["<|begin_of_text|>"],
            eos_token_id=[ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]],
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192})
    return transformers.Qwen2Config(
        **common, rms_norm_eps=1e-6, rope_theta=1000000.0, use_sliding_window=False, sliding_window=MAX_POSITIONS,
        max_window_layers=N_LAYERS, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])


def generation_config(style: str, ids: dict) -> dict:
    """generation_config.json as the Instruct releases ship it (stop ids a list)."""
    if style == "llama3":
        return {"bos_token_id": ids["<|begin_of_text|>"], "do_sample": True,
                "eos_token_id": [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]],
                "temperature": 0.6, "top_p": 0.9}
    return {"bos_token_id": ids["<|endoftext|>"], "do_sample": True,
            "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "pad_token_id": ids["<|endoftext|>"],
            "repetition_penalty": 1.05, "temperature": 0.7, "top_k": 20, "top_p": 0.8}


def published_layout(config: dict) -> dict:
    """config.json as the hub's files have it (transformers 4 names), whichever transformers saved it."""
    out = dict(config)
    if "dtype" in out:
        out["torch_dtype"] = out.pop("dtype")
    rope = out.pop("rope_parameters", None)
    if rope is not None:
        rope = dict(rope)
        out["rope_theta"] = rope.pop("rope_theta", out.get("rope_theta"))
        out["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    return out


def make_release(path: str | Path, style: str, seed: int = 0) -> Path:
    """Write a tiny random `style` ("llama3" | "qwen2") release into `path`; returns it."""
    if style not in STYLES:
        raise ValueError(f"unknown release style {style!r} (expected one of {', '.join(STYLES)})")
    import torch
    import transformers
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer(path, style)
    n_tokens = max(ids.values()) + 1
    vocab = n_tokens if style == "llama3" else -(-n_tokens // 64) * 64  # Qwen pads its embedding rows
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(model_config(style, vocab, ids)).eval()
    with torch.no_grad():  # random biases and norm scales too, so a mix-up cannot hide
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.to(torch.bfloat16).save_pretrained(path, max_shard_size=SHARD_SIZE)
    _write_json(path / "config.json", published_layout(json.loads((path / "config.json").read_text())))
    _write_json(path / "generation_config.json", generation_config(style, ids))
    return path


@functools.lru_cache(maxsize=None)
def release(style: str, seed: int = 0) -> Path:
    """make_release into a temporary directory removed at exit, once per test session.
    Shared between tests: copy it before changing anything in it."""
    root = Path(tempfile.mkdtemp(prefix=f"tessera_{style}_release_"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return make_release(root / f"tiny-{style}", style, seed)
