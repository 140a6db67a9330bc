"""Documents of the training and validation splits: the stdlib corpus or user text/JSONL data.

The default corpus (data.path == "") is every `*.py` file of the running interpreter's standard
library, sorted by relative path. Excluded, because they are not ordinary Python source or not ours:
  - `site-packages` / `dist-packages` (installed third-party code), `__pycache__`, and any directory
    holding a `pyvenv.cfg` (a virtual environment);
  - test fixture directories: a directory whose name ends in `data`, `data<digits>` inside a `test`
    or `tests` tree (e.g. test/tokenizedata, lib2to3/tests/data: deliberately broken, Python 2 or
    odd-encoding files), and test/encoded_modules;
  - files that are not valid UTF-8.

Split: a document goes to validation when a stable hash (sha256, never Python's salted `hash`) of its
key falls below data.val_fraction. The key is the relative path ('/' separators) for files of the
stdlib or of a directory, and the record index for lines of a text file or records of a JSONL
file, so the split is the same on every machine and run. When data.val_path is set, the training
split is all of data.path and the validation split is all of data.val_path.

A single text file is split per line; each maximal run of consecutive lines that fall in the same
split is one document (newlines kept), so training text stays contiguous.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sysconfig
from pathlib import Path

from data.errors import DataError

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "encoded_modules"}
_FIXTURE_DIR = re.compile(r".*data\d*$")


def stable_fraction(key: str) -> float:
    """A value in [0, 1) from sha256 of `key`: identical on every machine, run and Python version."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_val(key: str, val_fraction: float) -> bool:
    """Whether the document with this key belongs to the validation split."""
    return stable_fraction(key) < val_fraction


def stdlib_root() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def _excluded_dir(rel_parts: tuple[str, ...], full: Path) -> bool:
    name = rel_parts[-1]
    if name in _SKIP_DIRS or (full / "pyvenv.cfg").exists():
        return True
    in_tests = any(p in ("test", "tests") for p in rel_parts[:-1])
    return in_tests and bool(_FIXTURE_DIR.match(name))


def stdlib_files(root: Path | None = None) -> list[str]:
    """Relative paths ('/'-separated, sorted) of the stdlib `*.py` files in the corpus (see module doc)."""
    root = root or stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        rel = base.relative_to(root).parts
        # Prune in place so os.walk never descends into excluded trees.
        dirnames[:] = [d for d in dirnames if not _excluded_dir(rel + (d,), base / d)]
        out += ["/".join(rel + (f,)) for f in filenames if f.endswith(".py")]
    return sorted(out)


def _read_text(path: Path) -> str | None:
    """File text, or None when it is binary or not UTF-8 (skipped, not an error)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read data file {path}: {e.strerror}") from None
    if b"\0" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _dir_files(root: Path, suffix: str = "") -> list[str]:
    """Sorted relative paths of non-hidden files under `root` (optionally with a suffix)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in _SKIP_DIRS]
        rel = Path(dirpath).relative_to(root).parts
        out += ["/".join(rel + (f,)) for f in filenames if not f.startswith(".") and f.endswith(suffix)]
    return sorted(out)


def _jsonl_records(path: Path, field: str) -> list[str]:
    """The `field` string of every non-blank line of a JSONL file."""
    texts = []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            lines = f.read().split("\n")
        except UnicodeDecodeError:
            raise DataError(f"data file {path} is not UTF-8 text") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path} line {i} is not valid JSON") from None
        if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
            raise DataError(f"{path} line {i} has no string field '{field}' (data.jsonl_field)")
        texts.append(rec[field])
    return texts


def _line_runs(text: str, val_fraction: float, split: str | None) -> list[str]:
    """Split a text file per line; consecutive lines in the same split join into one document."""
    docs, run = [], []
    for i, line in enumerate(text.splitlines(keepends=True)):
        keep = split is None or is_val(str(i), val_fraction) == (split == "val")
        if keep:
            run.append(line)
        elif run:
            docs.append("".join(run))
            run = []
    if run:
        docs.append("".join(run))
    return docs


def read_documents(path: str, split: str | None, val_fraction: float, jsonl_field: str,
                   field: str = "data.path") -> list[str]:
    """Documents of `split` ('train', 'val', or None for all) from a stdlib ("" path), file, dir or JSONL."""
    def keep(key: str) -> bool:
        return split is None or is_val(key, val_fraction) == (split == "val")

    if path == "":
        root = stdlib_root()
        texts = [_read_text(root / rel) for rel in stdlib_files(root) if keep(rel)]
        return [t for t in texts if t]
    p = Path(path)
    if not p.exists():
        raise DataError(f"data path not found: {path} ({field})")
    if p.is_dir():
        texts = [_read_text(p / rel) for rel in _dir_files(p) if keep(rel)]
        return [t for t in texts if t]
    if p.suffix == ".jsonl":
        return [t for i, t in enumerate(_jsonl_records(p, jsonl_field)) if keep(str(i)) and t]
    text = _read_text(p)
    if text is None:
        raise DataError(f"data file {path} is not UTF-8 text")
    return [d for d in _line_runs(text, val_fraction, split) if d]


def split_documents(cfg, split: str) -> list[str]:
    """The non-empty documents of `split` ('train' or 'val') for a config; DataError when there are none."""
    d = cfg.data
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if d.val_path:
        # A separate validation set: the training split is all of data.path.
        path, name = (d.path, "data.path") if split == "train" else (d.val_path, "data.val_path")
        docs = read_documents(path, None, d.val_fraction, d.jsonl_field, name)
    else:
        path, name = d.path, "data.path"
        docs = read_documents(path, split, d.val_fraction, d.jsonl_field, name)
    if not docs:
        where = path or "the Python standard library"
        raise DataError(f"no {split} documents with text in {where} ({name})")
    return docs


def validation_texts(cfg) -> list[str]:
    """Texts of the validation documents (for the xz baseline and for evaluation)."""
    return split_documents(cfg, "val")


def fingerprint(cfg, split: str) -> str:
    """A cheap hash of what `split_documents` would read (paths, sizes, mtimes) for cache keys."""
    d = cfg.data
    path = (d.path if split == "train" else d.val_path) if d.val_path else d.path
    h = hashlib.sha256(repr((path, d.val_path, d.val_fraction, d.jsonl_field, split)).encode())
    if path == "":
        root = stdlib_root()
        files = [root / rel for rel in stdlib_files(root)]
    else:
        p = Path(path)
        files = [p / rel for rel in _dir_files(p)] if p.is_dir() else [p]
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]
