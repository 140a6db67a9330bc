"""Run-directory paths: local folders or gs:// buckets, through etils.epath.

`pathlib.Path("gs://b/run")` is the local folder `gs:/b/run`. Everything that names a run
directory, or a file a run reads or writes, goes through `run_path`, which gives an epath.Path
for both kinds (gs:// through gcsfs; orbax and tensorstore take the same strings).

GCS objects appear whole when their upload completes and cannot be appended to. So files are
written whole (`open_atomic`: a temporary name renamed into place on a local disk, the object
itself on GCS), and logs that grow (`JsonLines`) are appended locally and rewritten whole on GCS.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from etils import epath

REMOTE = ("gs://",)


def is_remote(path) -> bool:
    """Whether `path` is an object-store URI (gs://) rather than a local path."""
    return str(path).startswith(REMOTE)


def as_path(text):
    """A path object for a user-given path: pathlib.Path for a local one (kept as given, relative
    or not), epath.Path for gs://. Both have the pathlib methods the callers use."""
    text = os.fspath(text)
    return epath.Path(text) if is_remote(text) else Path(text)


def run_path(path) -> epath.Path:
    """An epath.Path for a local path (made absolute: orbax wants that) or a gs:// URI."""
    text = os.fspath(path)
    return epath.Path(text if is_remote(text) else os.path.abspath(text))


@contextlib.contextmanager
def open_atomic(path, mode: str = "wb"):
    """A file handle whose content appears at `path` only when the block completes."""
    path = run_path(path)
    if is_remote(path):  # an object appears when its upload is finalised, on close
        with path.open(mode) as f:
            yield f
        return
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with tmp.open(mode) as f:
            yield f
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_atomic(path, data: bytes) -> None:
    """Write a whole file so that readers never see part of it."""
    with open_atomic(path) as f:
        f.write(data)


class JsonLines:
    """An append-only JSON-lines log (metrics.jsonl): appended and flushed line by line on a local
    disk; on GCS kept in memory and rewritten whole at most every `every` seconds, on `flush()`
    (the trainer calls it at each checkpoint) and on close."""

    def __init__(self, path, every: float = 30.0):
        self.path, self.every = run_path(path), every
        self.remote = is_remote(self.path)
        if self.remote:
            self.text = self.path.read_text() if self.path.exists() else ""
            self.dirty, self.last = False, 0.0
        else:
            self.file = open(self.path, "a")

    def write(self, row: dict) -> None:
        line = json.dumps(row) + "\n"
        if not self.remote:
            self.file.write(line)
            self.file.flush()
            return
        self.text += line
        self.dirty = True
        if time.monotonic() - self.last >= self.every:
            self.flush()

    def flush(self) -> None:
        if self.remote and self.dirty:
            self.path.write_text(self.text)
            self.dirty, self.last = False, time.monotonic()

    def close(self) -> None:
        if self.remote:
            self.flush()
        else:
            self.file.close()
