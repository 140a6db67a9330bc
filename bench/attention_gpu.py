"""GPU attention benchmark: our Pallas (Triton) flash kernel against cuDNN and XLA, same run.

    python bench/attention_gpu.py [--seqs 2048,8192,32768] [--kv-heads 8,32] [--iters 20]

bf16, causal, head dim 128, 32 query heads, 8 and 32 kv heads; batch chosen so each shape holds
~32k tokens. For each shape and implementation: forward and forward+backward, median wall time of
--iters timed runs after warm-up, and TFLOP/s (causal: half the dense 4*B*N*T*S*H matmul flops
forward; backward 2.5x forward). Correctness is checked in the same run: output and gradients of
each implementation against cuDNN (or XLA where cuDNN is unavailable) on the same inputs.
Needs an NVIDIA GPU; exits with a message (code 2) without one. XLA's attention materialises
[B,N,T,S] logits and runs out of memory at long sequences: reported as OOM, not a failure.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.machine_load import load_report  # noqa: E402
from sharding.platforms import skip_absent_tpu  # noqa: E402

skip_absent_tpu()  # a GPU host with libtpu installed would otherwise try (and log) TPU first

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

N_HEADS, HEAD_DIM, TOKENS = 32, 128, 32768


def _gpu_or_exit():
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        gpus = []
    if not gpus:
        print("bench/attention_gpu.py needs an NVIDIA GPU (jax found none: install jax[cuda12] "
              "and run on a GPU machine). Nothing was measured.")
        sys.exit(2)
    return gpus[0]


def _impls():
    from model.kernels.gpu_flash import flash_attention_gpu

    def ours(q, k, v):
        return flash_attention_gpu(q, k, v, causal=True)

    def cudnn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

    def xla(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    return {"pallas": ours, "cudnn": cudnn, "xla": xla}


def _timed(fn, args, iters: int, warmup: int = 3) -> float:
    """Median seconds of fn(*args) over iters runs, after warmup runs (compile included there)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _fwd_bwd(fn):
    def loss(q, k, v, w):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) * w)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def _max_rel_err(a, b) -> float:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.abs(a - b).max() / jnp.maximum(jnp.abs(b).max(), 1e-6))


def _is_oom(e: Exception) -> bool:
    text = str(e).lower()
    return "resource_exhausted" in text or "out of memory" in text or "oom" in text


def bench_shape(T: int, K: int, iters: int, tokens: int = TOKENS):
    """Rows for one (sequence, kv heads) shape: one per implementation."""
    B = max(1, tokens // T)
    keys = jax.random.split(jax.random.key(T + K), 4)
    q = jax.random.normal(keys[0], (B, T, N_HEADS, HEAD_DIM), jnp.bfloat16)
    k = jax.random.normal(keys[1], (B, T, K, HEAD_DIM), jnp.bfloat16)
    v = jax.random.normal(keys[2], (B, T, K, HEAD_DIM), jnp.bfloat16)
    w = jax.random.normal(keys[3], q.shape, jnp.float32)
    fwd_flops = 4 * B * N_HEADS * T * T * HEAD_DIM * 0.5
    results, outputs = {}, {}
    for name, fn in _impls().items():
        row = {"impl": name, "seq": T, "kv_heads": K, "batch": B}
        try:
            f = jax.jit(fn)
            g = _fwd_bwd(fn)
            outputs[name] = (f(q, k, v), g(q, k, v, w)[1])
            t_f = _timed(f, (q, k, v), iters)
            t_fb = _timed(g, (q, k, v, w), iters)
            row.update(fwd_ms=t_f * 1e3, fwd_tflops=fwd_flops / t_f / 1e12,
                       fwdbwd_ms=t_fb * 1e3, fwdbwd_tflops=3.5 * fwd_flops / t_fb / 1e12)
        except Exception as e:  # noqa: BLE001 - report and continue with the other impls
            row["error"] = "OOM" if _is_oom(e) else f"{type(e).__name__}: {str(e)[:120]}"
        results[name] = row
    base = "cudnn" if "cudnn" in outputs else ("xla" if "xla" in outputs else None)
    for name, row in results.items():
        if base and name in outputs and name != base:
            o, grads = outputs[name]
            o_ref, grads_ref = outputs[base]
            row["err_out"] = _max_rel_err(o, o_ref)
            row["err_grad"] = max(_max_rel_err(a, b) for a, b in zip(grads, grads_ref))
            row["checked_against"] = base
    return list(results.values())


def _fmt(row) -> str:
    head = f"| {row['seq']:>6} | {row['kv_heads']:>3} | {row['batch']:>3} | {row['impl']:<7} |"
    if "error" in row:
        return head + f" {row['error']} | | | | |"
    err = (f"{row['err_out']:.1e} / {row['err_grad']:.1e} vs {row['checked_against']}"
           if "err_out" in row else "reference")
    return head + (f" {row['fwd_ms']:8.2f} | {row['fwd_tflops']:6.1f} | {row['fwdbwd_ms']:8.2f} "
                   f"| {row['fwdbwd_tflops']:6.1f} | {err} |")


def main(argv=None) -> int:
    """Parse arguments, run every shape, print a markdown table (paste into docs/results.md)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", default="2048,8192,32768")
    ap.add_argument("--kv-heads", default="8,32")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=TOKENS, help="batch = tokens // seq")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="run the script's logic on CPU (interpret mode; give tiny --seqs): "
                         "checks the bench itself, measures nothing meaningful")
    args = ap.parse_args(argv)
    dev = jax.devices()[0] if args.cpu_smoke else _gpu_or_exit()
    print(f"device: {dev.device_kind}, jax {jax.__version__}; bf16, causal, N={N_HEADS}, "
          f"H={HEAD_DIM}, ~{args.tokens} tokens per shape, median of {args.iters}\n")
    print("| seq | K | B | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s "
          "| max rel err out / grads |")
    print("|---|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for T in (int(s) for s in args.seqs.split(",")):
        for K in (int(s) for s in args.kv_heads.split(",")):
            for row in bench_shape(T, K, args.iters, args.tokens):
                print(_fmt(row), flush=True)
                if row["impl"] == "pallas" and "err_out" in row:
                    worst = max(worst, row["err_out"], row["err_grad"])
    ok = worst < 5e-2
    print(f"\ncorrectness: worst relative error of pallas vs reference {worst:.2e} "
          f"({'OK' if ok else 'FAILED'}, bf16 tolerance 5e-2)")
    return 0 if ok else 1


if __name__ == "__main__":
    with load_report():
        rc = main()
    sys.exit(rc)
