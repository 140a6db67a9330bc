"""`compile.py --serve`: compile the serving prefill and decode steps (serving/decode.py) for a slice.

The functions are exactly those serving.engine.Engine runs (serving.decode.compile_fns), lowered
from abstract inputs laid out as serve.py lays them out: weights under the serve_tp rules over a
(data=1, fsdp=1, tensor=chips) mesh, int8 when serve.int8_weights, the paged KV cache of
as many pages as serving/budget.py's plan gives (serve.memory_utilization of the chip's HBM less
the weights and activations, unless serve.num_pages is set), a prefill chunk of the largest
bucket and a decode step of serve.max_batch slots. The results are memory fit and compile time; there is no honest step-time
estimate for these steps yet (see `estimate`), and the report says so.
"""
from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from configs import Config, ConfigError
from model.init import param_shardings
from aot import compile_train as aot
from training.state import abstract_with_shardings
from aot.topology import Topology


def serve_mesh(cfg: Config, topo: Topology, devices) -> tuple[Config, Mesh]:
    """serve.py's layout on the whole slice: every chip tensor-parallel (serving.load.serving_config)."""
    if topo.slices > 1:
        raise ConfigError("--serve compiles one slice; serving does not span slices (drop --slices)")
    import dataclasses
    from model.stats import param_count
    from serving.budget import activation_bytes, plan_cache, resolve_dtype
    from serving.load import serving_config, serving_mesh
    mesh = serving_mesh(len(devices), devices)
    try:
        cfg = serving_config(cfg, mesh)
    except ConfigError as e:
        raise ConfigError(f"{topo.name} ({topo.n_devices} chips) for serving: {e}") from None
    dtype = resolve_dtype(cfg.serve.dtype, cfg.model, "tpu")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, param_dtype=dtype))
    per_chip = param_count(cfg.model) * (1 if cfg.serve.int8_weights else jnp.dtype(dtype).itemsize) / len(devices)
    free = int(cfg.serve.memory_utilization * topo.hbm_bytes - per_chip - activation_bytes(cfg))
    cfg, _ = plan_cache(cfg, mesh, budget=(max(free, 0), f"{cfg.serve.memory_utilization:.0%} of HBM"))
    return cfg, mesh


def abstract_params(cfg: Config, mesh: Mesh, devices):
    """Weights as serve.py holds them: stored dtype under serve_tp, or int8 QArrays."""
    _, abstract, shardings = param_shardings(cfg, mesh, "serve_tp")
    params = abstract_with_shardings(nnx.to_pure_dict(abstract), nnx.to_pure_dict(shardings))
    if not cfg.serve.int8_weights:
        return params
    from model.quant import quantize_params
    quantize = jax.jit(lambda p: quantize_params(p, embedding=True))
    shapes = jax.eval_shape(quantize, params)
    placed = quantize.lower(params).compile().output_shardings  # where XLA puts the int8 weights
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, placed)


def prefill_tokens(cfg: Config) -> int:
    """The engine's prefill chunk: the largest bucket, at most the context."""
    return min(max(cfg.serve.prefill_buckets), cfg.serve.max_model_len)


def abstract_args(cfg: Config, mesh: Mesh, devices) -> dict:
    """{'prefill': args, 'decode': args} as ShapeDtypeStructs with shardings."""
    from serving.kv_cache import KV_DTYPES, KVCache, cache_shardings
    m, s = cfg.model, cfg.serve
    rep = NamedSharding(mesh, PartitionSpec())
    arg = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rep)
    shape = (m.n_layers, s.num_pages, s.page_size, m.n_kv_heads, m.resolved_head_dim)  # [L,P,S,K,H]
    cs, q = cache_shardings(cfg, mesh, s.kv_dtype), s.kv_dtype == "int8"
    cache = KVCache(jax.ShapeDtypeStruct(shape, KV_DTYPES[s.kv_dtype], sharding=cs.k),
                    jax.ShapeDtypeStruct(shape, KV_DTYPES[s.kv_dtype], sharding=cs.v),
                    jax.ShapeDtypeStruct(shape[:-1], jnp.float32, sharding=cs.k_scale) if q else None,
                    jax.ShapeDtypeStruct(shape[:-1], jnp.float32, sharding=cs.v_scale) if q else None)
    params = abstract_params(cfg, mesh, devices)
    M, B, T = math.ceil(s.max_model_len / s.page_size), s.max_batch, prefill_tokens(cfg)
    i32, f32 = jnp.int32, jnp.float32
    prefill = (params, cache, arg((1, T), i32), arg((), i32), arg((), i32), arg((1, M), i32), arg((1,), f32),
               arg((1,), i32), arg((1,), f32), arg((1, 2), jnp.uint32), arg((), i32), arg((1, T), i32))
    decode = (params, cache, arg((B,), i32), arg((B,), i32), arg((B, M), i32), arg((B,), f32),
              arg((B,), i32), arg((B,), f32), arg((B, 2), jnp.uint32), arg((B,), i32))
    return {"prefill": prefill, "decode": decode}


