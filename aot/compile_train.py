"""Ahead-of-time compilation of the train step for a TPU topology on any host (libtpu from PyPI).

`compile_train` lowers and compiles exactly what train.py runs (training.step.jit_train_step over
training.state.state_layout) against compile-only TPU devices, from abstract inputs, so nothing is
allocated. `estimate` turns that into a report: per-chip HBM from `memory_analysis()` and step
cost from `cost_analysis()`, corrected for the traps in those figures:

- XLA counts a while-loop body once, so with layers under `lax.scan` (and micro-batches under the
  grad-accumulation scan) `flops` and `optimal_seconds` cover one layer of one micro-batch. The
  step cost is extrapolated from extra compiles, unrolled with 1 and 2 layers and one
  micro-batch: cost(L) = cost(1) + (L - 1) (cost(2) - cost(1)), times grad_accum. Models whose
  layers alternate (model.global_every = g) extrapolate whole groups of g layers instead.
- On v5e/v6e every `ConcatBitcast` custom call adds exactly -1 s to `optimal_seconds`; they are
  counted in the HLO and added back.
- Loops the compiler adds itself are still undercounted; the report says when any remain.
Memory needs none of this: it comes from the full compile, scanned as configured.
"""
from __future__ import annotations

import dataclasses
import re
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from configs import Config, ConfigError
from model.layers import resolve_compute_dtype
from model.stats import flops_per_token
from sharding.mesh import check_divisibility, data_parallel_size, make_mesh, mesh_shape
from training.optimizer import learning_rate, make_optimizer
from training.state import abstract_with_shardings, state_layout
from training.step import BATCH_KEYS, batch_sharding, jit_train_step
from aot.topology import GiB, Topology

MEMORY_FIELDS = ("argument", "output", "alias", "temp", "generated_code")


def replace(cfg: Config, section: str, **changes) -> Config:
    """cfg with some fields of one section changed (configs are frozen dataclasses)."""
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)})


def target_config(cfg: Config, topo: Topology) -> Config:
    """Resolve the platform-dependent `auto` choices for a TPU target instead of this host.

    On a CPU host `compute_dtype: auto` would resolve to float32 and `attention_impl: auto` to
    xla by looking at jax.default_backend(); on a TPU they are bf16 and the Pallas flash kernel,
    so that is what is compiled (set model.attention_impl=xla to compare). --slices N puts the
    slices on the data axis unless the config already sets DCN sizes.
    """
    m = cfg.model
    from model.attention import resolve_impl
    cfg = replace(cfg, "model", compute_dtype=resolve_compute_dtype(m.compute_dtype, "tpu"),
                  attention_impl=resolve_impl(m.attention_impl, logit_softcap=m.attn_logit_softcap,
                                              platform="tpu"))
    if cfg.model.attention_impl == "cudnn":
        raise ConfigError("model.attention_impl=cudnn is a GPU kernel; use xla or pallas for TPU targets")
    dcn = cfg.mesh.dcn_data * cfg.mesh.dcn_fsdp * cfg.mesh.dcn_tensor
    if topo.slices > 1 and dcn == 1:
        cfg = replace(cfg, "mesh", dcn_data=topo.slices)
    elif dcn != topo.slices:
        raise ConfigError(f"mesh DCN sizes (data {cfg.mesh.dcn_data}, fsdp {cfg.mesh.dcn_fsdp}, tensor "
                          f"{cfg.mesh.dcn_tensor}) multiply to {dcn} but --slices is {topo.slices}")
    return cfg


def _label(topo: Topology) -> str:
    return f"{topo.name}{f' x {topo.slices} slices' if topo.slices > 1 else ''} ({topo.n_devices} chips)"


def check_mesh(cfg: Config, topo: Topology) -> None:
    """A mesh that does not match the topology's chip count (or the model) is a one-line error,
    found from the config alone, before libtpu is asked for devices."""
    try:
        check_divisibility(cfg, mesh_shape(cfg.mesh, topo.n_devices))
    except ConfigError as e:
        raise ConfigError(f"{_label(topo)}: {e}") from None


def target_mesh(cfg: Config, topo: Topology, devices):
    """The (data, fsdp, tensor) mesh over the topology's devices; a one-line error on mismatch."""
    try:
        return make_mesh(cfg, devices)
    except ConfigError as e:
        raise ConfigError(f"{_label(topo)}: {e}") from None


def _attention_target(cfg: Config, devices):
    """Context in which the model's Pallas attention builds TPU (Mosaic) kernels, not emulation."""
    import contextlib
    if cfg.model.attention_impl != "pallas":
        return contextlib.nullcontext()
    from model.attention import compile_target
    return compile_target("tpu", devices[0].device_kind)


