"""`compile.py --suggest`: the fastest remat policy and per-chip batch that fits the slice's HBM.

Search, per remat policy: compile the scanned step (memory is exact and takes one compile) at
each per-chip batch from the largest down, and stop at the first that fits; then time that one
with the unrolled compiles of 1 and 2 layer groups (aot.compile_train.extrapolated_cost). Only the largest
fitting batch of a policy is timed: under the compiler's roofline estimate tokens/s per chip does
not fall as the batch grows (the weights' gathers and the optimizer update are per step, not per
row), so smaller batches of the same policy cannot win. The winner has the most tokens/s per chip.
"""
from __future__ import annotations

from typing import Callable

from configs import Config
from model.stats import flops_per_token
from sharding.mesh import data_parallel_size
from aot import compile_train as aot
from aot.topology import Topology


def candidate(cfg: Config, remat: str, rows_per_shard: int, dp: int) -> Config:
    """cfg with this remat policy and `rows_per_shard` rows per data-parallel shard per micro-batch."""
    cfg = aot.replace(cfg, "model", remat=remat)
    return aot.replace(cfg, "train", batch_size=rows_per_shard * dp * cfg.train.grad_accum)


def suggest(cfg: Config, topo: Topology, devices, remats: list[str], batches: list[int],
            log: Callable[[str], None] = print, memory_fn=None, cost_fn=None) -> dict:
    """Try the grid; returns {"tried": [...], "best": row or None, ...}. memory_fn(cfg) -> bytes
    and cost_fn(cfg) -> seconds per step default to real compiles (tests pass fakes)."""
    mesh = aot.target_mesh(cfg, topo, devices)
    dp = data_parallel_size(mesh)
    memory_fn = memory_fn or (lambda c: aot.memory(aot.compile_train(c, topo, devices)[0])["total"])
    cost_fn = cost_fn or (lambda c: aot.extrapolated_cost(c, topo, devices)["optimal_seconds"])
    tried, timed = [], []
    for remat in remats:
        for rows in sorted(set(batches), reverse=True):
            c = candidate(cfg, remat, rows, dp)
            row = {"remat": remat, "batch_size": c.train.batch_size,
                   "per_chip_batch": c.train.batch_size / topo.n_devices}
            try:
                row["hbm_bytes"] = memory_fn(c)
                row["fits"] = row["hbm_bytes"] <= topo.hbm_bytes
            except aot.CompilerOutOfMemory as e:  # the compiler refused it: does not fit
                row["hbm_bytes"], row["fits"], row["error"] = e.used, False, e.message
            tried.append(row)
            log(f"  remat {remat:9s} batch {c.train.batch_size:5d} ({row['per_chip_batch']:g}/chip): "
                + (f"{row['hbm_bytes'] / 2**30:.2f} GiB, " if row["hbm_bytes"] is not None else "")
                + ("fits" if row["fits"] else "does not fit"))
            if not row["fits"]:
                continue
            seconds = cost_fn(c)
            tokens = c.train.batch_size * c.data.seq_len
            row["step_seconds"] = seconds
            row["tokens_per_s_per_chip"] = tokens / seconds / topo.n_devices if seconds > 0 else 0.0
            row["mfu"] = (flops_per_token(c.model, c.data.seq_len) * tokens / (seconds * topo.n_devices *
                                                                             topo.peak_flops) if seconds > 0 else 0.0)
            log(f"    estimated {seconds:.4g} s per step, {row['tokens_per_s_per_chip']:,.0f} tokens/s per chip, "
                f"MFU {100 * row['mfu']:.1f}%")
            timed.append(row)
            break  # smaller batches of this policy cannot be faster per chip (module docstring)
    best = max(timed, key=lambda r: r["tokens_per_s_per_chip"], default=None)
    return {"topology": topo.name, "chips": topo.n_devices, "hbm_capacity": topo.hbm_bytes,
            "seq_len": cfg.data.seq_len, "grad_accum": cfg.train.grad_accum, "tried": tried, "best": best}


def format_result(result: dict) -> str:
    """A table of what was tried and the winner as overrides to pass to train.py / compile.py."""
    lines = [f"{'remat':10s} {'batch':>6s} {'/chip':>6s} {'HBM GiB':>8s} {'fits':>5s} {'step s':>8s} "
             f"{'tok/s/chip':>11s} {'MFU':>6s}"]
    for r in result["tried"]:
        hbm = f"{r['hbm_bytes'] / 2**30:.2f}" if r["hbm_bytes"] is not None else "error"
        timed = "step_seconds" in r
        lines.append(f"{r['remat']:10s} {r['batch_size']:6d} {r['per_chip_batch']:6g} {hbm:>8s} "
                     f"{'yes' if r['fits'] else 'no':>5s} "
                     + (f"{r['step_seconds']:8.4g} {r['tokens_per_s_per_chip']:11,.0f} {100 * r['mfu']:5.1f}%"
                        if timed else f"{'-':>8s} {'-':>11s} {'-':>6s}"))
    best = result["best"]
    if best is None:
        lines.append(f"nothing tried fits {result['hbm_capacity'] / 2**30:.0f} GiB per chip on "
                     f"{result['topology']}: use more chips, a larger per-chip HBM, or mesh.rules=fsdp_tp")
    else:
        lines.append(f"fastest that fits: model.remat={best['remat']} train.batch_size={best['batch_size']} "
                     f"({best['per_chip_batch']:g} rows per chip), {best['tokens_per_s_per_chip']:,.0f} tokens/s "
                     f"per chip, MFU {100 * best['mfu']:.1f}% (estimated)")
    return "\n".join(lines)
