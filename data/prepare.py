"""Tokenize a corpus once into sharded token files that training streams from.

    python -m data.prepare SRC OUT (--tokenizer FILE | --vocab-size N) [--workers N]
                           [--val-path P] [--val-fraction F] [--jsonl-field F]

SRC is a text file, a .jsonl or .parquet file, a directory (its .jsonl/.parquet files are
records, other files whole documents), or "stdlib" (the Python standard library's source); OUT a
local directory or gs://bucket/path. The corpus is cut into units (data/
corpus.py), worker processes tokenize them in parallel, and each unit becomes one shard per split
(data/shards.py), renamed into place when complete with a record in OUT/units/. Killed half-way,
the same command finishes the missing units only. OUT/manifest.json is written last.

Training uses OUT with `data.path=OUT` (its tokenizer is OUT's unless data.tokenizer is set).
train.py prepares a raw data.path by itself, into RUN_DIR/data_cache/, with the same code.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import sys
import time

from etils import epath

from configs import ConfigError
from configs.loader import check_uri
from data.corpus import Unit, corpus_units, split_units, unit_documents
from data.errors import DataError
from data.metrics import xz_bits_per_byte
from data.shards import FORMAT_VERSION, MANIFEST, pack_documents, read_manifest, tokenizer_hash
from store.paths import open_atomic, write_atomic

_CHUNK_BYTES = 1 << 20      # text per encode call: bounded memory, progress, few Python calls
XZ_MAX_BYTES = 64 << 20     # the xz baseline of the validation split is computed up to this size


def settings(path: str, val_path: str, val_fraction: float, jsonl_field: str, tokenizer) -> dict:
    """What determines the shards' contents (recorded in the manifest and every unit record)."""
    return {"format": FORMAT_VERSION, "source": path or "stdlib", "val_path": val_path,
            "val_fraction": val_fraction if not val_path else None, "jsonl_field": jsonl_field,
            "tokenizer_sha256": tokenizer_hash(tokenizer)}


def prepare_unit(index: int, unit: Unit, out: str, tokenizer, val_fraction: float, jsonl_field: str,
                 threads: int, setup: dict) -> dict:
    """Tokenize one unit into OUT/{split}-{index:05d}.tok per split; returns (and records) its stats."""
    out = epath.Path(out)
    stats, files, pending, pending_bytes = {}, {}, {}, 0

    def flush():
        for split, docs in pending.items():
            ids = tokenizer.encode_batch(docs, num_threads=threads)
            stream = pack_documents(ids, tokenizer.bos_id, tokenizer.eos_id)
            if split not in files:
                files[split] = stack.enter_context(open_atomic(out / f"{split}-{index:05d}.tok"))
            files[split].write(stream.astype("<i4").tobytes())
            s = stats.setdefault(split, {"documents": 0, "tokens": 0, "bytes": 0})
            s["documents"] += len(docs)
            s["tokens"] += int(len(stream))
            s["bytes"] += sum(len(d.encode("utf-8")) for d in docs)
        pending.clear()

    with contextlib.ExitStack() as stack:  # each shard appears complete, or not at all
        for split, text in unit_documents(unit, val_fraction, jsonl_field):
            pending.setdefault(split, []).append(text)
            pending_bytes += len(text)
            if pending_bytes >= _CHUNK_BYTES:
                flush()
                pending_bytes = 0
        flush()
    for split in stats:
        stats[split]["file"] = f"{split}-{index:05d}.tok"
    record = {"unit": index, "input_bytes": unit.size, "splits": stats, "settings": setup}
    write_atomic(out / "units" / f"{index:05d}.json", json.dumps(record).encode())
    return record


def _unit_task(args):
    return prepare_unit(*args)


def _done_record(out: epath.Path, index: int, setup: dict) -> dict | None:
    path = out / "units" / f"{index:05d}.json"
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    if record.get("settings") != setup:
        raise DataError(f"{out} holds data prepared with other settings or another tokenizer "
                        f"(units/{index:05d}.json); prepare into a new directory")
    return record


class _Progress:
    """Units done, percent of input bytes, MB/s and ETA on stderr, at most every 5 s."""

    def __init__(self, total_bytes: int, units: int, label: str):
        self.total, self.units, self.label = max(total_bytes, 1), units, label
        self.done_bytes, self.done_units, self.t0, self.last = 0, 0, time.time(), 0.0

    def update(self, unit_bytes: int, final: bool = False) -> None:
        self.done_bytes += unit_bytes
        self.done_units += 1
        now = time.time()
        if not final and now - self.last < 5 and self.done_units < self.units:
            return
        self.last, elapsed = now, max(now - self.t0, 1e-9)
        rate = self.done_bytes / elapsed
        eta = (self.total - self.done_bytes) / rate if rate else float("inf")
        print(f"[data] preparing {self.label}: {self.done_units}/{self.units} units, "
              f"{100 * self.done_bytes / self.total:.0f}% of {self.total / 1e6:.1f} MB, "
              f"{rate / 1e6:.1f} MB/s, ETA {eta:.0f}s", file=sys.stderr, flush=True)


