"""The data pipeline against the train step it feeds: is the loader ever the bottleneck?

  python bench/data_pipeline.py [--source stdlib] [--presets tiny 125m] [--workers 0 2] [--steps 3]

Prepares SOURCE (data.prepare, timed: MB/s of text) into a scratch directory, then for each preset
measures, in one run: the loader's tokens/s (grain stream, with each worker count) and the train
step's tokens/s on this machine (Tessera's jitted step, median of --steps after compile). Prints
pipeline / train ratios: above 1 the loader keeps up with one host's accelerators.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.machine_load import load_report  # noqa: E402

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def loader_tokens_per_second(loader, workers: int, seconds: float = 5.0) -> float:
    """Tokens/s of the loader's grain stream over `seconds` (after its first batch)."""
    stream = loader.stream(0, workers=workers, prefetch=4)
    next(stream)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += next(stream)["inputs"].size
    rate = n / (time.perf_counter() - t0)
    if hasattr(stream, "close"):
        stream.close()
    return rate


def train_tokens_per_second(cfg, steps: int) -> float:
    from bench.train_throughput import tessera_step
    run = tessera_step(cfg)
    run()  # compile
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return cfg.train.batch_size * cfg.data.seq_len / statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="stdlib", help='corpus for data.prepare (default: "stdlib")')
    p.add_argument("--presets", nargs="+", default=["tiny", "125m"])
    p.add_argument("--workers", nargs="+", type=int, default=[0, 2])
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    with load_report():
        run(args)
    return 0


def run(args) -> None:
    from configs import load_config
    from data.loader import Loader
    from data.prepare import prepare
    from data.shards import ShardSet
    from data.tokenizer import Tokenizer, train_tokenizer
    from data.corpus import split_documents

    scratch = Path(tempfile.mkdtemp(prefix="tessera-bench-data-"))
    source = "" if args.source == "stdlib" else args.source
    base = load_config("tiny", [f"data.path={source}"])
    docs = split_documents(base, "train")[:200]
    tok = train_tokenizer(docs, base.model.vocab_size, scratch / "tok.model", 2_000_000)
    t0 = time.perf_counter()
    manifest = prepare(source, scratch / "prepared", Tokenizer(tok.path))
    seconds = time.perf_counter() - t0
    text = sum(s["bytes"] for s in manifest["splits"].values())
    tokens = sum(s["tokens"] for s in manifest["splits"].values())
    print(f"prepare: {text / 1e6:.1f} MB of text -> {tokens / 1e6:.2f} M tokens in {seconds:.1f}s "
          f"({text / 1e6 / seconds:.1f} MB/s, {tokens / seconds / 1e6:.2f} M tokens/s, {os.cpu_count()} CPUs)")
    print(f"\n| preset | batch x T | train step tokens/s | " +
          " | ".join(f"loader tokens/s ({w} workers) | ratio" for w in args.workers) + " |")
    print("|---|---|---|" + "---|---|" * len(args.workers))
    for preset in args.presets:
        cfg = load_config(preset)
        T, B = cfg.data.seq_len, cfg.train.batch_size
        loader = Loader(ShardSet(scratch / "prepared", "train", T), B, shuffle=True, seed=0)
        train = train_tokens_per_second(cfg, args.steps)
        cells = []
        for w in args.workers:
            rate = loader_tokens_per_second(loader, w)
            cells += [f"{rate:,.0f}", f"{rate / train:.1f}x"]
        print(f"| {preset} | {B} x {T} | {train:,.0f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
