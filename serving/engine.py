"""Continuous batching: a background thread that admits, prefills, decodes and retires requests.

Each loop iteration: drop cancelled requests (their slot and pages are freed at once), admit
queued requests into free slots, run prefill chunks of the sequences still reading their prompt
(oldest first, up to one chunk's worth of tokens per iteration, so a long prompt never stalls the
running sequences), then one jitted decode step over every sequence that is generating (idle
slots are masked, so each decode size compiles once).

KV pages are taken on demand: a sequence holds pages for the tokens it has and takes more as it
prefills and decodes. When the pool runs dry the newest sequence is preempted (vLLM's default,
recompute): its pages go back, and it returns to the front of the queue keeping what it has
generated; when re-admitted it prefills prompt + generated tokens again and continues, with the
same sampling keys, so its output is unchanged. The oldest sequence always makes progress (the
pool holds at least one full context, serving/budget.py), so no request starves. Results reach
the caller through `Request.sink`, called from the engine thread with `Event`s.
"""
from __future__ import annotations

import collections
import logging
import threading
import time

import jax
import numpy as np

from configs import Config
from serving.decode import compile_fns
from serving.budget import plan_cache
from serving.kv_cache import PageAllocator, init_cache
from serving.metrics import Metrics
from serving.request import Event, QueueFull, Request, holdback, send_event, trim_stop
from serving.sampling import SamplingParams, seed_key

log = logging.getLogger("tessera.serve")