def prepare(path: str, out, tokenizer, val_path: str = "", val_fraction: float = 0.05,
            jsonl_field: str = "text", workers: int = 0) -> dict:
    """Prepare `path` (and `val_path`) into OUT with `tokenizer`; resumes; returns the manifest.

    workers: tokenizing processes (0: one per CPU). Small corpora are done in this process.
    """
    out = epath.Path(out)
    setup = settings(path, val_path, val_fraction, jsonl_field, tokenizer)
    manifest = read_manifest(out)
    if manifest is not None:
        if manifest["settings"] != setup:
            raise DataError(f"{out} holds data prepared from {manifest['settings']['source']} with other "
                            f"settings or another tokenizer; prepare into a new directory")
        return manifest
    units = split_units(path, val_path)
    records = {i: _done_record(out, i, setup) for i in range(len(units))}
    todo = [i for i, r in records.items() if r is None]
    cpus = os.cpu_count() or 1
    workers = min(workers or cpus, len(todo))
    label = f"{path or 'the Python standard library'} -> {out}"
    progress = _Progress(sum(units[i].size for i in todo), len(todo), label)
    if todo:
        (out / "units").mkdir(parents=True, exist_ok=True)
        print(f"[data] preparing {label}: {len(todo)} of {len(units)} units to tokenize with "
              f"{max(workers, 1)} worker(s)", file=sys.stderr, flush=True)
    small = sum(units[i].size for i in todo) < 8 * _CHUNK_BYTES
    if workers <= 1 or small:
        for i in todo:
            records[i] = prepare_unit(i, units[i], str(out), tokenizer, val_fraction, jsonl_field, cpus, setup)
            progress.update(units[i].size, final=i == todo[-1])
    else:
        threads = max(1, cpus // workers)
        tasks = [(i, units[i], str(out), tokenizer, val_fraction, jsonl_field, threads, setup) for i in todo]
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for record in pool.imap_unordered(_unit_task, tasks):
                records[record["unit"]] = record
                progress.update(record["input_bytes"], final=progress.done_units + 1 == len(todo))
    manifest = _manifest(records, units, setup, val_fraction, jsonl_field)
    for split in ("train", "val"):  # checked before the manifest: an unusable corpus leaves none
        if not manifest["splits"][split]["documents"]:
            where, field = (val_path, "data.val_path") if val_path and split == "val" else (path, "data.path")
            raise DataError(f"no {split} documents with text in {where or 'the Python standard library'} ({field})")
    tok_file = epath.Path(tokenizer.path)  # kept as tokenizer.model (sentencepiece) or tokenizer.json
    kept = out / ("tokenizer.model" if tok_file.suffix == ".model" else tok_file.name)
    if not kept.exists():
        write_atomic(kept, tok_file.read_bytes())
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


def _manifest(records: dict, units: list[Unit], setup: dict, val_fraction: float, jsonl_field: str) -> dict:
    splits = {}
    for name in ("train", "val"):
        shards = [{"file": r["splits"][name]["file"], "tokens": r["splits"][name]["tokens"],
                   "documents": r["splits"][name]["documents"]}
                  for _, r in sorted(records.items()) if name in r["splits"]]
        totals = {k: sum(r["splits"][name][k] for r in records.values() if name in r["splits"])
                  for k in ("documents", "tokens", "bytes")}
        splits[name] = {**totals, "shards": shards}
    val = splits["val"]
    val["xz_bpb"] = None
    if 0 < val["bytes"] <= XZ_MAX_BYTES:
        val["xz_bpb"] = xz_bits_per_byte(text for unit in units  # streamed, in corpus order
                                         for split, text in unit_documents(unit, val_fraction, jsonl_field)
                                         if split == "val")
    return {"settings": setup, "splits": splits}


def _tokenizer(args):
    from data.tokenizer import Tokenizer, train_tokenizer
    if args.tokenizer:
        if not epath.Path(args.tokenizer).is_file():
            raise DataError(f"tokenizer file not found: {args.tokenizer} (--tokenizer)")
        return Tokenizer(args.tokenizer)
    # Train one on a sample: units in a stable hash order until the byte budget is read.
    out = epath.Path(args.out)
    if (out / "tokenizer.model").exists():
        return Tokenizer(str(out / "tokenizer.model"))
    from data.corpus import stable_fraction
    units = sorted(corpus_units(args.source, "SRC"), key=lambda u: stable_fraction(repr(u)))
    docs, used = [], 0
    for unit in units:
        for split, text in unit_documents(unit, args.val_fraction, args.jsonl_field):
            if split == "train" and used < args.sample_bytes:
                docs.append(text)
                used += len(text)
        if used >= args.sample_bytes:
            break
    out.mkdir(parents=True, exist_ok=True)
    return train_tokenizer(docs, args.vocab_size, out / "tokenizer.model", args.sample_bytes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help='text file, directory, .jsonl, .parquet, or "stdlib"')
    p.add_argument("out", help="output directory (local or gs://)")
    p.add_argument("--tokenizer", default="", help="sentencepiece .model file")
    p.add_argument("--vocab-size", type=int, default=0, help="train a tokenizer of this size instead")
    p.add_argument("--sample-bytes", type=int, default=20_000_000, help="text to train it on")
    p.add_argument("--val-path", default="", help="separate validation data")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--jsonl-field", default="text", help="the text field of JSONL records / Parquet column")
    p.add_argument("--workers", type=int, default=0, help="tokenizing processes (default: one per CPU)")
    args = p.parse_args(argv)
    args.source = "" if args.source == "stdlib" else args.source
    if bool(args.tokenizer) == bool(args.vocab_size):
        print("error: give exactly one of --tokenizer FILE and --vocab-size N", file=sys.stderr)
        return 2
    try:
        check_uri(args.out, "OUT")
        tok = _tokenizer(args)
        t0 = time.time()
        m = prepare(args.source, args.out, tok, args.val_path, args.val_fraction, args.jsonl_field, args.workers)
    except ConfigError as e:  # DataError included
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, s in m["splits"].items():
        print(f"{name}: {s['documents']:,} documents, {s['tokens']:,} tokens, {s['bytes'] / 1e6:,.1f} MB "
              f"in {len(s['shards'])} shards")
    print(f"prepared {args.out} in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
