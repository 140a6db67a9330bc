"""One generation request as the engine sees it: its prompt, sampling settings, what it has
generated and how far its K/V are computed; the `Event`s it sends back; stop-string handling."""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Callable

from serving.sampling import SamplingParams

log = logging.getLogger("tessera.serve")


class QueueFull(RuntimeError):
    """The request queue is at serve.max_queue."""


@dataclasses.dataclass
class Event:
    """New output of one request: tokens since the last event and the text they complete."""

    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[dict[int, float]] = dataclasses.field(default_factory=list)
    prompt_logprobs: list | None = None  # echo: [(token, logprob or None, top dict)] of the prompt
    finish_reason: str | None = None     # stop | length | cancelled | error
    error: str | None = None


class Request:
    """One generation request; `sink(event)` receives its output from the engine thread."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, sink: Callable | None = None):
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
        self.sink = sink or (lambda e: None)
        self.cancelled = False
        self.arrival = time.perf_counter()
        self.last_token_time = None
        self.generated: list[int] = []
        self.emitted_chars = 0
        self.done = False
        self.computed = 0         # tokens of context() whose K/V are in the cache
        self.prompt_lp: list = []  # echo: prompt logprobs gathered chunk by chunk

    def context(self) -> list[int]:
        """Every token the sequence has: the prompt, then what it generated."""
        return self.prompt_ids + self.generated

    def target(self) -> int:
        """Tokens to prefill: the prompt, or after preemption all but the last generated token
        (which the next decode step takes as its input)."""
        return len(self.prompt_ids) + max(len(self.generated) - 1, 0)

    @property
    def prefilling(self) -> bool:
        return self.computed < self.target()


def trim_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """Cut text at the first stop string; True if one occurred."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def holdback(text: str, stops: tuple[str, ...]) -> int:
    """Chars at the end of text that may still become a stop string or a multi-byte char."""
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                n = max(n, k)
                break
    # an incomplete UTF-8 character decodes to up to 3 trailing U+FFFD; hold those back only
    bad = 0
    while bad < 3 and bad < len(text) and text[len(text) - 1 - bad] == "\ufffd":
        bad += 1
    return max(n, bad)


def send_event(req: Request, event: Event) -> None:
    """Deliver an event; a broken consumer (e.g. a closed event loop) cancels only its request."""
    try:
        req.sink(event)
    except Exception:  # noqa: BLE001 - isolating one client's failure from the batch
        log.warning("dropping output of a request whose consumer failed", exc_info=True)
        req.cancelled = True
