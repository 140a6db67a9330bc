"""OpenAI API requests: validation into prompts and SamplingParams, and the fields refused.

Validation is by hand rather than pydantic so every bad request gets OpenAI's error body with
HTTP 400 (pydantic's default is 422 with a different shape, which OpenAI clients do not parse).
"""
from __future__ import annotations

import dataclasses

import jinja2

from serving.sampling import TOP_N, SamplingParams

BUILTIN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
BUILTIN_CHAT_STOP = "<|"  # the next turn marker of the built-in template
MAX_N = 128  # choices per prompt; prompts x n is also capped by serve.max_queue (serving/http.py)


class APIError(Exception):
    """An error answered with OpenAI's body: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


_MISSING = object()


def field(body: dict, name: str, types, default=_MISSING, lo=None, hi=None):
    """body[name] checked against types (and an inclusive numeric range)."""
    if name not in body or body[name] is None:
        if default is _MISSING:
            raise APIError(400, f"'{name}' is a required property", name)
        return default
    v = body[name]
    ok = isinstance(v, types) and not (isinstance(v, bool) and bool not in _as_tuple(types))
    if not ok:
        names = "/".join(t.__name__ for t in _as_tuple(types))
        raise APIError(400, f"'{name}' must be of type {names}, got {type(v).__name__}", name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise APIError(400, f"'{name}' must be between {lo} and {hi}, got {v}", name)
    return v


def _as_tuple(t):
    return t if isinstance(t, tuple) else (t,)


def stop_list(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and len(stop) <= 16 and all(isinstance(s, str) for s in stop):
        return tuple(s for s in stop if s)
    raise APIError(400, "'stop' must be a string or a list of at most 16 strings", "stop")


def sampling_params(body: dict, prompt_len: int, max_len: int, chat: bool, extra_stop=(),
                    label: str = "the prompt") -> SamplingParams:
    """Validate the sampling fields shared by both endpoints (`label` names the prompt in errors)."""
    for name in ("presence_penalty", "frequency_penalty"):
        if field(body, name, (int, float), 0) != 0:
            raise APIError(400, f"'{name}' is not supported (must be 0)", name)
    default_max = max_len - prompt_len if chat else 16
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = field(body, key, int, max(default_max, 1), lo=1, hi=10**9)
    if prompt_len >= max_len:
        raise APIError(400, f"this model's maximum context length is {max_len} tokens, but {label} "
                            f"has {prompt_len} tokens", "messages" if chat else "prompt",
                       "context_length_exceeded")
    if prompt_len + max_tokens > max_len:
        raise APIError(400, f"this model's maximum context length is {max_len} tokens; {prompt_len} tokens "
                            f"of {label} + max_tokens {max_tokens} exceed it", key, "context_length_exceeded")
    if chat:
        want = field(body, "logprobs", bool, False)
        top = field(body, "top_logprobs", int, 0, 0, TOP_N)
        if top and not want:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        logprobs, echo = (top if want else None), False
    else:
        logprobs = field(body, "logprobs", int, None, 0, TOP_N)
        echo = field(body, "echo", bool, False)
    stop_ids = field(body, "stop_token_ids", list, [])
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in stop_ids):
        raise APIError(400, "'stop_token_ids' must be a list of integers", "stop_token_ids")
    return SamplingParams(
        max_tokens=max_tokens, temperature=float(field(body, "temperature", (int, float), 1.0, 0, 2)),
        top_p=float(field(body, "top_p", (int, float), 1.0, 0, 1)) or 1e-6,
        top_k=field(body, "top_k", int, 0, 0, 10**9), seed=field(body, "seed", int, None),
        stop=stop_list(body) + tuple(extra_stop), stop_token_ids=tuple(stop_ids),
        ignore_eos=field(body, "ignore_eos", bool, False), logprobs=logprobs, echo=echo)


def num_choices(body: dict) -> int:
    """`n`; `best_of` only where it changes nothing (equal to n)."""
    n = field(body, "n", int, 1, 1, MAX_N)
    best_of = field(body, "best_of", int, None)
    if best_of is not None and best_of != n:
        raise APIError(400, "'best_of' is not supported (it must be omitted or equal n)", "best_of")
    return n


def choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """The params of n independent samples: choice j draws with seed + j (vLLM's rule), so a seeded
    request's choices differ from each other yet each equals a lone request with that seed."""
    if params.seed is None:  # each engine Request draws a random seed of its own
        return [params] * n
    return [dataclasses.replace(params, seed=params.seed + j) for j in range(n)]


def _is_ids(p) -> bool:
    return isinstance(p, list) and bool(p) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)


def completion_prompts(body: dict, tokenizer, vocab: int) -> list[tuple[list[int], str]]:
    """The prompts of /v1/completions as (token ids, text): one string or token-id list, or a
    non-empty list of strings or of token-id lists (a batch: one choice group per prompt)."""
    p = field(body, "prompt", (str, list))
    if isinstance(p, str) or _is_ids(p):
        batch = [p]
    elif p and (all(isinstance(x, str) for x in p) or all(_is_ids(x) for x in p)):
        batch = p
    else:
        raise APIError(400, "'prompt' must be a string, a non-empty list of token ids, or a non-empty list "
                            "of strings or of token-id lists", "prompt")
    out = []
    for k, x in enumerate(batch):
        name = "prompt" if len(batch) == 1 else f"prompt[{k}]"
        if isinstance(x, str):
            ids, text = encode(tokenizer, x), x
        elif any(t < 0 or t >= vocab for t in x):
            raise APIError(400, f"{name}: token ids must be in [0, {vocab})", "prompt")
        else:
            ids, text = list(x), tokenizer.decode(x)
        if not ids:
            raise APIError(400, f"{name} is empty", "prompt")
        out.append((ids, text))
    return out