def compile_serve(cfg: Config, topo: Topology, devices) -> dict:
    """{'prefill'|'decode': (Compiled or CompilerOutOfMemory, seconds, hlo_stats)}."""
    from serving.decode import compile_fns
    cfg, mesh = serve_mesh(cfg, topo, devices)
    args = abstract_args(cfg, mesh, devices)
    out = {}
    for name, fn in zip(("prefill", "decode"), compile_fns(cfg, mesh)):
        t0 = time.perf_counter()
        # The mesh in context, as serving.engine runs the steps: the Pallas kernels' shard_map
        # wrappers need it (a Mosaic kernel cannot be partitioned automatically).
        with aot._attention_target(cfg, devices), jax.set_mesh(mesh):
            lowered = fn.lower(*args[name])
        try:
            out[name] = aot.compile_lowered(lowered, t0)
        except aot.CompilerOutOfMemory as e:
            out[name] = (e, e.seconds, None)
    return out


def estimate(cfg: Config, topo: Topology, devices) -> dict:
    """Memory of the prefill and decode steps at full depth, compile times, the compiler's figures.

    No step time: serving/decode.py runs its layers under lax.scan with no unrolled mode, XLA
    keeps that loop for 2 or more layers (checked on v5e: 1 layer compiles loop-free, 2 and 3 keep
    one loop) and counts its body once, so neither the full compile nor a 1-/2-layer
    extrapolation gives an honest step time. The compiler's full-compile figure is shown, labelled."""
    scfg, _ = serve_mesh(cfg, topo, devices)
    full = compile_serve(cfg, topo, devices)
    m, s, n = scfg.model, scfg.serve, topo.n_devices
    report = {"topology": topo.name, "chips": n, "device_kind": devices[0].device_kind, "mesh": f"tensor={n}",
              "int8_weights": s.int8_weights, "kv_dtype": s.kv_dtype, "attention_impl": m.attention_impl,
              "hbm_bytes": topo.hbm_bytes, "kv_pages": s.num_pages - 1, "max_model_len": s.max_model_len,
              "steps": {}}
    tokens = {"prefill": prefill_tokens(scfg), "decode": s.max_batch}
    for name in ("prefill", "decode"):
        compiled, seconds, hlo = full[name]
        r = {"compile_seconds": seconds, "tokens": tokens[name], "step_seconds": None}
        if isinstance(compiled, aot.CompilerOutOfMemory):
            r.update(fits=False, memory=None, compiler_error=compiled.message)
        else:
            mem = aot.memory(compiled)
            r.update(memory=mem, fits=mem["total"] <= topo.hbm_bytes, compiler=aot.cost(compiled, hlo))
        report["steps"][name] = r
    return report


def format_report(r: dict) -> str:
    gib = aot.gib
    lines = [f"serving on {r['topology']} ({r['chips']} chips, {r['device_kind']}), mesh {r['mesh']}, "
             f"rules serve_tp, int8 weights {r['int8_weights']}, KV {r['kv_dtype']}, attention {r['attention_impl']}",
             f"KV cache {r['kv_pages']} pages, max model len {r['max_model_len']}"]
    for name, st in r["steps"].items():
        what = f"{name} ({st['tokens']} tokens{' per step' if name == 'decode' else ''})"
        if st["memory"] is None:
            lines.append(f"{what}: DOES NOT FIT: the TPU compiler ran out of HBM: {st['compiler_error']}")
            continue
        mem = st["memory"]
        lines.append(f"{what}: HBM per chip {gib(mem['total'])} of {gib(r['hbm_bytes'])} "
                     f"(arguments {gib(mem['argument'])}, temporaries {gib(mem['temp'])}): "
                     + ("fits" if st["fits"] else f"DOES NOT FIT (short by {gib(mem['total'] - r['hbm_bytes'])})"))
        c = st["compiler"]
        lines.append(f"  compiler, full compile: {c['flops']:.4g} FLOPs per chip, {c['optimal_seconds']:.4g} s; "
                     f"{c['while_loops']} while loops counted once (the layer scan): a lower bound, not a step time")
        lines.append(f"  compile time {st['compile_seconds']:.1f} s")
    lines.append("estimated step time, tokens/s and MFU: not estimated for serving (serving/decode.py scans its "
                 "layers with no unrolled mode; the compiler counts the loop body once)")
    return "\n".join(lines)

