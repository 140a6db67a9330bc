"""OpenAI response bodies and stream chunks for one HTTP request and all its choices.

A request has one choice per (prompt, sample): choice `index` = prompt_index * n + j, as OpenAI
and vLLM number them. `usage` counts each prompt once and the generated tokens of every choice.
"""
from __future__ import annotations

import collections
import time
import uuid

from serving.request import Event


def piece(tokenizer, i: int) -> str:
    """The text of one token for logprobs output."""
    return tokenizer.decode([i])


class Formatter:
    """Builds the response body and stream chunks of one request."""

    def __init__(self, chat: bool, model: str, tokenizer, prompt_tokens: int):
        self.chat, self.model, self.tok, self.prompt_tokens = chat, model, tokenizer, prompt_tokens
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.offsets = collections.defaultdict(int)  # text_offset of completions logprobs, per choice

    def _logprobs(self, index: int, ev: Event, prompt: bool = False):
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
            out["text_offset"].append(self.offsets[index])
            self.offsets[index] += len(s)
        return out

    def _choice(self, index: int, ev: Event, lp, prefix: str, delta: dict | None = None) -> dict:
        if delta is not None:
            return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": ev.finish_reason}
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": ev.text},
                    "logprobs": lp, "finish_reason": ev.finish_reason}
        return {"index": index, "text": prefix + ev.text, "logprobs": lp, "finish_reason": ev.finish_reason}

    def chunk(self, index: int, ev: Event, want_logprobs: bool, first: bool = False, prefix: str = "") -> dict:
        """One streamed chunk for an event of choice `index` (`first`: its first event)."""
        lp = (self._logprobs(index, ev, prompt=first) if want_logprobs and (ev.token_ids or ev.prompt_logprobs)
              else None)
        if self.chat:
            delta = {"role": "assistant", "content": ev.text} if first else (
                {"content": ev.text} if ev.text else {})
            choice, obj = self._choice(index, ev, lp, "", delta), "chat.completion.chunk"
        else:
            choice, obj = self._choice(index, ev, lp, prefix), "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": [choice]}

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def usage_chunk(self, completion_tokens: int) -> dict:
        """The last chunk of a stream with stream_options.include_usage: no choices."""
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [],
                "usage": self.usage(completion_tokens)}

    def response(self, events: list[Event], want_logprobs: bool, prefixes: list[str]) -> dict:
        """The non-streaming body; events[i] is every event of choice i merged."""
        choices = [self._choice(i, ev, self._logprobs(i, ev, prompt=True) if want_logprobs else None, prefix)
                   for i, (ev, prefix) in enumerate(zip(events, prefixes))]
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices,
                "usage": self.usage(sum(len(ev.token_ids) for ev in events))}
