"""The OpenAI surface lm-evaluation-harness drives: batched prompts, n > 1, refused fields.

Request shapes are those of lm-eval 0.4.13's local-completions (LocalCompletionsAPI._create_payload
and parse_logprobs / parse_generations), replayed here without installing lm-eval.
"""
import json
from operator import itemgetter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fastapi.testclient import TestClient

import serve_helpers as H
from serving.engine import Engine, Request
from serving.http import create_app
from serving.load import load_for_serving
from serving.sampling import SamplingParams

MODEL = "tiny-test"
CONTEXTS = ["def hello(world):", "import os\nclass A:", "    return x", "for i in range(10):"]


@pytest.fixture(scope="module")
def engine():
    """Float weights and cache: echo logprobs are comparable with the cache-free forward. One
    prefill size (every prompt here fits it) and two slots (4 choices still queue and overlap):
    fewer programs to compile, each takes seconds on CPU."""
    run = H.checkpoint(H.TRAIN_STEPS)
    cfg, _, params, tok = load_for_serving(str(run), ["serve.kv_dtype=float32", "serve.prefill_buckets=[32]",
                                                    "serve.max_batch=2"])
    eng = Engine(cfg, params, tok).start()
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(create_app(engine, MODEL)) as c:
        yield c


def reference_logprobs(cfg, params: dict, seqs: list[list[int]]) -> list[np.ndarray]:
    """Cache-free log-softmax [len,V] of model/transformer.py's forward over each sequence: one
    batched call, right-padded to max_seq_len (causal attention makes the padding inert)."""
    from flax import nnx

    from model.init import abstract_model
    graphdef, state = nnx.split(abstract_model(cfg))
    nnx.replace_by_pure_dict(state, params)
    T = cfg.model.max_seq_len
    tokens = jnp.array([s + [0] * (T - len(s)) for s in seqs], jnp.int32)
    logp = jax.nn.log_softmax(jax.jit(lambda st, t: nnx.merge(graphdef, st)(t))(state, tokens), axis=-1)
    return [np.asarray(lp[:len(s)]) for lp, s in zip(logp, seqs)]


def post(client, body: dict) -> dict:
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def lm_eval_parse_logprobs(out: dict, ctxlens: list[int]) -> list[tuple[float, bool]]:
    """lm-eval 0.4.13 LocalCompletionsAPI.parse_logprobs, verbatim in behaviour."""
    res = []
    for choice, ctxlen in zip(sorted(out["choices"], key=itemgetter("index")), ctxlens):
        lps = choice["logprobs"]["token_logprobs"][ctxlen:-1]
        tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        res.append((sum(lps), all(lp == max(top.values()) for lp, top in zip(lps, tops))))
    return res


def near_tie(choice: dict) -> bool:
    """Whether a greedy choice (logprobs >= 2) met a top-2 margin under 1e-3: past one, batched
    and solo runs (different decode widths, so different fp32 rounding) may part ways. A step
    whose top_logprobs has one entry counts as a tie: the API keys them by text, so two tokens
    that decode alike (byte pieces) share one key and their margin is unknown."""
    def tied(top: dict) -> bool:
        best = sorted(top.values(), reverse=True)[:2]
        return len(best) < 2 or best[0] - best[1] < 1e-3
    return any(tied(t) for t in choice["logprobs"]["top_logprobs"])


