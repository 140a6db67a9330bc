"""Prometheus metrics of one serving engine (its own registry, so tests can run several)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """Counters, gauges and latency histograms exported at GET /metrics."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("tessera_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("tessera_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generated_tokens = Counter("tessera_generated_tokens", "Tokens generated", registry=r)
        self.finished = Counter("tessera_finished_requests", "Finished requests by reason",
                                ["reason"], registry=r)
        self.preemptions = Counter("tessera_preemptions", "Sequences preempted for KV pages (recomputed later)",
                                   registry=r)
        self.queue_depth = Gauge("tessera_queue_depth", "Requests waiting for a slot", registry=r)
        self.active = Gauge("tessera_active_sequences", "Sequences in the decode batch", registry=r)
        self.pages_in_use = Gauge("tessera_kv_pages_in_use", "KV cache pages allocated", registry=r)
        self.pages_total = Gauge("tessera_kv_pages_total", "KV cache pages available", registry=r)
        self.ttft = Histogram("tessera_time_to_first_token_seconds", "Arrival to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("tessera_inter_token_latency_seconds", "Time between tokens of a request",
                             buckets=_LATENCY_BUCKETS, registry=r)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
