"""Deterministic, random-access batches of packed rows, with a token cache in RUN_DIR.

`Loader.batch(step)` is a pure function of (step, data.shuffle_seed, process_index): training rows
come from a grain MapDataset, `range(num_rows).shuffle(seed).repeat()`, whose shuffle is a random-
access index permutation re-seeded each epoch (grain uses seed + epoch, so every epoch has a
different order). Global batch `step` is items [step*B, (step+1)*B) of that sequence, and process pi
of pc takes rows [pi*B/pc, (pi+1)*B/pc) of it, so the processes' slices union to the global batch.
The validation loader reads rows in order without shuffling; rows past the end are all padding
(loss_mask 0), so `batch(0..num_batches-1)` covers every validation row exactly once. A loader made
with `stride=seq_len-1` (`full_pass_loader`) reads overlapping rows whose targets are every token of
the split once (see data/packing.py): the whole-split evaluation that is compared with xz.

The tokenized stream is cached at RUN_DIR/data_cache/<key>/ (tokens.npy, offsets.npy), keyed by the
tokenizer file's hash, the data paths and split settings, and the files' sizes and mtimes. It does
not depend on data.seq_len: rows are cut from the stream at load time.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import grain
import numpy as np

from data.corpus import fingerprint, split_documents
from data.errors import DataError
from data.packing import make_rows, num_rows, pack_stream
from data.tokenizer import Tokenizer

CACHE_VERSION = 1
_ENCODE_CHUNK = 64  # documents per encode call: progress reports without slowing the C++ encoder


def _cache_key(cfg, tokenizer: Tokenizer, split: str) -> str:
    tok_hash = hashlib.sha256(Path(tokenizer.path).read_bytes()).hexdigest()[:16]
    return f"{split}-{CACHE_VERSION}-{tok_hash}-{fingerprint(cfg, split)}"


def tokenize_documents(docs: list[str], tokenizer: Tokenizer, label: str = "") -> list[list[int]]:
    """Encode documents in chunks with sentencepiece's threads, reporting progress on stderr."""
    out, total, done, t0, last = [], sum(len(d) for d in docs), 0, time.time(), time.time()
    for i in range(0, len(docs), _ENCODE_CHUNK):
        chunk = docs[i:i + _ENCODE_CHUNK]
        out += tokenizer.encode_batch(chunk, num_threads=os.cpu_count() or 2)
        done += sum(len(d) for d in chunk)
        if time.time() - last > 5:
            last = time.time()
            print(f"[data] tokenizing {label}: {100 * done / total:.0f}% ({time.time() - t0:.0f}s)",
                  file=sys.stderr, flush=True)
    return out


def load_stream(cfg, tokenizer: Tokenizer, run_dir: str | os.PathLike, split: str):
    """The (tokens, offsets) stream of a split: from the cache, or tokenized and cached atomically."""
    cache = Path(run_dir) / "data_cache"
    final = cache / _cache_key(cfg, tokenizer, split)
    if (final / "tokens.npy").is_file():
        return np.load(final / "tokens.npy", mmap_mode="r"), np.load(final / "offsets.npy")
    docs = split_documents(cfg, split)
    t0 = time.time()
    ids = tokenize_documents(docs, tokenizer, split)
    tokens, offsets = pack_stream(ids, tokenizer.bos_id, tokenizer.eos_id)
    print(f"[data] {split}: {len(docs)} documents, {len(tokens)} tokens, tokenized in "
          f"{time.time() - t0:.1f}s", file=sys.stderr, flush=True)
    # Write into a private temp directory, then rename it into place: readers never see a partial
    # cache, and a concurrent writer (another host, same run_dir) simply loses the race.
    tmp = cache / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    np.save(tmp / "tokens.npy", tokens)
    np.save(tmp / "offsets.npy", offsets)
    (tmp / "meta.json").write_text(json.dumps({"documents": len(docs), "tokens": int(len(tokens)),
                                               "tokenizer": tokenizer.path, "path": cfg.data.path}))
    try:
        os.replace(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return tokens, offsets


class Loader:
    """Batches of packed rows for one process: `batch(step)` -> dict of [b, T] numpy arrays.

    Also iterable (`next(loader)` yields batch(step) and advances step); `get_state()` /
    `set_state()` carry that step through checkpoints, so a resumed run sees the same batches.
    """

    def __init__(self, tokens, offsets, seq_len: int, global_batch: int, shuffle: bool, seed: int,
                 pad_id: int = 0, process_index: int = 0, process_count: int = 1,
                 stride: int | None = None):
        if global_batch % process_count:
            raise DataError(f"train.batch_size ({global_batch}) is not divisible by the process count "
                            f"({process_count})")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} out of range for {process_count} processes")
        if shuffle and stride not in (None, seq_len):
            raise ValueError("overlapping rows (stride < seq_len) are for in-order evaluation only")
        self.tokens, self.offsets, self.seq_len = tokens, offsets, seq_len
        self.global_batch, self.shuffle, self.pad_id = global_batch, shuffle, pad_id
        self.stride = seq_len if stride is None else stride
        self.local_batch = global_batch // process_count
        self.first = process_index * self.local_batch
        self.num_rows = num_rows(tokens, seq_len, self.stride)
        self.num_tokens = int(len(tokens))
        self.step = 0
        ds = grain.MapDataset.range(self.num_rows)
        self._order = ds.shuffle(seed=seed).repeat() if shuffle else ds

    @property
    def num_batches(self) -> int:
        """Global batches in one pass over the rows (the last one padded when not shuffled)."""
        return -(-self.num_rows // self.global_batch)

    def row_indices(self, step: int) -> np.ndarray:
        """Row ids of this process's slice of global batch `step` (-1 marks a padding row)."""
        items = step * self.global_batch + self.first + np.arange(self.local_batch)
        if self.shuffle:
            return np.array([self._order[int(i)] for i in items], dtype=np.int64)
        return np.where(items < self.num_rows, items, -1)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of global batch `step`: inputs, targets, segment_ids, positions (int32)
        and loss_mask (float32), each [B / process_count, T]."""
        return make_rows(self.tokens, self.offsets, self.row_indices(step), self.seq_len, self.pad_id,
                         self.stride)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        out = self.batch(self.step)
        self.step += 1
        return out

    def get_state(self) -> dict:
        """The iterator position, for checkpoints."""
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        """Resume from a `get_state()` dict."""
        self.step = int(state["step"])


def full_pass_loader(val: Loader, process_index: int = 0, process_count: int = 1) -> Loader:
    """In-order overlapping rows (stride T-1) over `val`'s stream: every token but the first of the
    stream is a target exactly once (document-crossing targets masked), for whole-split evaluation."""
    return Loader(val.tokens, val.offsets, val.seq_len, val.global_batch, shuffle=False, seed=0,
                  pad_id=val.pad_id, process_index=process_index, process_count=process_count,
                  stride=max(val.seq_len - 1, 1))


def make_loader(cfg, tokenizer: Tokenizer, run_dir: str | os.PathLike, split: str = "train",
                process_index: int = 0, process_count: int = 1) -> Loader:
    """A Loader over `split` ('train': shuffled, repeating; 'val': fixed order) of the config's data."""
    tokens, offsets = load_stream(cfg, tokenizer, run_dir, split)
    return Loader(tokens, offsets, cfg.data.seq_len, cfg.train.batch_size, shuffle=split == "train",
                  seed=cfg.data.shuffle_seed, pad_id=tokenizer.pad_id,
                  process_index=process_index, process_count=process_count)