def encode(tokenizer, text: str) -> list[int]:
    """Prompt ids of `text`: BOS first iff the tokenizer's own config adds one (`add_bos`, as
    transformers' `tokenizer(text)`; Qwen2 has none, Llama 3 does), never twice (a chat template
    may already start with the BOS text)."""
    ids = list(tokenizer.encode(text))
    bos = getattr(tokenizer, "bos_id", -1)
    bos = -1 if bos is None else bos
    add = getattr(tokenizer, "add_bos", bos >= 0)  # tokenizers without the attribute: BOS when defined
    return ([bos] if add and bos >= 0 and ids[:1] != [bos] else []) + ids


def chat_prompt(body: dict, tokenizer, config_template: str) -> tuple[list[int], tuple[str, ...]]:
    """Render messages with the tokenizer's template, else the config's, else the built-in one."""
    msgs = field(body, "messages", list)
    if not msgs:
        raise APIError(400, "'messages' must be a non-empty list", "messages")
    clean = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a string 'role'", "messages")
        c = m.get("content", "")
        if isinstance(c, list):  # content parts: keep the text ones
            c = "".join(p.get("text", "") for p in c if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(c, str):
            raise APIError(400, f"messages[{i}].content must be a string", "messages")
        clean.append({"role": m["role"], "content": c})
    if getattr(tokenizer, "chat_template", None) and hasattr(tokenizer, "apply_chat_template"):
        out = tokenizer.apply_chat_template(clean, add_generation_prompt=True)
        return (list(out) if isinstance(out, list) else encode(tokenizer, out)), ()
    template = config_template or BUILTIN_CHAT_TEMPLATE
    text = jinja2.Environment().from_string(template).render(messages=clean, add_generation_prompt=True)
    return encode(tokenizer, text), (() if config_template else (BUILTIN_CHAT_STOP,))


_empty = lambda v: v in (None, "", [], {})  # noqa: E731


# Fields that would change the output and are not implemented, each with the test its value must
# pass: the neutral value (what clients send when they mean "off") is accepted, anything else
# is a 400 naming the field rather than silently ignored. Fields that cannot change the output
# (user, metadata, store, service_tier, parallel_tool_calls, ...) are ignored, as vLLM does.
REFUSED = {
    "logit_bias": (_empty, "must be empty"),
    "response_format": (lambda v: v is None or v == {"type": "text"}, 'only {"type": "text"}'),
    "repetition_penalty": (lambda v: v in (None, 1), "must be 1"),
    "min_p": (lambda v: v in (None, 0), "must be 0"),
    "min_tokens": (lambda v: v in (None, 0), "must be 0"),
    "use_beam_search": (lambda v: v in (None, False), "must be false"),
    "length_penalty": (lambda v: v in (None, 1), "must be 1"),
    "bad_words": (_empty, "must be empty"),
    "allowed_token_ids": (_empty, "must be empty"),
    "logits_processors": (_empty, "must be empty"),
    "guided_json": (_empty, "must be empty"),
    "guided_regex": (_empty, "must be empty"),
    "guided_choice": (_empty, "must be empty"),
    "guided_grammar": (_empty, "must be empty"),
    "structured_outputs": (_empty, "must be empty"),
    "truncate_prompt_tokens": (lambda v: v is None, "must be omitted"),
    "prompt_logprobs": (lambda v: v is None, "must be omitted (use echo with logprobs)"),
    "include_stop_str_in_output": (lambda v: v in (None, False), "must be false"),
    "return_tokens_as_token_ids": (lambda v: v in (None, False), "must be false"),
    "return_token_ids": (lambda v: v in (None, False), "must be false"),
}
REFUSED_COMPLETIONS = {"suffix": (_empty, "must be empty")}
REFUSED_CHAT = {
    "tools": (_empty, "must be empty (no tool calling)"),
    "functions": (_empty, "must be empty (no function calling)"),
    "tool_choice": (lambda v: v in (None, "none", "auto"), 'only "none" (no tool calling)'),
    "function_call": (lambda v: v in (None, "none", "auto"), 'only "none" (no function calling)'),
    "audio": (lambda v: v is None, "must be omitted"),
    "modalities": (lambda v: v in (None, ["text"]), 'only ["text"]'),
    "web_search_options": (lambda v: v is None, "must be omitted"),
    "echo": (lambda v: v in (None, False), "must be false on chat"),
    "add_generation_prompt": (lambda v: v in (None, True), "must be true"),
    "continue_final_message": (lambda v: v in (None, False), "must be false"),
    "chat_template": (_empty, "must be omitted (the server's template is used)"),
    "chat_template_kwargs": (_empty, "must be empty"),
    "documents": (_empty, "must be empty"),
}


def refuse_unsupported(body: dict, chat: bool) -> None:
    """400 naming the first field set to something this server does not implement."""
    table = {**REFUSED, **(REFUSED_CHAT if chat else REFUSED_COMPLETIONS)}
    for name, (neutral, why) in table.items():
        v = body.get(name)
        try:
            ok = neutral(v)
        except TypeError:  # an unhashable or odd value is not the neutral one
            ok = False
        if not ok:
            raise APIError(400, f"'{name}' is not supported: {why}", name)
