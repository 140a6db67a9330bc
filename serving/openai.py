"""OpenAI API shapes: request validation into SamplingParams, and response/chunk bodies.

Validation is by hand rather than pydantic so every bad request gets OpenAI's error body with
HTTP 400 (pydantic's default is 422 with a different shape, which OpenAI clients do not parse).
"""
from __future__ import annotations

import time
import uuid

import jinja2

from serving.engine import Event
from serving.sampling import TOP_N, SamplingParams

BUILTIN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
BUILTIN_CHAT_STOP = "<|"  # the next turn marker of the built-in template


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


def sampling_params(body: dict, prompt_len: int, max_len: int, chat: bool, extra_stop=()) -> SamplingParams:
    """Validate the sampling fields shared by both endpoints."""
    if field(body, "n", int, 1) != 1:
        raise APIError(400, "only n=1 is supported", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if field(body, name, (int, float), 0) != 0:
            raise APIError(400, f"'{name}' is not supported (must be 0)", name)
    default_max = max_len - prompt_len if chat else 16
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = field(body, key, int, max(default_max, 1), lo=1, hi=10**9)
    if prompt_len >= max_len:
        raise APIError(400, f"this model's maximum context length is {max_len} tokens, but the prompt "
                            f"has {prompt_len} tokens", "prompt", "context_length_exceeded")
    if prompt_len + max_tokens > max_len:
        raise APIError(400, f"this model's maximum context length is {max_len} tokens; {prompt_len} prompt "
                            f"tokens + max_tokens {max_tokens} exceed it", key, "context_length_exceeded")
    if chat:
        logprobs = field(body, "top_logprobs", int, 0, 0, TOP_N) if field(body, "logprobs", bool, False) else None
        echo = False
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


def completion_prompt(body: dict, tokenizer, vocab: int) -> tuple[list[int], str]:
    """The prompt of /v1/completions as (token ids with BOS, text)."""
    p = field(body, "prompt", (str, list))
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one
    if isinstance(p, str):
        return encode(tokenizer, p), p
    if p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        if any(t < 0 or t >= vocab for t in p):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
        return list(p), tokenizer.decode(p)
    raise APIError(400, "'prompt' must be a string, a list of token ids, or a list of one of those "
                        "(batched prompts are not supported)", "prompt")


def encode(tokenizer, text: str) -> list[int]:
    ids = tokenizer.encode(text)
    bos = getattr(tokenizer, "bos_id", -1)
    return ([bos] if bos is not None and bos >= 0 and ids[:1] != [bos] else []) + list(ids)


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


def piece(tokenizer, i: int) -> str:
    """The text of one token for logprobs output."""
    return tokenizer.decode([i])


class Formatter:
    """Builds OpenAI response bodies and stream chunks for one request."""

    def __init__(self, chat: bool, model: str, tokenizer, prompt_len: int):
        self.chat, self.model, self.tok, self.prompt_len = chat, model, tokenizer, prompt_len
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.offset = 0  # text_offset of completions logprobs

    def _logprobs(self, ev: Event, prompt: bool = False):
        if self.chat:
            return {"content": [
                {"token": piece(self.tok, t), "logprob": lp, "bytes": list(piece(self.tok, t).encode()),
                 "top_logprobs": [{"token": piece(self.tok, i), "logprob": v,
                                   "bytes": list(piece(self.tok, i).encode())} for i, v in top.items()]}
                for t, lp, top in zip(ev.token_ids, ev.logprobs, ev.top_logprobs)]}
        rows = list(ev.prompt_logprobs or []) if prompt else []
        rows += list(zip(ev.token_ids, ev.logprobs, ev.top_logprobs))
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, lp, top in rows:
            s = piece(self.tok, t)
            out["tokens"].append(s)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append(None if top is None else {piece(self.tok, i): v for i, v in top.items()})
            out["text_offset"].append(self.offset)
            self.offset += len(s)
        return out

    def chunk(self, ev: Event, want_logprobs: bool, first: bool = False, prefix: str = "") -> dict:
        """One streamed chunk for an event."""
        lp = self._logprobs(ev, prompt=first) if want_logprobs and (ev.token_ids or ev.prompt_logprobs) else None
        if self.chat:
            delta = {"role": "assistant", "content": ev.text} if first else (
                {"content": ev.text} if ev.text else {})
            choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": ev.finish_reason}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": prefix + ev.text, "logprobs": lp, "finish_reason": ev.finish_reason}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": [choice]}

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_len, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_len + completion_tokens}

    def response(self, ev: Event, want_logprobs: bool, prefix: str = "") -> dict:
        """The non-streaming body; ev is every event of the request merged."""
        lp = self._logprobs(ev, prompt=True) if want_logprobs else None
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": ev.text},
                      "logprobs": lp, "finish_reason": ev.finish_reason}
        else:
            choice = {"index": 0, "text": prefix + ev.text, "logprobs": lp, "finish_reason": ev.finish_reason}
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice],
                "usage": self.usage(len(ev.token_ids))}