class Engine:
    """Owns the params, the paged cache and the batching thread."""

    def __init__(self, cfg: Config, params: dict, tokenizer, metrics: Metrics | None = None, mesh=None):
        if mesh is None:  # one device, still a mesh: every array has a NamedSharding
            from serving.load import serving_mesh
            mesh = serving_mesh(1)
        self.mesh = mesh
        cfg, self.plan = plan_cache(cfg, mesh)  # num_pages, max_model_len and the KV dtype resolved
        if cfg.serve.kv_dtype == "bfloat16" and mesh.devices.flat[0].platform == "cpu":
            log.warning("a bfloat16 KV cache is slow on CPU (XLA CPU converts the whole cache to write a "
                        "bf16 token); --kv-cache-dtype auto (float32 here) or int8 is faster")
        self.cfg, self.params, self.tokenizer = cfg, params, tokenizer
        s = cfg.serve
        self.max_len = s.max_model_len
        # prefill chunk sizes: the largest is the chunk; a shorter remainder takes the smallest that
        # holds it. None exceeds the context, so the set is bounded whatever max_model_len is.
        self.buckets = sorted({min(b, self.max_len) for b in s.prefill_buckets})
        self.chunk = self.buckets[-1]
        self.metrics = metrics or Metrics()
        self.alloc = PageAllocator(s.num_pages, s.page_size, s.max_batch, self.max_len)
        self.metrics.pages_total.set(self.alloc.capacity)
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
        """Compile every prefill chunk size and decode size (call before start()): all writes go
        to the reserved page 0, so the cache's real pages are untouched. The set of shapes does
        not depend on max_model_len, so neither does start-up time."""
        with jax.set_mesh(self.mesh):
            self._warmup()

    def _warmup(self) -> None:
        one = lambda v, dt: np.full((1,), v, dt)
        row = np.zeros((1, self.alloc.max_pages_per_seq), np.int32)
        for b in self.buckets:
            self.cache, out, _ = self._prefill(
                self.params, self.cache, np.ones((1, b), np.int32), np.int32(0), np.int32(b), row,
                one(0, np.float32), one(0, np.int32), one(1, np.float32), np.zeros((1, 2), np.uint32),
                np.int32(0), np.zeros((1, b), np.int32), echo=False)
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
                    self._prefill_chunks()
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
            send_event(r, Event(finish_reason="cancelled"))
        for i, r in enumerate(self.slots):
            if r is not None and r.cancelled:
                self._finish(i, "cancelled")

    def _admit(self) -> None:
        """Queued requests into free slots, oldest first, while the pool has pages for their
        whole context (so a prefill is rarely preempted half-way)."""
        while None in self.slots:
            with self.cv:
                if not self.queue:
                    return
                req = self.queue[0]
                if self.alloc.pages_for(req.target() + 1) > len(self.alloc.free):
                    return  # FIFO: wait for pages to come back
                self.queue.popleft()
                self.metrics.queue_depth.set(len(self.queue))
            self.slots[self.slots.index(None)] = req
            self._update_gauges()

    def _reserve(self, slot: int, n_tokens: int) -> bool:
        """Pages for n_tokens in `slot`, preempting the newest sequences while the pool is dry.
        False when the slot's own sequence was the newest and was preempted."""
        while not self.alloc.grow(slot, n_tokens):
            victim = max((i for i, r in enumerate(self.slots) if r is not None),
                         key=lambda i: self.slots[i].arrival)
            self._preempt(victim)
            if victim == slot:
                return False
        self._update_gauges()
        return True

    def _preempt(self, slot: int) -> None:
        """Free a sequence's pages and send it back to the queue, ahead of every later arrival."""
        r = self.slots[slot]
        self.slots[slot] = None
        self.alloc.release(slot)
        r.computed, r.prompt_lp = 0, []  # recomputed from scratch when re-admitted
        self.metrics.preemptions.inc()
        with self.cv:
            later = next((i for i, q in enumerate(self.queue) if q.arrival > r.arrival), len(self.queue))
            self.queue.insert(later, r)
            self.metrics.queue_depth.set(len(self.queue))
        self._update_gauges()

    def _prefill_chunks(self) -> None:
        """Prefill chunks of the sequences reading their context, oldest first, until a chunk's
        worth of tokens ran this iteration."""
        budget = self.chunk
        order = sorted((i for i, r in enumerate(self.slots) if r is not None and r.prefilling),
                       key=lambda i: self.slots[i].arrival)
        for slot in order:
            r = self.slots[slot]
            if budget <= 0 or r is None:  # r None: preempted by an earlier sequence's chunk
                continue
            start, end = r.computed, min(r.target(), r.computed + self.chunk)
            if not self._reserve(slot, end):
                continue
            self._prefill_one(slot, r, end)
            budget -= end - start

    def _prefill_one(self, slot: int, r: Request, end: int) -> None:
        """One chunk of `r`: its context tokens computed..end-1; the last chunk of a fresh prompt
        samples the first token."""
        ctx, start, p = r.context(), r.computed, r.params
        n = end - start
        bucket = next(b for b in self.buckets if b >= n)
        tokens = np.zeros((1, bucket), np.int32)
        tokens[0, :n] = ctx[start:end]
        nxt = np.zeros((1, bucket), np.int32)
        follow = ctx[start + 1:end + 1]
        nxt[0, :len(follow)] = follow
        fresh = not r.generated
        echo = fresh and p.echo and p.logprobs is not None
        f32 = lambda v: np.array([v], np.float32)
        self.cache, out, echo_out = self._prefill(
            self.params, self.cache, tokens, np.int32(start), np.int32(end), self.alloc.page_table[slot:slot + 1],
            f32(p.temperature), np.array([p.top_k], np.int32), f32(p.top_p), seed_key(r.seed)[None],
            np.int32(len(r.generated)), nxt, echo=echo)
        r.computed = end
        self.metrics.prompt_tokens.inc(n)
        if echo:
            e_lp, e_ids, e_top = jax.device_get(echo_out)
            k = p.logprobs or 0
            r.prompt_lp += [(ctx[start + t + 1], float(e_lp[0, t]),
                             {int(i): float(v) for i, v in zip(e_ids[0, t, :k], e_top[0, t, :k])})
                            for t in range(min(n, len(r.prompt_ids) - 1 - start))]
        if r.prefilling or not fresh:
            return  # more chunks to go, or a preempted sequence whose next token comes from decode
        tok, lp, top_ids, top_lp = jax.device_get(out)
        prompt_lp = [(r.prompt_ids[0], None, None)] + r.prompt_lp if echo else None
        self._emit(slot, int(tok[0]), float(lp[0]), top_ids[0], top_lp[0], prompt_lp)

    def _step(self) -> None:
        """One decode step for every generating sequence, after making room for its new token."""
        order = sorted((i for i, r in enumerate(self.slots) if r is not None and not r.prefilling),
                       key=lambda i: self.slots[i].arrival)
        for slot in order:
            r = self.slots[slot]
            if r is not None:
                self._reserve(slot, len(r.context()))
        live = [i for i, r in enumerate(self.slots) if r is not None and not r.prefilling]
        if not live:
            return
        B = next(n for n in self.decode_sizes if n > max(live))
        tokens, positions = np.zeros(B, np.int32), np.full(B, -1, np.int32)
        temp, top_p = np.zeros(B, np.float32), np.ones(B, np.float32)
        top_k, steps = np.zeros(B, np.int32), np.zeros(B, np.int32)
        keys = np.zeros((B, 2), np.uint32)
        for i in live:
            r = self.slots[i]
            tokens[i] = r.generated[-1]
            positions[i] = len(r.context()) - 1
            temp[i], top_p[i], top_k[i] = r.params.temperature, r.params.top_p, r.params.top_k
            keys[i], steps[i] = seed_key(r.seed), len(r.generated)
        self.cache, out = self._decode(self.params, self.cache, tokens, positions, self.alloc.page_table[:B],
                                       temp, top_k, top_p, keys, steps)
        tok, lp, top_ids, top_lp = jax.device_get(out)
        for i in live:
            self.slots[i].computed = len(self.slots[i].context())
            self._emit(i, int(tok[i]), float(lp[i]), top_ids[i], top_lp[i])

    def _update_gauges(self) -> None:
        self.metrics.pages_in_use.set(self.alloc.pages_in_use)
        self.metrics.active.set(sum(r is not None for r in self.slots))

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
        text, hit = trim_stop(self.tokenizer.decode(r.generated), p.stop)
        reason = "stop" if (is_stop_tok or hit) else ("length" if len(r.generated) >= p.max_tokens else None)
        end = len(text) if reason else len(text) - holdback(text, p.stop)
        if end > r.emitted_chars:
            ev.text, r.emitted_chars = text[r.emitted_chars:end], end
        send_event(r, ev)
        if reason:
            self._finish(slot, reason)

    def _finish(self, slot: int, reason: str, error: str | None = None) -> None:
        r = self.slots[slot]
        self.slots[slot] = None
        self.alloc.release(slot)
        self._update_gauges()
        self.metrics.finished.labels(reason).inc()
        if not r.done:
            r.done = True
            send_event(r, Event(finish_reason=reason, error=error))
