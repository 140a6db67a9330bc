"""Deterministic, random-access batches of packed rows from prepared token shards, streamed by grain.

`Loader.batch(step)` is a pure function of (step, data.shuffle_seed, process_index): training rows
come from a grain MapDataset, `range(num_rows).shuffle(seed).repeat()`, whose shuffle is a random-
access index permutation re-seeded each epoch (grain uses seed + epoch, so every epoch has a
different order) and costs no memory per row. Global batch `step` is items [step*B, (step+1)*B) of
that sequence, and process pi of pc takes rows [pi*B/pc, (pi+1)*B/pc) of it, so the processes'
slices union to the global batch and each host reads only its rows. The validation loader reads
rows in order without shuffling; rows past the end are all padding (loss_mask 0), so
`batch(0..num_batches-1)` covers every validation row exactly once. A loader made with
`stride=seq_len-1` (`full_pass_loader`) reads overlapping rows whose targets are every token of the
split once (see data/packing.py): the whole-split evaluation that is compared with xz.

`Loader.stream(step)` computes batch(step), batch(step+1), ... ahead through grain: threads, or
worker processes (data.workers). The stream's position is the training step, which checkpoints
already hold, so a resumed run (one process or several) reads exactly the batches it would have.

The rows come from a prepared directory (data/prepare.py): data.path itself when it is one, else
<data.cache_dir or RUN_DIR/data_cache>/<key>/, prepared on first use and keyed by the tokenizer
file's hash, the data paths and split settings, and the files' sizes and mtimes.
"""
from __future__ import annotations

import os
import sys
import time

import grain
import numpy as np
from etils import epath

from data.corpus import fingerprint
from data.errors import DataError
from data.packing import rows_from_windows
from data.shards import ShardSet, is_prepared, read_manifest, tokenizer_hash, unpack
from data.tokenizer import Tokenizer


class Loader:
    """Batches of packed rows for one process: `batch(step)` -> dict of [b, T] numpy arrays.

    Also iterable (`next(loader)` yields batch(step) and advances step); `get_state()` /
    `set_state()` carry that step through checkpoints, so a resumed run sees the same batches.
    """

    def __init__(self, shards: ShardSet, global_batch: int, shuffle: bool, seed: int, pad_id: int = 0,
                 process_index: int = 0, process_count: int = 1):
        if global_batch % process_count:
            raise DataError(f"train.batch_size ({global_batch}) is not divisible by the process count "
                            f"({process_count})")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} out of range for {process_count} processes")
        if shuffle and shards.stride != shards.seq_len:
            raise ValueError("overlapping rows (stride < seq_len) are for in-order evaluation only")
        self.shards, self.seq_len, self.stride = shards, shards.seq_len, shards.stride
        self.global_batch, self.shuffle, self.pad_id = global_batch, shuffle, pad_id
        self.local_batch = global_batch // process_count
        self.first = process_index * self.local_batch
        self.num_rows, self.num_tokens = shards.num_rows, shards.num_tokens
        self.step = 0
        ds = grain.MapDataset.range(self.num_rows)
        self._order = ds.shuffle(seed=seed).repeat() if shuffle and self.num_rows else ds

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
        raw, valid, first = self.shards.windows(self.row_indices(step))
        ids, doc_start = unpack(raw)
        return rows_from_windows(ids, doc_start, valid, first, self.pad_id, self.stride)

    def stream(self, start: int, workers: int = 0, prefetch: int = 2):
        """An iterator over batch(start), batch(start+1), ... computed `prefetch` ahead by grain, in
        `workers` processes (0: threads of this one). Same batches as `batch`, in order."""
        ds = grain.MapDataset.range(start, start + (1 << 40)).map(self.batch)
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(prefetch, 1), prefetch_buffer_size=prefetch))
        if workers:
            from absl import flags
            if not flags.FLAGS.is_parsed():  # grain's worker pool reads absl flags; we take no absl flags
                flags.FLAGS.mark_as_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=prefetch))
        return iter(it)

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
    """In-order overlapping rows (stride T-1) over `val`'s split: every token but the first of each
    shard is a target exactly once (document-crossing targets masked), for whole-split evaluation."""
    return Loader(val.shards.with_stride(max(val.seq_len - 1, 1)), val.global_batch, shuffle=False, seed=0,
                  pad_id=val.pad_id, process_index=process_index, process_count=process_count)


def prepared_dir(cfg, tokenizer: Tokenizer, run_dir, process_index: int = 0) -> str:
    """The prepared directory of the config's data: data.path when it is one (checked against the
    tokenizer), else <data.cache_dir or RUN_DIR/data_cache>/<key>/, prepared now by process 0 if it
    is not yet complete (the other processes wait for its manifest)."""
    d = cfg.data
    if is_prepared(d.path):
        want, have = tokenizer_hash(tokenizer), read_manifest(d.path)["settings"]["tokenizer_sha256"]
        if want != have:
            raise DataError(f"data.path {d.path} was prepared with another tokenizer than {tokenizer.path} "
                            f"(sha256 {have[:12]} vs {want[:12]})")
        return d.path
    key = f"prepared-{tokenizer_hash(tokenizer)[:16]}-{fingerprint(cfg)}"
    out = epath.Path(d.cache_dir or epath.Path(run_dir) / "data_cache") / key
    if process_index == 0:
        from data.prepare import prepare  # not at import: `python -m data.prepare` imports this package first
        prepare(d.path, out, tokenizer, d.val_path, d.val_fraction, d.jsonl_field, workers=d.prepare_workers)
    else:
        wait_for_manifest(out)
    return str(out)


def wait_for_manifest(directory, poll_seconds: float = 2.0) -> None:
    """Block until another process has finished preparing `directory`."""
    said = False
    while read_manifest(directory) is None:
        if not said:
            print(f"[data] waiting for process 0 to prepare {directory}", file=sys.stderr, flush=True)
            said = True
        time.sleep(poll_seconds)


def make_loader(cfg, tokenizer: Tokenizer, run_dir: str | os.PathLike, split: str = "train",
                process_index: int = 0, process_count: int = 1, prepared: str | None = None) -> Loader:
    """A Loader over `split` ('train': shuffled, repeating; 'val': fixed order) of the config's data;
    `prepared`: its prepared directory when the caller has resolved it already (prepared_dir)."""
    prepared = prepared or prepared_dir(cfg, tokenizer, run_dir, process_index)
    shards = ShardSet(prepared, split, cfg.data.seq_len)
    if shards.num_rows == 0:
        d = cfg.data
        path, name = (d.val_path, "data.val_path") if d.val_path and split == "val" else (d.path, "data.path")
        raise DataError(f"no {split} documents with text in {path or 'the Python standard library'} ({name})")
    return Loader(shards, cfg.train.batch_size, shuffle=split == "train", seed=cfg.data.shuffle_seed,
                  pad_id=tokenizer.pad_id, process_index=process_index, process_count=process_count)
