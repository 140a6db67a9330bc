"""The jitted int8 decode step alone (no engine loop, no peer): median milliseconds per step of
the serving engine's compiled decode function at batch 1 and 16, 48 tokens of context.

  python bench/decode_step.py [--preset 125m] [--float]

Shows where a decode step's time goes without the engine's host work; bench/decode.py is the
end-to-end comparison with transformers.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.machine_load import load_report  # noqa: E402
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench.decode import NoTokenizer  # noqa: E402
from configs import load_config  # noqa: E402
from model.init import create_sharded_model  # noqa: E402
from model.quant import quantize_params  # noqa: E402
from serving.engine import Engine  # noqa: E402
from serving.load import serving_config, serving_mesh  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="125m")
    ap.add_argument("--float", action="store_true", help="the preset's float weights instead of int8")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    ov = ["model.max_seq_len=64", "data.seq_len=64", "mesh.fsdp=1", "serve.kv_dtype=float32",
          "serve.max_batch=16", "serve.page_size=16", "serve.num_pages=65", "serve.prefill_buckets=[32]",
          "serve.max_queue=16"]
    mesh = serving_mesh(1)
    cfg = serving_config(load_config(args.preset, ov), mesh)
    _, state = create_sharded_model(cfg, mesh)
    params = nnx.to_pure_dict(state)
    if not args.float:
        params = jax.jit(quantize_params)(params)
    eng = Engine(cfg, params, NoTokenizer())
    eng.warmup()
    for B in (1, 16):
        table = np.zeros((B, eng.alloc.page_table.shape[1]), np.int32)
        table[:, :4] = np.arange(1, 1 + B * 4, dtype=np.int32).reshape(B, 4)
        args_b = (np.ones(B, np.int32), np.full(B, 48, np.int32), table, np.zeros(B, np.float32),
                  np.zeros(B, np.int32), np.ones(B, np.float32), np.zeros((B, 2), np.uint32), np.zeros(B, np.int32))
        times = []
        for i in range(args.steps + 5):
            t = time.perf_counter()
            eng.cache, out = eng._decode(eng.params, eng.cache, *args_b)
            jax.block_until_ready(out)
            if i >= 5:
                times.append(time.perf_counter() - t)
        print(f"{args.preset} {'float' if args.float else 'int8'} decode step, batch {B:2d}: "
              f"{np.median(times) * 1e3:.1f} ms (median of {args.steps})", flush=True)


if __name__ == "__main__":
    with load_report():
        main()
