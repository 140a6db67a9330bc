"""Continuous batching: a background thread that admits, prefills, decodes and retires requests.

Each loop iteration: drop cancelled requests (their slot and pages are freed at once), admit
queued requests into free slots while pages last (one bucketed prefill each, which also samples
their first token), then run one jitted decode step over all `max_batch` slots (idle slots are
masked, so the step has one fixed shape and compiles once). Results reach the caller through
`Request.sink`, called from the engine thread with `Event`s.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time
from typing import Callable

import jax
import numpy as np

from configs import Config
from serving.decode import compile_fns
from serving.kv_cache import PageAllocator, init_cache
from serving.metrics import Metrics
from serving.sampling import SamplingParams, seed_key

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


def _trim_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """Cut text at the first stop string; True if one occurred."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _holdback(text: str, stops: tuple[str, ...]) -> int:
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


def _send(req: Request, event: Event) -> None:
    """Deliver an event; a broken consumer (e.g. a closed event loop) cancels only its request."""
    try:
        req.sink(event)
    except Exception:  # noqa: BLE001 - isolating one client's failure from the batch
        log.warning("dropping output of a request whose consumer failed", exc_info=True)
        req.cancelled = True


class Engine:
    """Owns the params, the paged cache and the batching thread."""

    def __init__(self, cfg: Config, params: dict, tokenizer, metrics: Metrics | None = None, mesh=None):
        self.cfg, self.params, self.tokenizer = cfg, params, tokenizer
        s = cfg.serve
        self.max_len = cfg.model.max_seq_len
        self.buckets = sorted({b for b in s.prefill_buckets if b < self.max_len} | {self.max_len})
        self.metrics = metrics or Metrics()
        self.alloc = PageAllocator(s.num_pages, s.page_size, s.max_batch, self.max_len)
        self.metrics.pages_total.set(self.alloc.capacity)
        if mesh is None:  # one device, still a mesh: every array has a NamedSharding
            from serving.load import serving_mesh
            mesh = serving_mesh(1)
        self.mesh = mesh
        # every end-of-turn id of the tokenizer (HF chat models have several), else its eos
        self.eos_ids = set(getattr(tokenizer, "eos_ids", None) or [tokenizer.eos_id])
        self.cache = init_cache(cfg, mesh)
        self._prefill, self._decode = compile_fns(cfg, mesh)
        self.slots: list[Request | None] = [None] * s.max_batch
        # decode runs the smallest power-of-two prefix of slots holding every active one (new
        # requests take the lowest free slot): a lone request does not pay for max_batch rows
        self.decode_sizes = sorted({min(2 ** i, s.max_batch) for i in range(s.max_batch.bit_length() + 1)})
        self.queue: collections.deque[Request] = collections.deque()
        self.cv = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False

    # ---- client side (any thread) ----
    def check(self, prompt_len: int, max_tokens: int) -> str | None:
        """Why a request can never be served (None if it can)."""
        if prompt_len < 1:
            return "the prompt is empty"
        if prompt_len + max_tokens > self.max_len:
            return (f"this model's maximum context length is {self.max_len} tokens; the request has "
                    f"{prompt_len} prompt tokens and max_tokens {max_tokens}")
        if self.alloc.pages_for(prompt_len + max_tokens) > self.alloc.capacity:
            return "the request needs more KV pages than the server has"
        return None

    def submit(self, req: Request) -> None:
        """Queue a request (raises QueueFull or ValueError)."""
        why = self.check(len(req.prompt_ids), req.params.max_tokens)
        if why:
            raise ValueError(why)
        with self.cv:
            if len(self.queue) >= self.cfg.serve.max_queue:
                raise QueueFull(f"the request queue is full ({self.cfg.serve.max_queue})")
            self.queue.append(req)
            self.metrics.queue_depth.set(len(self.queue))
            self.cv.notify()

    def cancel(self, req: Request) -> None:
        """Stop a request; its slot and pages are freed before the next decode step."""
        with self.cv:
            req.cancelled = True
            self.cv.notify()

    def generate(self, prompt_ids: list[int], params: SamplingParams, timeout: float = 600) -> dict:
        """Blocking helper: run one request to completion -> {text, token_ids, logprobs, ...}."""
        out = {"text": "", "token_ids": [], "logprobs": [], "top_logprobs": [], "finish_reason": None,
               "prompt_logprobs": None}
        done = threading.Event()

        def sink(e: Event):
            out["text"] += e.text
            out["token_ids"] += e.token_ids
            out["logprobs"] += e.logprobs
            out["top_logprobs"] += e.top_logprobs
            if e.prompt_logprobs is not None:
                out["prompt_logprobs"] = e.prompt_logprobs
            if e.finish_reason:
                out["finish_reason"], out["error"] = e.finish_reason, e.error
                done.set()

        self.submit(Request(prompt_ids, params, sink))
        if not done.wait(timeout):
            raise TimeoutError("generation did not finish in time")
        return out

    def warmup(self) -> None:
        """Compile every prefill bucket and decode size (call before start()): all writes go to
        the reserved page 0, so the cache's real pages are untouched."""
        with jax.set_mesh(self.mesh):
            self._warmup()

    def _warmup(self) -> None:
        one = lambda v, dt: np.full((1,), v, dt)
        for b in self.buckets:
            self.cache, out, _ = self._prefill(
                self.params, self.cache, np.ones((1, b), np.int32), np.int32(b),
                np.zeros((1, self.alloc.max_pages_per_seq), np.int32), one(0, np.float32),
                one(0, np.int32), one(1, np.float32), np.zeros((1, 2), np.uint32), echo=False)
            jax.block_until_ready(out)
        for n in self.decode_sizes:
            z = lambda dt: np.zeros(n, dt)
            self.cache, out = self._decode(
                self.params, self.cache, z(np.int32), np.full(n, -1, np.int32), self.alloc.page_table[:n],
                z(np.float32), z(np.int32), np.ones(n, np.float32), np.zeros((n, 2), np.uint32), z(np.int32))
            jax.block_until_ready(out)

    def start(self) -> "Engine":
        self.thread = threading.Thread(target=self._loop, name="tessera-engine", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify()
        if self.thread:
            self.thread.join(timeout=30)

    # ---- engine thread ----
    def _loop(self) -> None:
        # the mesh in context (thread-local, so set here) lets activation constraints and the
        # Pallas kernels' shard_map wrappers see it
        with jax.set_mesh(self.mesh):
            self._run()

    def _run(self) -> None:
        while not self.stopping:
            try:
                self._retire_cancelled()
                self._admit()
                if any(self.slots):
                    self._step()
                else:
                    with self.cv:
                        if not self.queue and not self.stopping:
                            self.cv.wait(timeout=0.1)
            except Exception as e:  # a failed step must not take the server down
                log.exception("engine step failed")
                self._fail_all(f"{type(e).__name__}: {e}")

    def _fail_all(self, msg: str) -> None:
        for i, r in enumerate(self.slots):
            if r is not None:
                self._finish(i, "error", error=msg)
        self.cache = init_cache(self.cfg, self.mesh)  # a failed donated step may have consumed the cache

    def _retire_cancelled(self) -> None:
        with self.cv:
            dropped = [r for r in self.queue if r.cancelled]
            for r in dropped:
                self.queue.remove(r)
            self.metrics.queue_depth.set(len(self.queue))
        for r in dropped:
            r.done = True
            _send(r, Event(finish_reason="cancelled"))
        for i, r in enumerate(self.slots):
            if r is not None and r.cancelled:
                self._finish(i, "cancelled")

    def _admit(self) -> None:
        while None in self.slots:
            with self.cv:
                if not self.queue:
                    return
                req = self.queue[0]
                if not self.alloc.can_allocate(len(req.prompt_ids) + req.params.max_tokens):
                    return  # FIFO: wait for pages to come back
                self.queue.popleft()
                self.metrics.queue_depth.set(len(self.queue))
            self._start(self.slots.index(None), req)

    def _start(self, slot: int, req: Request) -> None:
        n, p = len(req.prompt_ids), req.params
        self.alloc.allocate(slot, n + p.max_tokens)
        self.slots[slot] = req
        self.metrics.pages_in_use.set(self.alloc.pages_in_use)
        self.metrics.active.set(sum(r is not None for r in self.slots))
        bucket = next(b for b in self.buckets if b >= n)
        tokens = np.zeros((1, bucket), np.int32)
        tokens[0, :n] = req.prompt_ids
        f32 = lambda v: np.array([v], np.float32)
        self.cache, out, echo = self._prefill(
            self.params, self.cache, tokens, np.int32(n), self.alloc.page_table[slot:slot + 1],
            f32(p.temperature), np.array([p.top_k], np.int32), f32(p.top_p),
            seed_key(req.seed)[None], echo=p.echo and p.logprobs is not None)
        tok, lp, top_ids, top_lp = jax.device_get(out)
        self.metrics.prompt_tokens.inc(n)
        prompt_lp = None
        if echo is not None:
            e_lp, e_ids, e_top = jax.device_get(echo)
            k = p.logprobs or 0
            prompt_lp = [(req.prompt_ids[0], None, None)] + [
                (req.prompt_ids[t + 1], float(e_lp[0, t]),
                 {int(i): float(v) for i, v in zip(e_ids[0, t, :k], e_top[0, t, :k])})
                for t in range(n - 1)]
        self._emit(slot, int(tok[0]), float(lp[0]), top_ids[0], top_lp[0], prompt_lp)

    def _step(self) -> None:
        top = max(i for i, r in enumerate(self.slots) if r is not None) + 1
        B = next(n for n in self.decode_sizes if n >= top)
        tokens, positions = np.zeros(B, np.int32), np.full(B, -1, np.int32)
        temp, top_p = np.zeros(B, np.float32), np.ones(B, np.float32)
        top_k, steps = np.zeros(B, np.int32), np.zeros(B, np.int32)
        keys = np.zeros((B, 2), np.uint32)
        for i, r in enumerate(self.slots[:B]):
            if r is None:
                continue
            tokens[i] = r.generated[-1]
            positions[i] = len(r.prompt_ids) + len(r.generated) - 1
            temp[i], top_p[i], top_k[i] = r.params.temperature, r.params.top_p, r.params.top_k
            keys[i], steps[i] = seed_key(r.seed), len(r.generated)
        self.cache, out = self._decode(self.params, self.cache, tokens, positions, self.alloc.page_table[:B],
                                       temp, top_k, top_p, keys, steps)
        tok, lp, top_ids, top_lp = jax.device_get(out)
        for i, r in enumerate(self.slots[:B]):
            if r is not None:
                self._emit(i, int(tok[i]), float(lp[i]), top_ids[i], top_lp[i])

    def _emit(self, slot: int, tok: int, lp: float, top_ids, top_lp, prompt_lp=None) -> None:
        """Account one new token of the request in `slot`; finish it when a stop rule fires."""
        r, p = self.slots[slot], self.slots[slot].params
        now = time.perf_counter()
        if r.last_token_time is None:
            self.metrics.ttft.observe(now - r.arrival)
        else:
            self.metrics.itl.observe(now - r.last_token_time)
        r.last_token_time = now
        self.metrics.generated_tokens.inc()
        k = p.logprobs or 0
        top = {int(i): float(v) for i, v in zip(top_ids[:k], top_lp[:k])}
        is_stop_tok = tok in p.stop_token_ids or (tok in self.eos_ids and not p.ignore_eos)
        ev = Event(prompt_logprobs=prompt_lp)
        if not is_stop_tok:
            r.generated.append(tok)
            ev.token_ids, ev.logprobs = [tok], [lp]
            ev.top_logprobs = [top] if p.logprobs is not None else []
        text, hit = _trim_stop(self.tokenizer.decode(r.generated), p.stop)
        reason = "stop" if (is_stop_tok or hit) else ("length" if len(r.generated) >= p.max_tokens else None)
        end = len(text) if reason else len(text) - _holdback(text, p.stop)
        if end > r.emitted_chars:
            ev.text, r.emitted_chars = text[r.emitted_chars:end], end
        _send(r, ev)
        if reason:
            self._finish(slot, reason)

    def _finish(self, slot: int, reason: str, error: str | None = None) -> None:
        r = self.slots[slot]
        self.slots[slot] = None
        self.alloc.release(slot)
        self.metrics.pages_in_use.set(self.alloc.pages_in_use)
        self.metrics.active.set(sum(x is not None for x in self.slots))
        self.metrics.finished.labels(reason).inc()
        if not r.done:
            r.done = True
            _send(r, Event(finish_reason=reason, error=error))