def test_lm_eval_loglikelihood_batch(client, engine):
    """Batched token-id prompts with echo: per choice, the prompt's logprobs are the reference
    forward's log-softmax and equal those of the prompt sent alone; lm-eval's parse works."""
    tok, cfg, params = engine.tokenizer, engine.cfg, engine.params
    ctx = [[1] + tok.encode(c) for c in CONTEXTS]
    # continuation 0 is the engine's own greedy one: lm-eval must find it greedy
    greedy = engine.generate(ctx[0], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))["token_ids"]
    conts = [greedy] + [tok.encode(s) for s in (" = 1", "\n    pass", " +")]
    prompts, ctxlens = [c + k for c, k in zip(ctx, conts)], [len(c) for c in ctx]
    body = {"model": MODEL, "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1,
            "seed": 1234, "echo": True}
    out = post(client, body)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert out["usage"]["prompt_tokens"] == sum(map(len, prompts)) and out["usage"]["completion_tokens"] == 4
    refs = reference_logprobs(cfg, params, prompts)
    for ids, ch, ref in zip(prompts, out["choices"], refs):
        lp, ref = ch["logprobs"], ref[:-1]  # row t scores token t + 1
        assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
        got = np.array(lp["token_logprobs"][1:len(ids)])
        np.testing.assert_allclose(got, ref[np.arange(len(ids) - 1), ids[1:]], atol=1e-4)
        assert all(len(t) == 1 for t in lp["top_logprobs"][1:])
        best = np.array([max(t.values()) for t in lp["top_logprobs"][1:len(ids)]])
        np.testing.assert_allclose(best, ref.max(axis=1), atol=1e-4)
        alone = post(client, {**body, "prompt": ids})["choices"][0]["logprobs"]
        np.testing.assert_allclose(got, alone["token_logprobs"][1:len(ids)], atol=1e-5)
    parsed = lm_eval_parse_logprobs(out, ctxlens)
    rows = refs[0][ctxlens[0] - 1:len(prompts[0]) - 1]  # the rows scoring continuation 0
    if (np.diff(np.sort(rows, axis=1)[:, -2:], axis=1) > 1e-3).all():  # no near-tie to flip
        assert parsed[0][1] is True
    assert all(np.isfinite(s) and s < 0 for s, _ in parsed)
    assert engine.alloc.pages_in_use == 0


