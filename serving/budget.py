"""How much of the machine a server takes: the weights' dtype (`--dtype auto`), the number of KV
pages (`--gpu-memory-utilization` / `--kv-cache-memory-bytes`) and so the longest context
(`--max-model-len`). Run once at start-up, after the weights are placed.

dtype auto: bfloat16 on TPU and GPU (what releases ship; float32 checkpoints are served in
bfloat16, as vLLM does); on CPU float32, which runs faster there (no bf16 matmul units), when the
float32 weights take at most half of the free RAM, else bfloat16.

KV pages: the budget is serve.kv_cache_memory bytes per device when set; otherwise on TPU/GPU
memory_utilization x the device's memory, less what is in use after the weights are placed
(vLLM's rule), and on CPU memory_utilization x the free RAM after the weights are loaded. An
estimate of the step's activations is set aside first. There is no point in more pages than
max_batch sequences of max_model_len tokens, so that is the cap. The context (max_model_len) is
the model's own unless set, and shrinks to what the pages hold when they cannot hold one full
sequence; an explicit max_model_len that does not fit is a one-line error.
"""
from __future__ import annotations

import dataclasses
import math
import os

import jax.numpy as jnp

from configs import Config, ConfigError, ModelConfig
from model.kernels.paged_xla import BLOCK_TOKENS

MIN_CONTEXT = 16  # fewer tokens than this is no server


def free_host_bytes() -> int:
    """MemAvailable of /proc/meminfo (free RAM plus reclaimable cache), else free pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def resolve_dtype(requested: str, model: ModelConfig, platform: str, free_bytes: int | None = None) -> str:
    """serve.dtype -> 'bfloat16' | 'float32' (see the module doc for auto)."""
    if requested != "auto":
        return requested
    if platform != "cpu":
        return "bfloat16"
    from model.stats import param_count
    free = free_host_bytes() if free_bytes is None else free_bytes
    return "float32" if 4 * param_count(model) <= free // 2 else "bfloat16"


def kv_dtype_name(cfg: Config) -> str:
    """serve.kv_dtype with auto resolved to the weights' dtype."""
    return cfg.model.param_dtype if cfg.serve.kv_dtype == "auto" else cfg.serve.kv_dtype


def page_bytes(cfg: Config, shards: int = 1) -> int:
    """Bytes of one KV page (k and v of every layer, scales when int8) on one of `shards` devices
    splitting the kv heads."""
    m, s = cfg.model, cfg.serve
    kv = kv_dtype_name(cfg)
    per_token = m.n_layers * m.n_kv_heads * 2 * (m.resolved_head_dim * jnp.dtype(kv).itemsize
                                                 + (4 if kv == "int8" else 0))
    return math.ceil(per_token * s.page_size / shards)


def activation_bytes(cfg: Config) -> int:
    """A generous estimate of one step's temporaries: a prefill chunk with prompt logprobs (fp32
    logits and their log-softmax), its attention block and MLP, or a decode step's sampling."""
    m, s = cfg.model, cfg.serve
    C, V, D, F = max(s.prefill_buckets), m.vocab_size, m.d_model, m.mlp_dim
    prefill = C * (3 * V + 4 * D + 3 * F + 3 * m.n_heads * BLOCK_TOKENS)
    decode = s.max_batch * (8 * V + 4 * D + 3 * F)
    return 4 * max(prefill, decode)


def kv_budget(cfg: Config, mesh) -> tuple[int, str]:
    """(bytes per device for KV pages, how that was decided)."""
    s = cfg.serve
    reserve = activation_bytes(cfg)
    if s.kv_cache_memory:
        return s.kv_cache_memory, f"serve.kv_cache_memory {s.kv_cache_memory / 2**30:.2f} GiB"
    stats = [d.memory_stats() for d in mesh.devices.flat]
    if all(st and st.get("bytes_limit") for st in stats):
        free = min(int(s.memory_utilization * st["bytes_limit"]) - st.get("bytes_in_use", 0) for st in stats)
        where = f"{s.memory_utilization:.0%} of device memory after the weights"
    else:
        free = int(s.memory_utilization * free_host_bytes())
        where = f"{s.memory_utilization:.0%} of free host RAM after the weights"
    return max(0, free - reserve), f"{where}, less {reserve / 2**20:.0f} MiB for activations"


def plan_cache(cfg: Config, mesh, budget: tuple[int, str] | None = None) -> tuple[Config, str]:
    """cfg with serve.kv_dtype, num_pages and max_model_len resolved, and a one-line summary for
    the start-up log. `budget` (bytes per device, why) replaces kv_budget's measurement, for
    ahead-of-time compiles. Raises ConfigError when the budget cannot hold a useful context."""
    s, m = cfg.serve, cfg.model
    cfg = dataclasses.replace(cfg, serve=dataclasses.replace(s, kv_dtype=kv_dtype_name(cfg)))
    want = s.max_model_len or m.max_seq_len
    shards = mesh.shape.get("tensor", 1) if m.n_kv_heads % mesh.shape.get("tensor", 1) == 0 else 1
    unit = page_bytes(cfg, shards)
    pages_per_seq = math.ceil(want / s.page_size)
    cap = s.max_batch * pages_per_seq + 1
    if s.num_pages:
        num_pages, why = s.num_pages, "serve.num_pages"
    else:
        free, why = budget or kv_budget(cfg, mesh)
        num_pages = min(free // unit + 1, cap)
    held = (num_pages - 1) * s.page_size
    if held < want:
        if s.max_model_len:
            raise ConfigError(
                f"--max-model-len {want} needs {pages_per_seq} KV pages of {s.page_size} tokens but the "
                f"budget ({why}) holds {num_pages - 1}: lower --max-model-len or give the cache more memory "
                "(--gpu-memory-utilization, --kv-cache-memory-bytes, --kv-cache-dtype int8)")
        if held < MIN_CONTEXT:
            raise ConfigError(
                f"the KV cache budget ({why}) holds only {max(held, 0)} tokens after the weights: give it more "
                "memory (--gpu-memory-utilization, --kv-cache-memory-bytes) or use --int8 / --kv-cache-dtype int8")
        want = held
    serve = dataclasses.replace(cfg.serve, num_pages=int(num_pages), max_model_len=int(want))
    summary = (f"max model len {want} (model context {m.max_seq_len}); KV cache {num_pages - 1} pages x "
               f"{s.page_size} tokens = {held} tokens, {num_pages * unit / 2**20:.1f} MiB "
               f"{serve.kv_dtype} per device ({why})")
    return dataclasses.replace(cfg, serve=serve), summary
