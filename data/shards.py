"""Prepared token shards: the on-disk form of a tokenized corpus, and random access to its rows.

A prepared directory (a local path or gs://bucket/...) holds
  manifest.json           what was prepared: source, settings, tokenizer hash, and per split the
                          documents, tokens, UTF-8 bytes and shard list (file, tokens, documents)
  {split}-{unit:05d}.tok  one shard per input unit and split: every document as bos + ids + eos,
                          int32 little-endian, concatenated. The first token of each document is
                          stored bit-inverted (~id < 0), so document boundaries need no index and
                          any byte range of a shard reads alone.
  units/{unit:05d}.json   a finished unit: what `data.prepare` resumes from
  tokenizer.*             the tokenizer the shards were made with

Rows of T tokens are cut from each shard separately: row r of a shard is its tokens
[r*S, r*S + T) with stride S (T for training; T-1 for the whole-split evaluation), so a row never
spans two shards and reading it is one range read. Memory holds the shard list, never the tokens.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict

import numpy as np
from etils import epath

from data.errors import DataError
from data.packing import num_rows
from store.paths import is_remote

MANIFEST = "manifest.json"
FORMAT_VERSION = 2
_OPEN_FILES = 64  # shard files kept open per process (least recently used closed first)


def pack_documents(docs_ids, bos_id: int, eos_id: int) -> np.ndarray:
    """Documents' token ids as one shard stream: bos + ids + eos each, first token bit-inverted."""
    parts = []
    for ids in docs_ids:
        doc = np.asarray(([bos_id] if bos_id >= 0 else []) + list(ids) + ([eos_id] if eos_id >= 0 else []),
                         np.int32)
        if len(doc):
            doc[0] = ~doc[0]
            parts.append(doc)
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def unpack(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shard values -> (token ids, document-start flags)."""
    start = raw < 0
    return np.where(start, ~raw, raw), start


def read_manifest(directory) -> dict | None:
    """The manifest of a prepared directory, or None when there is none (yet)."""
    path = epath.Path(directory) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the tokenizer's file: what a prepared directory is checked against."""
    return hashlib.sha256(epath.Path(tokenizer.path).read_bytes()).hexdigest()


def is_prepared(path: str) -> bool:
    """Whether `path` is a directory made by `data.prepare` (it holds a manifest)."""
    return bool(path) and (epath.Path(path) / MANIFEST).exists()


def write_streams(directory, streams: dict[str, list[np.ndarray]], info: dict | None = None) -> str:
    """A prepared directory made from in-memory shard streams (pack_documents output) per split:
    for small data such as an evaluation file. `data.prepare` is the streaming way."""
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, shards in streams.items():
        entries = []
        for i, stream in enumerate(shards):
            name = f"{split}-{i:05d}.tok"
            (directory / name).write_bytes(np.asarray(stream, "<i4").tobytes())
            entries.append({"file": name, "tokens": int(len(stream)), "documents": int((stream < 0).sum())})
        splits[split] = {"documents": sum(e["documents"] for e in entries), "bytes": 0,
                         "tokens": sum(e["tokens"] for e in entries), "shards": entries}
    (directory / MANIFEST).write_text(json.dumps({"settings": info or {}, "splits": splits}))
    return str(directory)


class ShardSet:
    """The rows of one split of a prepared directory, for seq_len T and stride S.

    Row ids run over the shards in manifest order. `windows(rows)` reads their tokens; the object
    pickles without its open files (grain worker processes reopen them).
    """

    def __init__(self, directory, split: str, seq_len: int, stride: int | None = None):
        self.directory, self.split, self.seq_len = str(directory), split, seq_len
        self.stride = seq_len if stride is None else stride
        manifest = read_manifest(directory)
        if manifest is None:
            raise DataError(f"{directory} holds no prepared data ({MANIFEST} not found)")
        self.info = manifest["splits"][split]
        self.files = [s["file"] for s in self.info["shards"]]
        self.shard_tokens = np.array([s["tokens"] for s in self.info["shards"]], np.int64)
        rows = np.array([num_rows(int(n), seq_len, self.stride) for n in self.shard_tokens], np.int64)
        self.row_ends = np.cumsum(rows)                      # [shards] first row id after each shard
        self.num_rows = int(self.row_ends[-1]) if len(rows) else 0
        self.num_tokens = int(self.shard_tokens.sum())
        self._open = threading.local()  # per thread: shard -> open file

    def with_stride(self, stride: int) -> ShardSet:
        """The same split cut with another stride."""
        return ShardSet(self.directory, self.split, self.seq_len, stride)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_open"}

    def __setstate__(self, state):
        self.__dict__.update(state, _open=threading.local())

    def _read(self, pieces: list[tuple[int, int, int]]) -> list[bytes]:
        """Bytes [start, start+n) of each (shard, start, n): seek and read on local files (kept
        open); on gs:// one concurrent batch of ranged GETs (no read-ahead: rows are small and
        scattered)."""
        paths = [f"{self.directory}/{self.files[shard]}" for shard, _, _ in pieces]
        if not paths:
            return []
        try:
            if is_remote(self.directory):
                import fsspec
                return fsspec.filesystem("gs").cat_ranges(paths, [s for _, s, _ in pieces],
                                                          [s + n for _, s, n in pieces], on_error="raise")
            # Each thread has its own files (grain's prefetch threads read concurrently; a thread's
            # files close when it ends), and pread has no shared file position.
            cache = self._open.__dict__.setdefault("files", OrderedDict())
            out = []
            for path, (shard, start, n) in zip(paths, pieces):
                f = cache.pop(shard, None)
                if f is None:
                    f = open(path, "rb", buffering=0)
                    if len(cache) >= _OPEN_FILES:
                        cache.popitem(last=False)[1].close()
                cache[shard] = f
                out.append(os.pread(f.fileno(), n, start))
            return out
        except OSError as e:
            raise DataError(f"cannot read prepared shard in {self.directory}: {e}") from None

    def windows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Shard values of `rows` ([b]; -1 for a padding row): (raw [b, T] int32, valid [b, T] bool,
        first [b] bool: the row is its shard's first, no earlier row scored any of its targets)."""
        T = self.seq_len
        raw = np.zeros((len(rows), T), np.int32)
        valid = np.zeros((len(rows), T), bool)
        first = np.zeros(len(rows), bool)
        where, pieces = [], []
        for i, row in enumerate(np.asarray(rows, np.int64)):
            if row < 0 or row >= self.num_rows:
                continue
            shard = int(np.searchsorted(self.row_ends, row, side="right"))
            local = int(row - (self.row_ends[shard - 1] if shard else 0))
            start = local * self.stride
            n = int(min(T, self.shard_tokens[shard] - start))
            where.append((i, n))
            pieces.append((shard, 4 * start, 4 * n))
            first[i] = local == 0
        for (i, n), data in zip(where, self._read(pieces)):
            raw[i, :n] = np.frombuffer(data, "<i4")
            valid[i, :n] = True
        return raw, valid, first

    def close(self) -> None:
        """Close this thread's shard files (other threads' close when the threads end)."""
        cache = self._open.__dict__.get("files", {})
        while cache:
            cache.popitem()[1].close()