def abstract_train_inputs(cfg: Config, mesh):
    """(graphdef, optimizer, schedule, state shardings, abstract state, abstract batch)."""
    optimizer, schedule = make_optimizer(cfg.train), learning_rate(cfg.train)
    graphdef, abstract, shardings = state_layout(cfg, mesh, optimizer)
    state = abstract_with_shardings(abstract, shardings)
    rows = batch_sharding(mesh)
    shape = (cfg.train.batch_size, cfg.data.seq_len)  # [B,T]
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=rows) for k in BATCH_KEYS}
    return graphdef, optimizer, schedule, shardings, state, batch


def check_batch(cfg: Config, mesh) -> None:
    """The global batch must split evenly over the data axes, per micro-batch."""
    dp = data_parallel_size(mesh)
    micro = cfg.train.batch_size // cfg.train.grad_accum
    if micro % dp:
        raise ConfigError(f"train.batch_size / train.grad_accum ({micro}) must be a multiple of the "
                          f"data-parallel devices ({dp}: mesh data x fsdp)")


class CompilerOutOfMemory(Exception):
    """The TPU compiler refused the program: it needs more HBM than the chip has."""

    def __init__(self, message: str, seconds: float):
        super().__init__(message)
        self.message, self.seconds = message, seconds
        used = re.search(r"Used ([\d.]+)([KMGT])? of ([\d.]+)([KMGT])? hbm", message)
        scale = {None: 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
        self.used = float(used.group(1)) * scale[used.group(2)] if used else None
        self.capacity = float(used.group(3)) * scale[used.group(4)] if used else None


def hlo_stats(text: str) -> dict:
    """What the optimized HLO says about the cost figures' traps."""
    return {"concat_bitcasts": len(re.findall(r'custom_call_target="ConcatBitcast"', text)),
            "while_loops": len(re.findall(r"\swhile\(", text))}


# For the estimate compiles only: XLA's TPU SPMD partitioner turns large FSDP matmuls into
# "windowed einsum" while loops (all-gather / reduce-scatter overlapped with the matmul in chunks;
# seen for fsdp=8 on v6e, 16 loops in one layer), whose bodies the cost analysis counts once.
# Without them each matmul is one all-gather (or reduce-scatter) plus one dot, the same FLOPs and
# bytes, all counted. (xla_tpu_spmd_unroll_windowed_einsum does not remove the loops.) Memory
# and --save come from the full compile, with the compiler's defaults, as it will run.
ESTIMATE_OPTIONS = {"xla_tpu_enable_windowed_einsum_for_all_gather": False,
                    "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False}


def compile_lowered(lowered, t0: float, options: dict | None = None):
    """Compile -> (executable, seconds, hlo_stats); an HBM overflow raises CompilerOutOfMemory.

    The optimized HLO is read from an XLA dump: `Compiled.as_text()` re-parses the module and
    fails on some TPU programs (seen on a 7B v5p step: "async-update instruction should have 1
    operands"), while the compiler's own text dump always works."""
    with tempfile.TemporaryDirectory(prefix="tessera-aot-") as dump:
        options = {"xla_dump_to": dump, "xla_dump_hlo_as_text": True, **(options or {})}
        try:
            compiled = lowered.compile(compiler_options=options)
        except Exception as e:
            text = str(e)
            if "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text:
                lines = [ln.strip() for ln in text.splitlines() if "memory" in ln.lower() or "hbm" in ln.lower()]
                raise CompilerOutOfMemory(" ".join(lines[:2])[:400] or text[:400],
                                          time.perf_counter() - t0) from None
            raise
        seconds = time.perf_counter() - t0
        files = sorted(Path(dump).glob("*after_optimizations.txt"), key=lambda f: f.stat().st_size)
        stats = hlo_stats(files[-1].read_text()) if files else {"concat_bitcasts": 0, "while_loops": -1}
    return compiled, seconds, stats


def compile_train(cfg: Config, topo: Topology, devices, options: dict | None = None):
    """Lower and compile the jitted train step for the topology: (Compiled, seconds, hlo_stats)."""
    mesh = target_mesh(cfg, topo, devices)
    check_batch(cfg, mesh)
    t0 = time.perf_counter()
    graphdef, optimizer, schedule, shardings, state, batch = abstract_train_inputs(cfg, mesh)
    step = jit_train_step(cfg, graphdef, optimizer, schedule, mesh, shardings)
    with _attention_target(cfg, devices):
        lowered = step.lower(state, batch)
    return compile_lowered(lowered, t0, options)


def memory(compiled) -> dict:
    """Per-device bytes by kind, and `total`: what must be resident at the peak of the step.

    Donated state is both an argument and an output; `alias` counts it once more, so
    total = argument + output - alias + temp + generated code."""
    m = compiled.memory_analysis()
    out = {f: int(getattr(m, f"{f}_size_in_bytes")) for f in MEMORY_FIELDS}
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["generated_code"]
    return out


def cost(compiled, hlo: dict) -> dict:
    """flops and optimal_seconds as the compiler reports them (per device), with what the HLO says
    about their traps (hlo_stats): ConcatBitcast calls (-1 s each, added back) and while loops
    (bodies counted once; -1 when the HLO could not be read)."""
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    raw = float(ca.get("optimal_seconds", float("nan")))
    return {"flops": float(ca.get("flops", 0.0)), "optimal_seconds_raw": raw,
            "concat_bitcasts": hlo["concat_bitcasts"], "optimal_seconds": raw + hlo["concat_bitcasts"],
            "while_loops": hlo["while_loops"], "bytes_accessed": float(ca.get("bytes accessed", 0.0))}


def unrolled(cfg: Config, n_layers: int) -> Config:
    """The same step with n layers unrolled and one micro-batch (no scans for XLA to undercount)."""
    micro = cfg.train.batch_size // cfg.train.grad_accum
    cfg = replace(cfg, "model", n_layers=n_layers, scan_layers=False)
    return replace(cfg, "train", batch_size=micro, grad_accum=1)


def extrapolated_cost(cfg: Config, topo: Topology, devices) -> dict:
    """Step cost from unrolled compiles of whole layer groups, x grad_accum.

    g = model.global_every layers make a group (1 when every layer is alike) and r = L % g local
    layers are left over: c(L) = c(g + r) + (L/g - 1)(c(2g) - c(g)), from compiles of g, 2g and
    g + r layers (1 and 2 layers for a uniform model). With grad_accum A the optimizer update is
    counted A times (an overestimate by its share)."""
    L, A = cfg.model.n_layers, cfg.train.grad_accum
    g = max(cfg.model.global_every, 1)
    costs, seconds = {}, 0.0
    for n in dict.fromkeys((g, 2 * g, g + L % g)):
        compiled, t, hlo = compile_train(unrolled(cfg, n), topo, devices, ESTIMATE_OPTIONS)
        costs[n], seconds = cost(compiled, hlo), seconds + t
        del compiled  # one executable at a time: host memory
    keys = ("flops", "optimal_seconds", "bytes_accessed")
    per_group = {k: costs[2 * g][k] - costs[g][k] for k in keys}
    out = {k: A * (costs[g + L % g][k] + (L // g - 1) * per_group[k]) for k in keys}
    out.update(while_loops=max(c["while_loops"] for c in costs.values()), compile_seconds=seconds,
               per_layer_seconds=per_group["optimal_seconds"] / g)
    return out


def estimate(cfg: Config, topo: Topology, devices, extrapolate: bool = True, keep: bool = False) -> dict:
    """Compile the step as configured, then report memory, FLOPs, step time, tokens/s and MFU.

    A step the compiler refuses for lack of HBM is reported (fits False, what it said), not raised.
    `compiled` in the result (only with keep=True) is the executable, for --save."""
    B, T, n = cfg.train.batch_size, cfg.data.seq_len, topo.n_devices
    report = {
        "topology": topo.name, "slices": topo.slices, "chips": n, "libtpu_topology": topo.libtpu_name,
        "device_kind": devices[0].device_kind, "batch_size": B, "per_device_batch": B / n, "seq_len": T,
        "grad_accum": cfg.train.grad_accum, "remat": cfg.model.remat, "scan_layers": cfg.model.scan_layers,
        "attention_impl": cfg.model.attention_impl, "compute_dtype": cfg.model.compute_dtype,
        "mesh": dict(target_mesh(cfg, topo, devices).shape), "rules": cfg.mesh.rules,
        "hbm_bytes": topo.hbm_bytes, "model_flops": flops_per_token(cfg.model, T) * B * T,
    }
    try:
        compiled, seconds, hlo = compile_train(cfg, topo, devices)
    except CompilerOutOfMemory as e:
        report.update(fits=False, memory=None, compile_seconds=e.seconds, compiler_error=e.message,
                      compiler_used_bytes=e.used, compiler_capacity_bytes=e.capacity, step_seconds=None,
                      tokens_per_s_per_chip=None, mfu=None)
        return report
    mem, raw = memory(compiled), cost(compiled, hlo)
    report.update(memory=mem, fits=mem["total"] <= topo.hbm_bytes, compile_seconds=seconds,
                  compiler={**raw, "flops_per_step": raw["flops"] * n})
    if not keep:
        compiled = None  # free the executable before the estimate compiles (host memory)
    looped = cfg.model.scan_layers or cfg.train.grad_accum > 1
    if topo.slices > 1:  # seen: tiny on v5e-4 x 2 reads -5 s even after the ConcatBitcast fix
        step_seconds, loops = None, 0
        source = "not estimated for --slices > 1: the compiler's cost has unexplained negative terms there"
    elif looped and extrapolate:
        ext = extrapolated_cost(cfg, topo, devices)
        report["extrapolated"] = {**ext, "flops_per_step": ext["flops"] * n}
        step_seconds, source = ext["optimal_seconds"], "extrapolated from unrolled compiles of 1 and 2 layer groups"
        loops = ext["while_loops"]
    elif not looped:
        step_seconds, source, loops = raw["optimal_seconds"], "compiler, full step unrolled", raw["while_loops"]
    else:  # a scanned compile's figure covers one layer: no honest step time without the extra compiles
        step_seconds, source, loops = None, "not estimated (--no-estimate: scanned layers count once)", 0
    report["step_seconds"], report["step_seconds_source"] = step_seconds, source
    report["compiler_loops_left"] = loops
    ok = step_seconds is not None and step_seconds > 0
    report["tokens_per_s_per_chip"] = B * T / step_seconds / n if ok else None
    report["mfu"] = report["model_flops"] / (step_seconds * n * topo.peak_flops) if ok else None
    if keep:
        report["compiled"] = compiled
    return report


def gib(x: float) -> str:
    return f"{x / GiB:.2f} GiB"


def format_report(r: dict) -> str:
    """The human-readable report printed by compile.py."""
    cap = r["hbm_bytes"]
    mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items())
    slices = f" x {r['slices']} slices" if r["slices"] > 1 else ""
    lines = [f"target: {r['topology']}{slices} ({r['chips']} chips, {r['libtpu_topology']}, {r['device_kind']}), "
             f"mesh {mesh}, rules {r['rules']}",
             f"step: batch {r['batch_size']} x seq {r['seq_len']} ({r['per_device_batch']:g} rows per chip), "
             f"grad_accum {r['grad_accum']}, remat {r['remat']}, attention {r['attention_impl']}, "
             f"compute {r['compute_dtype']}"]
    if r["memory"] is None:  # the compiler refused it
        used = r.get("compiler_used_bytes")
        short = f" (short by {gib(used - r['compiler_capacity_bytes'])})" if used else ""
        lines += [f"HBM per chip: DOES NOT FIT{short}: the TPU compiler ran out of HBM: {r['compiler_error']}",
                  f"model FLOPs per step: {r['model_flops']:.4g}", f"compile time: {r['compile_seconds']:.1f} s"]
        return "\n".join(lines)
    mem = r["memory"]
    lines += ["HBM per chip: " + ", ".join(f"{k.replace('_', ' ')} {gib(mem[k])}" for k in
                                           ("argument", "output", "alias", "temp", "generated_code")),
              f"  total {gib(mem['total'])} of {gib(cap)}: " +
              (f"fits ({gib(cap - mem['total'])} free)" if r["fits"] else
               f"DOES NOT FIT (short by {gib(mem['total'] - cap)})")]
    c = r["compiler"]
    lines.append(f"model FLOPs per step: {r['model_flops']:.4g}")
    lines.append(f"compiler, full compile: {c['flops_per_step']:.4g} FLOPs per step, optimal_seconds "
                 f"{c['optimal_seconds_raw']:.4g} s (+{c['concat_bitcasts']} s ConcatBitcast correction "
                 f"= {c['optimal_seconds']:.4g} s)" + (f"; {c['while_loops']} while loops counted once"
                                                       if c["while_loops"] else ""))
    if "extrapolated" in r:
        e = r["extrapolated"]
        lines.append(f"corrected estimate (unrolled compiles of 1 and 2 layer groups, extrapolated): "
                     f"{e['flops_per_step']:.4g} FLOPs per step ({e['flops_per_step'] / r['model_flops']:.2f}x "
                     f"model FLOPs), {e['optimal_seconds']:.4g} s per step")
    if r["compiler_loops_left"] > 0:
        lines.append(f"warning: the compiler added {r['compiler_loops_left']} while loops of its own; "
                     "their bodies count once, so the step time is an undercount")
    tps, mfu = r["tokens_per_s_per_chip"], r["mfu"]
    if r["step_seconds"] is None:
        lines.append(f"estimated step time: n/a ({r['step_seconds_source']})")
    else:
        lines.append(f"estimated step time: {r['step_seconds']:.4g} s ({r['step_seconds_source']}; "
                     "the compiler's roofline sum: an optimistic bound, not a measurement)")
    lines.append(f"estimated tokens/s per chip: {tps:,.0f}, MFU {100 * mfu:.1f}%" if tps else
                 "estimated tokens/s per chip and MFU: n/a")
    ext = f" (+ {r['extrapolated']['compile_seconds']:.1f} s for the estimate compiles)" if "extrapolated" in r else ""
    lines.append(f"compile time: {r['compile_seconds']:.1f} s{ext}")
    return "\n".join(lines)
