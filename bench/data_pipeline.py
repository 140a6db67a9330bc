"""The data pipeline against the train step it feeds: is the loader ever the bottleneck?

  python bench/data_pipeline.py [--source stdlib] [--presets tiny 125m] [--workers 0 2] [--steps 3]

Prepares SOURCE (data.prepare, timed: MB/s of text) into a scratch directory; compares random row
reads from the flat shards with the same rows stored as ArrayRecord records (read through grain's
ArrayRecordDataSource, the ecosystem's format); then for each preset measures, in one run, the
loader's tokens/s (grain stream, with each worker count) and the train step's tokens/s on this
machine (Tessera's jitted step, median of --steps after compile). Prints pipeline / train ratios:
above 1 the loader keeps up with one host's accelerators.
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


def random_read_rates(directory, seq_len: int, batch: int, seconds: float = 5.0) -> tuple[float, float, float]:
    """Rows read at random, tokens/s: from the shards (ShardSet.windows) and from the same rows
    written as ArrayRecord records (grain's ArrayRecordDataSource), plus ArrayRecord's file size
    relative to the shards'. The two formats compared on the reads training does."""
    import numpy as np
    from array_record.python.array_record_module import ArrayRecordWriter
    from grain.sources import ArrayRecordDataSource
    from data.shards import ShardSet
    shards = ShardSet(directory, "train", seq_len)
    path = str(Path(directory) / "rows.array_record")
    writer = ArrayRecordWriter(path, "group_size:1")
    for start in range(0, shards.num_rows, 1024):
        raw, valid, _ = shards.windows(np.arange(start, min(start + 1024, shards.num_rows)))
        for row, ok in zip(raw, valid):
            writer.write(row[ok].tobytes())
    writer.close()
    source = ArrayRecordDataSource([path])
    rng = np.random.default_rng(0)
    rates = []
    def read_array_record(ids):  # the batched read (__getitems__), ArrayRecord's fast path
        return [np.frombuffer(r, "<i4") for r in source.__getitems__([int(i) for i in ids])]

    for read in (shards.windows, read_array_record):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            read(rng.integers(0, shards.num_rows, batch))
            n += batch * seq_len
        rates.append(n / (time.perf_counter() - t0))
    size = os.path.getsize(path) / sum(os.path.getsize(Path(directory) / f) for f in shards.files)
    return rates[0], rates[1], size


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
    flat, array_record, size = random_read_rates(scratch / "prepared", 256, 16)
    print(f"random rows (T = 256, 16 a read): flat shards {flat:,.0f} tokens/s, the same rows as ArrayRecord "
          f"records {array_record:,.0f} tokens/s ({flat / array_record:.2f}x); ArrayRecord file size "
          f"{size:.2f}x the shards'")
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
