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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from data.errors import DataError
from store.paths import is_remote

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


@dataclass(frozen=True)
class Unit:
    """A piece of a corpus that is read (and prepared) as one: a group of whole files, one
    document each (`files`), a text file split per line (`lines`), or a file of records, one
    document each (`jsonl`, `parquet`)."""
    kind: str
    root: str                      # the directory of a `files` unit, else the file itself
    names: tuple[str, ...] = ()    # '/'-separated paths under root (`files` units)
    split: str | None = None       # every document in this split (data.val_path set), else by key
    size: int = 0                  # input bytes, for progress reports
    key_prefix: str = ""           # records' split keys are prefix + index ("rel/path:" in a directory)


UNIT_BYTES = (1 << 20, 256 << 20)  # a files unit holds about 1/64 of the corpus, within these bounds
RECORD_SUFFIXES = (".jsonl", ".parquet")


def corpus_units(path: str, field: str = "data.path", split: str | None = None) -> list[Unit]:
    """The units of a stdlib (""), directory, text, JSONL or Parquet corpus, in corpus order.

    In a directory, each .jsonl and .parquet file is a unit of records (the usual layout of a large
    corpus: many record files); the other files are documents, grouped into units of about 1/64 of
    the corpus (1 MB to 256 MB). The units depend on the corpus only, so prepared shards are the
    same whatever the worker count.
    """
    if path == "":
        root, names = stdlib_root(), stdlib_files()
    elif is_remote(path):
        raise DataError(f"{path} ({field}) is not a prepared directory (no manifest.json): text on gs:// is "
                        f"read by `python -m data.prepare` first")
    else:
        p = Path(path)
        if not p.exists():
            raise DataError(f"data path not found: {path} ({field})")
        if not p.is_dir():
            kind = p.suffix[1:] if p.suffix in RECORD_SUFFIXES else "lines"
            return [Unit(kind, str(p), split=split, size=p.stat().st_size)]
        root, names = p, _dir_files(p)
    sizes = [(root / n).stat().st_size for n in names]
    target = min(max(sum(sizes) // 64, UNIT_BYTES[0]), UNIT_BYTES[1])
    units, group, used = [], [], 0
    for name, size in zip(names, sizes):
        suffix = "." + name.rsplit(".", 1)[-1]
        if suffix in RECORD_SUFFIXES:  # in corpus order: the files before it form their own unit
            if group:
                units.append(Unit("files", str(root), tuple(group), split, used))
                group, used = [], 0
            units.append(Unit(suffix[1:], str(root / name), split=split, size=size, key_prefix=f"{name}:"))
            continue
        group.append(name)
        used += size
        if used >= target:
            units.append(Unit("files", str(root), tuple(group), split, used))
            group, used = [], 0
    if group:
        units.append(Unit("files", str(root), tuple(group), split, used))
    return units


def unit_documents(unit: Unit, val_fraction: float, jsonl_field: str) -> Iterator[tuple[str, str]]:
    """(split, text) of every non-empty document of a unit, streamed: memory holds one document."""
    def split_of(key: str) -> str:
        return unit.split or ("val" if is_val(key, val_fraction) else "train")

    if unit.kind == "files":
        root = Path(unit.root)
        for name in unit.names:
            text = _read_text(root / name)
            if text:
                yield split_of(name), text
    elif unit.kind in ("jsonl", "parquet"):
        read = _jsonl_records if unit.kind == "jsonl" else _parquet_records
        for i, text in enumerate(read(Path(unit.root), jsonl_field)):
            if text:
                yield split_of(f"{unit.key_prefix}{i}"), text
    else:
        yield from _line_runs(Path(unit.root), split_of)


def _lines(path: Path) -> Iterator[str]:
    """Lines of a UTF-8 text file, newlines kept, streamed."""
    try:
        with open(path, encoding="utf-8", errors="strict", newline="") as f:
            for line in f:
                if "\0" in line:
                    raise DataError(f"data file {path} is not UTF-8 text")
                yield line
    except UnicodeDecodeError:
        raise DataError(f"data file {path} is not UTF-8 text") from None
    except OSError as e:
        raise DataError(f"cannot read data file {path}: {e.strerror}") from None


def _jsonl_records(path: Path, field: str) -> Iterator[str]:
    """The `field` string of every non-blank line of a JSONL file, streamed."""
    for i, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path} line {i} is not valid JSON") from None
        if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
            raise DataError(f"{path} line {i} has no string field '{field}' (data.jsonl_field)")
        yield rec[field]


def _parquet_records(path: Path, field: str) -> Iterator[str]:
    """The `field` strings of a Parquet file, read a row group at a time (nulls skipped)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow: pip install '.[parquet]'") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's errors have several types; its message names the problem
        raise DataError(f"{path} is not a readable Parquet file: {str(e).splitlines()[0][:200]}") from None
    if field not in pf.schema_arrow.names:
        raise DataError(f"{path} has no column '{field}' (data.jsonl_field); it has {', '.join(pf.schema_arrow.names)}")
    for batch in pf.iter_batches(columns=[field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str):
                yield text


def _line_runs(path: Path, split_of) -> Iterator[tuple[str, str]]:
    """A text file split per line (key: the line index); consecutive lines of the same split join
    into one document."""
    run, run_split = [], None
    for i, line in enumerate(_lines(path)):
        s = split_of(str(i))
        if s != run_split and run:
            yield run_split, "".join(run)
            run = []
        run.append(line)
        run_split = s
    if run:
        yield run_split, "".join(run)


def split_units(path: str, val_path: str = "") -> list[Unit]:
    """The units of a corpus: all of `path`, its documents split by key hash; or, when `val_path`
    is given, all of `path` for training and all of `val_path` for validation."""
    units = corpus_units(path, "data.path", "train" if val_path else None)
    return units + (corpus_units(val_path, "data.val_path", "val") if val_path else [])


def split_documents(cfg, split: str) -> list[str]:
    """The non-empty documents of `split` ('train' or 'val') for a config; DataError when there are none."""
    d = cfg.data
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    docs = [text for unit in split_units(d.path, d.val_path)
            for s, text in unit_documents(unit, d.val_fraction, d.jsonl_field) if s == split]
    if not docs:
        path, name = (d.val_path, "data.val_path") if d.val_path and split == "val" else (d.path, "data.path")
        raise DataError(f"no {split} documents with text in {path or 'the Python standard library'} ({name})")
    return docs


def validation_texts(cfg) -> list[str]:
    """Texts of the validation documents (for the xz baseline and for evaluation)."""
    return split_documents(cfg, "val")


def fingerprint(cfg) -> str:
    """A cheap hash of what the config's splits are read from (paths, settings, file sizes and
    mtimes): the key of a run's automatically prepared data."""
    d = cfg.data
    h = hashlib.sha256(repr((d.path, d.val_path, d.val_fraction, d.jsonl_field)).encode())
    for path in (d.path, d.val_path) if d.val_path else (d.path,):
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
