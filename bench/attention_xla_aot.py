"""The jnp (`xla`) causal attention of one training layer, compiled ahead of time for one TPU chip.

    python bench/attention_xla_aot.py [--topology v5p:2x2x1] [--batch 4] [--seq 4096] [--heads 32]

Forward + backward (gradients of q, k, v) of three implementations on the same bf16 shapes
(head dim 128, as many kv heads as query heads, as in Llama 2 7B): the reference (every [T,S]
logit, masked), the blocked causal attention with autodiff's backward, and the blocked one whose
backward recomputes the probabilities from the log-sum-exp (model/kernels/xla_causal.py). Prints
the compiler's roofline time (`optimal_seconds`), bytes accessed and HBM temporaries for each,
with the reference's as 1.00x. Compiler outputs: they do not depend on the host's load.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from model.kernels.reference import attention_reference  # noqa: E402
from model.kernels.xla_causal import causal_self_attention  # noqa: E402

H = 128


def implementations(positions):
    """{name: attention(q, k, v) -> out} for rows of one segment."""
    seg = jnp.ones(positions.shape, jnp.int32)
    return {
        "reference": lambda q, k, v: attention_reference(q, k, v, causal=True, q_positions=positions,
                                                         kv_positions=positions, q_segment_ids=seg,
                                                         kv_segment_ids=seg),
        "blocked, autodiff backward": lambda q, k, v: causal_self_attention(q, k, v, positions, recompute=False),
        "blocked, recomputing backward": lambda q, k, v: causal_self_attention(q, k, v, positions, recompute=True),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--topology", default="v5p:2x2x1")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    args = ap.parse_args(argv)
    try:
        import libtpu  # noqa: F401
    except ImportError:
        print("libtpu is not installed (pip install libtpu): cannot compile for TPU topologies.")
        return 2
    from jax.experimental import topologies
    dev = topologies.get_topology_desc(args.topology, "tpu").devices[0]
    shard = jax.sharding.SingleDeviceSharding(dev)
    B, T, N = args.batch, args.seq, args.heads
    qkv = [jax.ShapeDtypeStruct((B, T, N, H), jnp.bfloat16, sharding=shard)] * 3
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    print(f"{dev.device_kind}, one chip: attention fwd+bwd of [{B},{T},{N},{H}] bf16, causal")
    print("| implementation | roofline time | bytes accessed | HBM temporaries |\n|---|---|---|---|")
    first = None
    for name, attend in implementations(positions).items():
        grad = jax.grad(lambda q, k, v: attend(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))
        compiled = jax.jit(grad).lower(*qkv).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        secs, moved = float(cost["optimal_seconds"]), float(cost["bytes accessed"])
        temp = compiled.memory_analysis().temp_size_in_bytes
        first = first or secs
        print(f"| {name} | {secs * 1e3:.2f} ms ({secs / first:.2f}x) | {moved / 1e9:.1f} GB | {temp / 2**30:.2f} GiB |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
