"""The engine requests behind one HTTP request (one per prompt and sample): submitted all or
none, their events multiplexed onto one asyncio queue tagged with the choice index, and
cancelled together when the client goes away or the request ends early.

The engine calls each sink from its own thread; `call_soon_threadsafe` hands events to the loop.
"""
from __future__ import annotations

import asyncio

from serving.engine import Engine
from serving.request import Event, QueueFull, Request
from serving.openai import APIError

POLL_S = 0.5  # how often an idle waiter checks whether its client is still there


class Fanout:
    """Choices i = 0..len(jobs)-1, job i = (prompt ids, SamplingParams)."""

    def __init__(self, engine: Engine, jobs: list):
        self.engine = engine
        self.loop, self.events = asyncio.get_running_loop(), asyncio.Queue()
        self.reqs = [Request(ids, params, self._sink(i)) for i, (ids, params) in enumerate(jobs)]
        self.left = len(self.reqs)  # choices not finished yet

    def _sink(self, i: int):
        return lambda ev: self.loop.call_soon_threadsafe(self.events.put_nowait, (i, ev))

    def submit(self) -> None:
        """Queue every request; if the queue fills midway, cancel those already queued (429)."""
        for k, req in enumerate(self.reqs):
            try:
                self.engine.submit(req)
            except (QueueFull, ValueError) as e:
                for r in self.reqs[:k]:
                    self.engine.cancel(r)
                if isinstance(e, QueueFull):
                    raise APIError(429, str(e), code="queue_full", kind="rate_limit_error")
                raise APIError(400, str(e), "prompt", "context_length_exceeded")

    def cancel(self) -> None:
        """Stop every unfinished choice; their slots and pages are freed before the next step."""
        for r in self.reqs:
            if not r.done:
                self.engine.cancel(r)

    async def next(self, request) -> tuple[int, Event]:
        """The next (choice index, event); cancels everything if the client goes away meanwhile."""
        while True:
            try:
                i, ev = await asyncio.wait_for(self.events.get(), POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    self.cancel()
                    raise asyncio.CancelledError("client disconnected")
                continue
            if ev.finish_reason:
                self.left -= 1
            return i, ev

    async def collect(self, request) -> list[Event]:
        """Every choice's events merged, once all have finished (a failed one is a 500)."""
        merged = [Event() for _ in self.reqs]
        try:
            while self.left:
                i, ev = await self.next(request)
                merge(merged[i], ev)
                if ev.finish_reason == "error":
                    raise APIError(500, f"generation failed: {ev.error}", kind="server_error")
        finally:
            self.cancel()
        return merged


def merge(acc: Event, ev: Event) -> None:
    acc.text += ev.text
    acc.token_ids += ev.token_ids
    acc.logprobs += ev.logprobs
    acc.top_logprobs += ev.top_logprobs
    if ev.prompt_logprobs is not None:
        acc.prompt_logprobs = ev.prompt_logprobs
    acc.finish_reason, acc.error = ev.finish_reason or acc.finish_reason, ev.error or acc.error
