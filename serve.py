"""Serve a Tessera (or Hugging Face) checkpoint: OpenAI-compatible HTTP server, or one completion.

  python serve.py CKPT [--int8] [--kv-dtype int8] [--tp N] [--host H] [--port P] [--api-key KEY]
                  [--model-name NAME] [key=value ...]          # HTTP server (127.0.0.1:8000)
  python serve.py CKPT --prompt "def main():" [--max-tokens 64] [--temperature 0]   # CLI mode
  python serve.py CKPT --int8 --save-int8 OUT_DIR              # offline int8 checkpoint

key=value overrides apply to the checkpoint's config (e.g. serve.num_pages=1024 serve.max_batch=16).
Bad checkpoints or config give a one-line error and exit code 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    from configs.schema import KV_CACHE_DTYPES
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="Tessera run directory, int8 checkpoint or Hugging Face directory")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    p.add_argument("--int8", action="store_true", help="quantize weights to int8 at load")
    p.add_argument("--no-int8-embedding", action="store_true",
                   help="keep the embedding and output head in float (faster on CPU for big vocabularies)")
    p.add_argument("--kv-dtype", choices=KV_CACHE_DTYPES, help="KV cache dtype")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel devices (serve_tp rules)")
    p.add_argument("--host", help="bind address (default serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default serve.port, 8000)")
    p.add_argument("--api-key", default=os.environ.get("TESSERA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (or set TESSERA_API_KEY)")
    p.add_argument("--model-name", help="model id reported by the API (default: directory name)")
    p.add_argument("--prompt", help="CLI mode: print a completion of this prompt and exit")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)
    p.add_argument("--save-int8", metavar="OUT_DIR", help="write an int8 checkpoint and exit")
    p.add_argument("--no-warmup", action="store_true", help="skip compiling before serving")
    return p.parse_args(argv)


def fail(msg: str) -> None:
    print(f"serve.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


def warmup(engine, log) -> None:
    """Compile every prefill bucket and decode size before taking traffic."""
    t0 = time.perf_counter()
    engine.warmup()
    log.info("compiled %d prefill buckets and %d decode sizes in %.1fs", len(engine.buckets),
             len(engine.decode_sizes), time.perf_counter() - t0)


def main(argv=None) -> int:
    args = parse_args(argv)
    from sharding.platforms import skip_absent_tpu
    skip_absent_tpu()  # before jax starts its backends: no libtpu start-up errors on hosts without TPU
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    log = logging.getLogger("tessera.serve")
    log.setLevel(logging.INFO)  # our progress lines, without orbax/absl chatter
    overrides = list(args.overrides)
    if args.kv_dtype:
        overrides.append(f"serve.kv_dtype={args.kv_dtype}")
    if any("=" not in o for o in overrides):
        fail(f"overrides must be key=value, got {[o for o in overrides if '=' not in o][0]!r}")

    from configs import ConfigError
    from serving.load import load_for_serving, save_int8
    try:
        cfg, mesh, params, tok = load_for_serving(
            args.checkpoint, overrides, tp=args.tp, int8=True if args.int8 else None,
            int8_embedding=not args.no_int8_embedding)
    except (ConfigError, FileNotFoundError) as e:
        fail(str(e).splitlines()[0])
    except Exception as e:  # orbax/yaml errors on a damaged checkpoint: one line, not a traceback
        fail(f"cannot load {args.checkpoint}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")

    from model.quant import tree_nbytes
    log.info("loaded %s: %.1f MB of weights (%s), kv %s, %d device(s)", args.checkpoint,
             tree_nbytes(params) / 1e6, "int8" if cfg.serve.int8_weights else cfg.model.param_dtype,
             cfg.serve.kv_dtype, mesh.size)

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
    engine = Engine(cfg, params, tok, mesh=mesh)
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

    from serving.engine import Request
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
