"""Load test: N concurrent streaming clients against an OpenAI-compatible server.

  python bench/load.py --url http://127.0.0.1:8000 [--clients 8 32] [--requests 64] [--max-tokens 64]
  python bench/load.py --checkpoint DIR [--int8] [key=value ...]   # starts its own server

For each --clients level (one server, levels in turn): requests/s, generated tokens/s, p50/p99
time to first token and inter-token latency (measured by the clients from streamed chunks), and
the error count (must be 0).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.machine_load import load_report  # noqa: E402
from configs.cli import parse_cli  # noqa: E402

import httpx  # noqa: E402

PROMPTS = ["def main():", "import os\nimport sys\n", "class Parser:\n    def __init__(self", "# Copyright",
           "for i in range(", "return self.", "    if not isinstance(", "x = [i * i for i in"]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


async def one(client: httpx.AsyncClient, url: str, model: str, i: int, args, stats: dict) -> None:
    body = {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": args.max_tokens,
            "temperature": args.temperature, "seed": i, "stream": True, "ignore_eos": True}
    t0 = time.perf_counter()
    last, n = None, 0
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body, headers=args.headers) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"]["message"])
                if not chunk["choices"]:  # the usage chunk
                    continue
                now = time.perf_counter()
                if last is None:
                    stats["ttft"].append(now - t0)
                else:
                    stats["itl"].append(now - last)
                last = now
                n += 1
        stats["tokens"] += args.max_tokens
        stats["ok"] += 1
    except Exception as e:  # noqa: BLE001 - every failure is counted and reported
        stats["errors"].append(f"{type(e).__name__}: {e}")


async def run(url: str, args) -> dict:
    stats = {"ttft": [], "itl": [], "tokens": 0, "ok": 0, "errors": []}
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as client:
        model = (await client.get(f"{url}/v1/models", headers=args.headers)).json()["data"][0]["id"]
        queue = list(range(args.requests))
        t0 = time.perf_counter()

        async def worker():
            while queue:
                await one(client, url, model, queue.pop(), args, stats)

        await asyncio.gather(*(worker() for _ in range(args.clients)))
        stats["wall"] = time.perf_counter() - t0
    return stats


def start_server(args):
    """Load a checkpoint and serve it on a free 127.0.0.1 port in this process."""
    import uvicorn

    from serving.engine import Engine
    from serving.http import create_app
    from serving.load import load_for_serving
    overrides = list(args.overrides) + ([f"serve.kv_dtype={args.kv_dtype}"] if args.kv_dtype else [])
    cfg, mesh, params, tok = load_for_serving(args.checkpoint, overrides, int8=True if args.int8 else None)
    engine = Engine(cfg, params, tok, mesh=mesh)
    engine.warmup()
    engine.start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, "bench"), host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", engine.cfg  # with the KV plan resolved


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="config overrides when starting a server")
    ap.add_argument("--url")
    ap.add_argument("--checkpoint")
    ap.add_argument("--int8", action="store_true")
    ap.add_argument("--kv-dtype")
    ap.add_argument("--clients", type=int, nargs="+", default=[8, 32], help="concurrency levels, run in turn")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--api-key", default=os.environ.get("TESSERA_API_KEY"))
    args = parse_cli(ap)
    args.headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    if bool(args.url) == bool(args.checkpoint):
        sys.exit("bench/load.py: error: give exactly one of --url or --checkpoint")
    desc = args.url
    if args.checkpoint:
        args.url, cfg = start_server(args)
        desc = (f"{args.checkpoint} (int8 weights {cfg.serve.int8_weights}, kv {cfg.serve.kv_dtype}, "
                f"{cfg.serve.num_pages - 1} pages, max model len {cfg.serve.max_model_len or cfg.model.max_seq_len}, "
                f"max_batch {cfg.serve.max_batch})")
    levels, failed = args.clients, 0
    for n in levels:
        args.clients = n
        s = asyncio.run(run(args.url.rstrip("/"), args))
        print(f"server {desc}: {n} clients, {args.requests} requests x {args.max_tokens} tokens")
        print(f"requests/s {s['ok'] / s['wall']:.2f} | tokens/s {s['tokens'] / s['wall']:.1f} | "
              f"TTFT p50 {pct(s['ttft'], 50) * 1e3:.0f} ms p99 {pct(s['ttft'], 99) * 1e3:.0f} ms | "
              f"ITL p50 {pct(s['itl'], 50) * 1e3:.1f} ms p99 {pct(s['itl'], 99) * 1e3:.1f} ms | "
              f"errors {len(s['errors'])}")
        print("TTFT deciles (ms):", [round(pct(s["ttft"], q) * 1e3) for q in range(0, 101, 10)])
        for e in s["errors"][:5]:
            print("  error:", e)
        failed += bool(s["errors"])
    return 1 if failed else 0


if __name__ == "__main__":
    with load_report():
        rc = main()
    sys.exit(rc)
