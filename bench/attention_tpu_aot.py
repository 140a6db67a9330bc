"""Ahead-of-time compile of every TPU attention kernel for v5e / v5p / v6e, on any host (libtpu).

    python bench/attention_tpu_aot.py [--topologies v5e:2x2,v5p:2x2x1,v6e:2x2]
                                      [--seqs 2048,8192,32768] [--blocks 0x0,256x512]

For each topology, sequence length, kv-head count (8 and 32; 32 query heads, head dim 128, bf16,
causal) and block size: compiles the flash forward, the flash forward+backward and the paged
decode kernel (bf16 and int8 KV, 8 sequences x 4 new tokens against the full context), and
reports whether it fits VMEM (Mosaic refuses kernels whose scoped VMEM overflows), our estimate of
the kernel's VMEM footprint, the compile time, and the per-device HBM temporaries. Blocks 0x0 are
the per-generation defaults (model/kernels/blocking.py). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.machine_load import load_report  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from model.kernels import blocking  # noqa: E402
from model.kernels.tpu_flash import flash_attention  # noqa: E402
from model.kernels.tpu_paged import paged_attention_tpu  # noqa: E402

N, H, PAGE, DECODE_B, DECODE_T = 32, 128, 16, 8, 4


def vmem_estimate(kind: str, bq: int, bk: int, itemsize: int = 2) -> int:
    """Bytes of VMEM a flash kernel holds: double-buffered in/out blocks, fp32 scratch and the
    fp32 (bq, bk) logits / probabilities tiles (lane-padded (x,1) columns count 128 lanes)."""
    col = bq * 128 * 4                                   # a (bq, 1) fp32 or int32 column
    tile = bq * bk * 4
    if kind == "fwd":
        blocks = (bq * H + 2 * bk * H + bq * H) * itemsize + 2 * col + 2 * bk * 4 * 8
        return 2 * blocks + 2 * col + bq * H * 4 + 3 * tile
    blocks = (2 * bq * H + 2 * bk * H) * itemsize + 4 * col + 2 * bk * 4 * 8
    return 2 * (blocks + 2 * bk * H * itemsize) + 2 * bk * H * 4 + 5 * tile


def _compile(fn, args):
    t0 = time.perf_counter()
    try:
        compiled = jax.jit(fn).lower(*args).compile()
    except Exception as e:  # noqa: BLE001 - a VMEM overflow is a result, not a crash
        text = str(e)
        verdict = "no (VMEM)" if "vmem" in text.lower() else f"error: {text.splitlines()[0][:80]}"
        return verdict, time.perf_counter() - t0, None
    temp = compiled.memory_analysis().temp_size_in_bytes
    return "yes", time.perf_counter() - t0, temp


def run_topology(topology: str, seqs, kv_heads, blocks_list):
    """Rows (dicts) for one topology, yielded as each compile finishes."""
    from jax.experimental import topologies
    dev = topologies.get_topology_desc(topology, "tpu").devices[0]
    gen = blocking.tpu_generation(dev.device_kind)
    shard = jax.sharding.SingleDeviceSharding(dev)

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=shard)
    for S in seqs:
        for K in kv_heads:
            for bq, bk in blocks_list:
                dq, dk = blocking.TPU_BLOCKS.get(gen, (512, 512))
                bq_, bk_ = min(bq or dq, S), min(bk or dk, S)
                kw = dict(causal=True, interpret=False, device_kind=dev.device_kind,
                          block_q=bq_, block_kv=bk_)
                fwd = lambda q, k, v: flash_attention(q, k, v, **kw)           # noqa: E731
                grad = jax.grad(lambda q, k, v: fwd(q, k, v).astype(jnp.float32).sum(),
                                argnums=(0, 1, 2))
                args = [spec((1, S, N, H), jnp.bfloat16), spec((1, S, K, H), jnp.bfloat16),
                        spec((1, S, K, H), jnp.bfloat16)]
                for name, fn, kind in (("flash fwd", fwd, "fwd"), ("flash fwd+bwd", grad, "bwd")):
                    fits, secs, temp = _compile(fn, args)
                    yield dict(topology=topology, gen=gen, kernel=name, seq=S, K=K,
                               blocks=f"{bq_}x{bk_}", fits=fits, secs=secs, temp=temp,
                               vmem=vmem_estimate(kind, bq_, bk_))
        for K in kv_heads:
            pages = DECODE_B * S // PAGE
            for kv in ("bfloat16", "int8"):
                dt = jnp.dtype(kv)
                args = [spec((DECODE_B, DECODE_T, N, H), jnp.bfloat16),
                        spec((pages, PAGE, K, H), dt), spec((pages, PAGE, K, H), dt),
                        spec((DECODE_B, S // PAGE), jnp.int32), spec((DECODE_B,), jnp.int32)]
                if kv == "int8":
                    args += [spec((pages, PAGE, K), jnp.float32)] * 2

                def dec(q, kp, vp, t, ln, *sc):
                    return paged_attention_tpu(q, kp, vp, t, ln, interpret=False,
                                               k_scales=sc[0] if sc else None,
                                               v_scales=sc[1] if sc else None)
                fits, secs, temp = _compile(dec, args)
                yield dict(topology=topology, gen=gen, kernel=f"paged decode {kv}", seq=S,
                           K=K, blocks=f"{max(1, 256 // PAGE)} pages", fits=fits,
                           secs=secs, temp=temp, vmem=None)


def main(argv=None) -> int:
    """Compile everything, print the markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--topologies", default="v5e:2x2,v5p:2x2x1,v6e:2x2")
    ap.add_argument("--seqs", default="2048,8192,32768")
    ap.add_argument("--kv-heads", default="8,32")
    ap.add_argument("--blocks", default="0x0", help="comma list of QxKV block sizes; 0 = default")
    args = ap.parse_args(argv)
    try:
        import libtpu  # noqa: F401
    except ImportError:
        print("libtpu is not installed (pip install libtpu): cannot compile for TPU topologies.")
        return 2
    seqs = [int(s) for s in args.seqs.split(",")]
    kv_heads = [int(s) for s in args.kv_heads.split(",")]
    blocks_list = [tuple(int(x) for x in b.split("x")) for b in args.blocks.split(",")]
    print(f"jax {jax.__version__}; bf16, causal, N={N}, H={H}; flash B=1; decode B={DECODE_B}, "
          f"T={DECODE_T}, page {PAGE}, context = seq\n")
    print("| topology | kernel | seq | K | blocks | fits VMEM | est. VMEM MiB | compile s "
          "| HBM temp MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    bad = 0
    for topo in args.topologies.split(","):
        for r in run_topology(topo, seqs, kv_heads, blocks_list):
            vmem = "" if r["vmem"] is None else f"{r['vmem'] / 2**20:.1f}"
            temp = "" if r["temp"] is None else f"{r['temp'] / 2**20:.0f}"
            print(f"| {r['topology']} | {r['kernel']} | {r['seq']} | {r['K']} | {r['blocks']} "
                  f"| {r['fits']} | {vmem} | {r['secs']:.1f} | {temp} |", flush=True)
            bad += r["fits"].startswith("error")
    return 1 if bad else 0


if __name__ == "__main__":
    with load_report():
        rc = main()
    sys.exit(rc)
