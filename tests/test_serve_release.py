"""Serving Hugging Face directories saved the way releases are (tests/hf_release.py: bf16 sharded
safetensors with an index, 131,072 positions in config.json, a Llama-3 tokenizer that adds BOS and
a Qwen2 one without): start-up under default flags, pages on demand with preemption, chunked
prefill, and logprobs against transformers."""
from __future__ import annotations

import dataclasses
import functools
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="tests/hf_release.py builds the directories with transformers + torch")
import hf_release  # noqa: E402
from serving.budget import page_bytes  # noqa: E402
from serving.engine import Engine  # noqa: E402
from serving.load import load_for_serving  # noqa: E402
from serving.openai import chat_prompt, encode, sampling_params  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = ["What does os.path.join do?", "Write a for loop.", "Explain the import system briefly.",
             "def main():", "Sort a list of tuples by the second item.", "hello", "What is a generator?",
             "Name three modules of the standard library and what they are for."]


@functools.lru_cache(maxsize=None)
def engine(style: str, *overrides: str) -> Engine:
    cfg, mesh, params, tok = load_for_serving(str(hf_release.release(style)), list(overrides))
    return Engine(cfg, params, tok, mesh=mesh).start()


def test_default_flags_start_a_131k_context_model():
    """`python serve.py DIR` with no flags: weights as float32 on CPU (they fit), the model's whole
    context (the KV budget holds it), a bounded set of warm-up shapes, then a chat answer."""
    release = hf_release.release("llama3")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(ROOT / "serve.py"), str(release), "--prompt", "def main():",
                           "--max-tokens", "4"], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = proc.stderr
    assert "(float32)" in log, log
    assert re.search(r"max model len 131072 \(model context 131072\)", log), log
    assert proc.stdout.startswith("def main():")


def test_chats_without_max_tokens_complete_under_preemption():
    """8 concurrent chats without max_tokens over 4 slots and KV pages for fewer than 3 full
    contexts: each runs to the end of max-model-len, sequences get preempted and recomputed, and
    every greedy output equals the same chat run alone (up to its first near-tie, where the two
    programs' fp32 rounding may differ)."""
    probe = engine("qwen2", "serve.max_model_len=128", "serve.max_batch=4", "serve.prefill_buckets=[16,32]")
    budget = 20 * page_bytes(probe.cfg)  # 20 pages of 16 tokens; one context is 8
    eng = engine("qwen2", "serve.max_model_len=128", "serve.max_batch=4", "serve.prefill_buckets=[16,32]",
                 f"serve.kv_cache_memory={budget}")
    assert eng.alloc.capacity == 20 and eng.max_len == 128
    reqs = []
    for q in QUESTIONS:
        ids, stops = chat_prompt({"messages": [{"role": "user", "content": q}]}, eng.tokenizer, "")
        params = sampling_params({"temperature": 0}, len(ids), eng.max_len, chat=True, extra_stop=stops)
        assert params.max_tokens == eng.max_len - len(ids)  # no max_tokens: to the end of the context
        reqs.append((ids, dataclasses.replace(params, ignore_eos=True, logprobs=2)))
    solo = [eng.generate(*r) for r in reqs]
    before = eng.metrics.preemptions._value.get()
    results = [None] * len(reqs)
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, eng.generate(*reqs[i])))
               for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert eng.metrics.preemptions._value.get() > before
    compared = 0
    for (ids, _), alone, batched in zip(reqs, solo, results):
        assert batched["finish_reason"] == "length"
        assert len(ids) + len(batched["token_ids"]) == eng.max_len
        margins = [a - b for a, b in (sorted(t.values(), reverse=True)[:2] for t in alone["top_logprobs"])]
        n = next((t for t, m in enumerate(margins) if m < 1e-3), len(margins)) + 1
        assert batched["token_ids"][:n] == alone["token_ids"][:n]
        compared += n
    assert compared >= 0.5 * sum(len(r["token_ids"]) for r in solo), compared  # 70% here
    assert eng.alloc.pages_in_use == 0 and not eng.queue


@pytest.mark.parametrize("style", ["llama3", "qwen2"])
def test_prompt_logprobs_match_transformers_over_chunks(style):
    """A 90-token prompt prefilled in chunks of 32 (3 chunks, the last padded): its echoed
    logprobs equal transformers' on the same bf16 weights (both computed in float32), and the
    prompt starts with BOS exactly when the tokenizer's config adds one."""
    import torch
    import transformers
    eng = engine(style, "serve.prefill_buckets=[16,32]", "serve.max_model_len=256")
    text = hf_release.corpus()[:400]
    ids = encode(eng.tokenizer, text)[:90]
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_release.release(style))
    assert (ids[0] == eng.tokenizer.bos_id) == (style == "llama3")
    assert ids == hf_tok(text)["input_ids"][:90]
    out = eng.generate(ids, sampling_params({"max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0},
                                            len(ids), eng.max_len, chat=False))
    ours = np.array([lp for _, lp, _ in out["prompt_logprobs"][1:]])
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_release.release(style),
                                                              torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    ref = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()
    np.testing.assert_allclose(ours, ref, atol=2e-4)


def test_warmup_shapes_do_not_grow_with_the_context():
    """The compiled shapes come from serve.prefill_buckets and max_batch alone: a 131,072-token
    context compiles the configured chunk sizes, no more (a 256-token one caps them at 256)."""
    long = engine("llama3")
    short = engine("llama3", "serve.max_model_len=256")
    assert long.max_len == 131072 and short.max_len == 256
    assert long.buckets == list(long.cfg.serve.prefill_buckets) == [64, 256, 1024]
    assert short.buckets == [64, 256] and long.decode_sizes == short.decode_sizes == [1, 2, 4, 8]
