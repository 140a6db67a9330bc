"""Serve a Tessera (or Hugging Face) checkpoint: OpenAI-compatible HTTP server, or one completion.

  python serve.py DIR                                   # HTTP server on 127.0.0.1:8000, defaults for all
  python serve.py DIR [--dtype auto] [--max-model-len N] [--max-num-seqs N] [--tensor-parallel-size N]
                  [--kv-cache-dtype auto|bfloat16|int8|float32] [--gpu-memory-utilization F]
                  [--kv-cache-memory-bytes N] [--served-model-name NAME] [--int8] [key=value ...]
  python serve.py DIR --prompt "def main():" [--max-tokens 64] [--temperature 0]   # CLI mode
  python serve.py DIR --int8 --save-int8 OUT_DIR        # offline int8 checkpoint

Flags carry vLLM's names and meanings (docs/serving.md has the table); earlier names (--tp,
--kv-dtype, --model-name) still work. key=value overrides apply to the checkpoint's config and may
come anywhere (e.g. serve.max_batch=16). Bad checkpoints or config give a one-line error, exit 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    from configs.cli import parse_cli
    from configs.schema import KV_CACHE_DTYPES, SERVE_DTYPES
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="Tessera run directory, int8 checkpoint or Hugging Face directory")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    p.add_argument("--dtype", choices=SERVE_DTYPES, help="weights dtype (default auto: bfloat16 on TPU/GPU, "
                   "float32 on CPU when it fits in half the free RAM)")
    p.add_argument("--max-model-len", type=int, help="longest prompt + completion (default: the model's "
                   "context, capped by what the KV cache holds)")
    p.add_argument("--max-num-seqs", type=int, help="sequences decoded together (serve.max_batch, default 8)")
    p.add_argument("--tensor-parallel-size", "-tp", "--tp", dest="tp", type=int, default=1,
                   help="devices to split the model over (serve_tp rules)")
    p.add_argument("--kv-cache-dtype", "--kv-dtype", dest="kv_dtype", choices=KV_CACHE_DTYPES,
                   help="KV cache dtype (default auto: the weights' dtype)")
    p.add_argument("--gpu-memory-utilization", type=float, help="fraction of device memory for weights + KV "
                   "cache (CPU: of free RAM for the KV cache); default 0.9")
    p.add_argument("--kv-cache-memory-bytes", type=int, help="bytes of KV cache per device (overrides "
                   "--gpu-memory-utilization)")
    p.add_argument("--max-num-batched-tokens", type=int, help="prefill chunk: prompt tokens per step (default 1024)")
    p.add_argument("--int8", action="store_true", help="quantize weights to int8 at load")
    p.add_argument("--quantization", choices=["int8"], help="same as --int8")
    p.add_argument("--no-int8-embedding", action="store_true",
                   help="keep the embedding and output head in float (2-4x the bytes of int8)")
    p.add_argument("--host", help="bind address (default serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default serve.port, 8000)")
    p.add_argument("--api-key", default=os.environ.get("TESSERA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (or set TESSERA_API_KEY)")
    p.add_argument("--served-model-name", "--model-name", dest="model_name",
                   help="model id reported by the API (default: directory name)")
    p.add_argument("--prompt", help="CLI mode: print a completion of this prompt and exit")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--save-int8", metavar="OUT_DIR", help="write an int8 checkpoint and exit")
    p.add_argument("--no-warmup", action="store_true", help="skip compiling before serving")
    return parse_cli(p, argv)


def flag_overrides(args) -> list[str]:
    """The serve.* overrides the vLLM-style flags stand for (before the user's key=value ones)."""
    out = []
    for flag, key in (("dtype", "serve.dtype"), ("kv_dtype", "serve.kv_dtype"),
                      ("max_model_len", "serve.max_model_len"), ("max_num_seqs", "serve.max_batch"),
                      ("gpu_memory_utilization", "serve.memory_utilization"),
                      ("kv_cache_memory_bytes", "serve.kv_cache_memory")):
        if getattr(args, flag) is not None:
            out.append(f"{key}={getattr(args, flag)}")
    if args.max_num_batched_tokens is not None:
        n = args.max_num_batched_tokens
        out.append(f"serve.prefill_buckets={[b for b in (64, 256) if b < n] + [n]}".replace(" ", ""))
    return out


def fail(msg: str) -> None:
    print(f"serve.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


def warmup(engine, log) -> None:
    """Compile every prefill chunk size and decode size before taking traffic."""
    t0 = time.perf_counter()
    engine.warmup()
    log.info("compiled %d prefill chunk sizes and %d decode sizes in %.1fs", len(engine.buckets),
             len(engine.decode_sizes), time.perf_counter() - t0)


def main(argv=None) -> int:
    args = parse_args(argv)
    from sharding.platforms import skip_absent_tpu
    skip_absent_tpu()  # before jax starts its backends: no libtpu start-up errors on hosts without TPU
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    log = logging.getLogger("tessera.serve")
    log.setLevel(logging.INFO)  # our progress lines, without orbax/absl chatter
    overrides = flag_overrides(args) + list(args.overrides)
    int8 = True if (args.int8 or args.quantization == "int8") else None

    from configs import ConfigError
    from serving.load import load_for_serving, save_int8
    try:
        cfg, mesh, params, tok = load_for_serving(
            args.checkpoint, overrides, tp=args.tp, int8=int8,
            int8_embedding=not args.no_int8_embedding)
    except (ConfigError, FileNotFoundError) as e:
        fail(str(e).splitlines()[0])
    except Exception as e:  # orbax/yaml errors on a damaged checkpoint: one line, not a traceback
        fail(f"cannot load {args.checkpoint}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")

    from model.quant import tree_nbytes
    log.info("loaded %s: %.1f MB of weights (%s) on %d %s device(s)", args.checkpoint,
             tree_nbytes(params) / 1e6, "int8" if cfg.serve.int8_weights else cfg.model.param_dtype,
             mesh.size, mesh.devices.flat[0].platform)

    if args.save_int8:
        if not cfg.serve.int8_weights:
            fail("--save-int8 needs --int8 (or an int8 checkpoint)")
        save_int8(args.save_int8, cfg, params, getattr(tok, "path", None),
                  embedding=not args.no_int8_embedding)
        print(f"wrote int8 checkpoint {args.save_int8}")
        return 0

    from serving.engine import Engine
    # The engine takes the mesh rather than inheriting a context: jax.set_mesh is thread-local, so
    # the engine enters it itself, on its own thread and in warmup (the sharded kernels need it).
    try:
        engine = Engine(cfg, params, tok, mesh=mesh)  # sizes the KV cache from what memory is left
    except ConfigError as e:
        fail(str(e).splitlines()[0])
    log.info("%s", engine.plan)
    if args.prompt is None and not args.no_warmup:
        warmup(engine, log)
    engine.start()
    try:
        if args.prompt is not None:
            return cli_completion(engine, tok, args)
        from serving.http import create_app, serve_forever
        name = args.model_name or Path(args.checkpoint.rstrip("/")).name
        host, port = args.host or cfg.serve.host, args.port or cfg.serve.port
        log.info("serving '%s' on http://%s:%d/v1 (auth %s)", name, host, port,
                 "on" if args.api_key else "off")
        serve_forever(create_app(engine, name, args.api_key), host, port)
    finally:
        engine.stop()
    return 0


def cli_completion(engine, tok, args) -> int:
    """Print the completion of --prompt, streaming text as it is produced."""
    import threading

    from serving.request import Request
    from serving.openai import encode
    from serving.sampling import SamplingParams
    ids = encode(tok, args.prompt)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    why = engine.check(len(ids), params.max_tokens)
    if why:
        fail(why)
    done, result = threading.Event(), {}

    def sink(ev):
        sys.stdout.write(ev.text)
        sys.stdout.flush()
        if ev.finish_reason:
            result.update(reason=ev.finish_reason, error=ev.error)
            done.set()

    t0 = time.perf_counter()
    sys.stdout.write(args.prompt)
    engine.submit(Request(ids, params, sink))
    done.wait()
    sys.stdout.write("\n")
    if result.get("error"):
        fail(result["error"])
    print(f"[{result['reason']}; {time.perf_counter() - t0:.2f}s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