@pytest.mark.parametrize("as_ids", [False, True])
def test_lm_eval_generate_until_batch(client, engine, as_ids):
    """Batched prompts (strings, or token ids as lm-eval sends by default) with stop strings give
    the texts of one-by-one requests, placed by `index`."""
    tok = engine.tokenizer
    # more prompts than CONTEXTS: those that meet a near tie are skipped, and at least 3 must count
    texts_in = CONTEXTS + ["x = [1, 2, 3]\nwhile", "    def __init__(self, name):"]
    prompts = [[1] + tok.encode(c) for c in texts_in] if as_ids else texts_in
    body = {"model": MODEL, "prompt": prompts, "max_tokens": 16, "temperature": 0, "seed": 1234}
    # A stop string the model is sure to produce: two characters from the middle of what it
    # writes for the first prompt without one (what a trained model writes is not fixed).
    free = post(client, {**body, "prompt": prompts[0]})["choices"][0]["text"]
    assert len(free) >= 4, free
    body["stop"] = ["\n\n", free[len(free) // 2:len(free) // 2 + 2]]
    out = post(client, body)
    texts = [None] * len(out["choices"])
    for ch in out["choices"]:  # lm-eval's parse_generations
        texts[ch["index"]] = ch["text"]
    compared = 0
    for p, text, ch in zip(prompts, texts, out["choices"]):
        alone = post(client, {**body, "prompt": p, "logprobs": 2})["choices"][0]  # logprobs: same tokens
        if near_tie(alone):
            continue
        assert text == alone["text"], p
        assert ch["finish_reason"] == alone["finish_reason"]
        compared += 1
    assert compared >= 3
    assert any(c["finish_reason"] == "stop" for c in out["choices"])  # the stop strings were exercised


def test_n_with_seed_and_batch(client):
    """prompts x n choices, index = prompt * n + j; choice j samples with seed + j."""
    body = {"model": MODEL, "prompt": ["class A:", "def f(x):"], "n": 2, "seed": 7, "temperature": 1.0,
            "max_tokens": 8, "ignore_eos": True}
    out = post(client, body)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    lens = []
    for p in range(2):
        for j in range(2):
            alone = post(client, {**body, "prompt": body["prompt"][p], "n": 1, "seed": 7 + j})
            assert out["choices"][2 * p + j]["text"] == alone["choices"][0]["text"], (p, j)
        lens.append(alone["usage"]["prompt_tokens"])
    # each prompt counted once, the generated tokens of every choice
    assert out["usage"] == {"prompt_tokens": sum(lens), "completion_tokens": 32, "total_tokens": sum(lens) + 32}
    three = post(client, {**body, "prompt": "class A:", "n": 3})
    assert [c["index"] for c in three["choices"]] == [0, 1, 2]
    assert len({c["text"] for c in three["choices"]}) == 3  # independent samples
    assert three["usage"]["prompt_tokens"] == lens[0] and three["usage"]["completion_tokens"] == 24


def test_stream_several_choices(client):
    """Each chunk carries its choice's index; one finish per choice; one usage chunk; one [DONE]."""
    body = {"model": MODEL, "prompt": ["class A:", "def f(x):"], "n": 2, "seed": 3, "temperature": 0.8,
            "max_tokens": 6, "ignore_eos": True}
    full = post(client, body)
    with client.stream("POST", "/v1/completions", json={**body, "stream": True,
                                                         "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        events = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == full["usage"]
    texts, finishes = {}, {}
    for c in chunks[:-1]:
        (ch,) = c["choices"]
        texts[ch["index"]] = texts.get(ch["index"], "") + ch["text"]
        if ch["finish_reason"]:
            finishes[ch["index"]] = finishes.get(ch["index"], 0) + 1
    assert finishes == {i: 1 for i in range(4)}
    assert texts == {c["index"]: c["text"] for c in full["choices"]}


def test_chat_n(client):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
            "temperature": 0, "n": 2, "tool_choice": "none", "tools": [], "response_format": {"type": "text"},
            "user": "ignored"}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    ch = r.json()["choices"]
    assert [c["index"] for c in ch] == [0, 1] and ch[0]["message"] == ch[1]["message"]  # greedy: equal


def test_neutral_values_are_accepted(client):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2, "logit_bias": {}, "suffix": "", "best_of": 1,
            "presence_penalty": 0, "frequency_penalty": 0.0, "repetition_penalty": 1.0, "user": "u"}
    post(client, body)


@pytest.mark.parametrize("path,extra,param", [
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
    ("/v1/chat/completions", {"function_call": {"name": "f"}}, "function_call"),
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/chat/completions", {"logit_bias": {"5": 100}}, "logit_bias"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"presence_penalty": 0.5}, "presence_penalty"),
    ("/v1/chat/completions", {"n": 0}, "n"),
    ("/v1/chat/completions", {"n": 9}, "n"),                                  # 9 > serve.max_queue
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 400}]}, "messages"),
    ("/v1/completions", {"suffix": "tail"}, "suffix"),
    ("/v1/completions", {"logit_bias": {"5": -100}}, "logit_bias"),
    ("/v1/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/completions", {"frequency_penalty": 1}, "frequency_penalty"),
    ("/v1/completions", {"best_of": 3}, "best_of"),
    ("/v1/completions", {"n": 129}, "n"),
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/completions", {"min_tokens": 4}, "min_tokens"),
    ("/v1/completions", {"guided_regex": "a+"}, "guided_regex"),
    ("/v1/completions", {"prompt": ["a", "b", "c"], "n": 3}, "n"),            # 9 > serve.max_queue
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [[1, 5], []]}, "prompt"),
    ("/v1/completions", {"prompt": [[1, 5], [1, 99999]]}, "prompt"),
    ("/v1/completions", {"prompt": ["a", [1, 5]]}, "prompt"),
    ("/v1/completions", {"prompt": ["a", "word " * 400]}, "prompt"),
])
def test_refused_is_400_naming_the_field(client, engine, path, extra, param):
    base = {"model": MODEL, "max_tokens": 2}
    base.update({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "x"})
    r = client.post(path, json={**base, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]
    assert engine.alloc.pages_in_use == 0 and not engine.queue  # nothing was submitted


def test_queue_full_midway_cancels_the_batch(engine):
    """An engine whose loop is not running: one free queue place, two prompts -> 429, and the
    prompt that got in is cancelled (the engine drops it without running it)."""
    idle = Engine(engine.cfg, engine.params, engine.tokenizer)
    for _ in range(engine.cfg.serve.max_queue - 1):
        idle.submit(Request([1, 5, 6], SamplingParams(max_tokens=4)))
    with TestClient(create_app(idle, MODEL)) as c:
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": ["x", "y"], "max_tokens": 2})
    assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
    assert len(idle.queue) == engine.cfg.serve.max_queue and idle.queue[-1].cancelled
    assert not any(q.cancelled for q in list(idle.queue)[:-1])
