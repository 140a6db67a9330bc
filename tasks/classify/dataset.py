"""Classification data: CSV reading with one-line errors, label maps, stratified splits,
tokenization with padding and truncation, and a tokenizer trained on the texts.

Errors are `DatasetError` (a ConfigError, so entry scripts print one line and exit 2) and name
the file and the line or column at fault.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from configs import ConfigError


class DatasetError(ConfigError):
    """Bad classification input; the message is one line naming the file and row or column."""


@dataclass
class Examples:
    """Rows of one CSV: texts, label strings (None when the file has no label column), ids, lines."""
    texts: list[str]
    labels: list[str] | None
    ids: list[str]
    lines: list[int]
    source: str

    def subset(self, idx) -> "Examples":
        pick = lambda xs: [xs[i] for i in idx]
        return Examples(pick(self.texts), pick(self.labels) if self.labels is not None else None,
                        pick(self.ids), pick(self.lines), self.source)

    def __len__(self) -> int:
        return len(self.texts)


def _decode(path: Path) -> str:
    """The file's text; non-UTF-8 bytes are an error naming the line they are on."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")  # tolerate the BOM spreadsheet programs write
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DatasetError(f"{path} line {line}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                           "re-save the file as UTF-8") from None


def _column(header: list[str], name: str, path: Path, role: str) -> int:
    """Index of a column given by name, or by 0-based position when `name` is an integer."""
    if name in header:
        return header.index(name)
    if name.lstrip("-").isdigit() and -len(header) <= int(name) < len(header):
        return int(name) % len(header)
    raise DatasetError(f"{path} has no {role} column '{name}' (columns: {', '.join(header)}); "
                       f"set data.{role}_column")


def read_csv(path: str | Path, text_column: str = "text", label_column: str = "label",
             require_labels: bool = True) -> Examples:
    """Read a CSV with a header row. An `id` column, when present, names rows in predictions."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"data file not found: {path}")
    text = _decode(path)
    if not text.strip():
        raise DatasetError(f"{path} is empty: expected a header row with columns "
                           f"'{text_column}' and '{label_column}'")
    csv.field_size_limit(1 << 30)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in next(reader)]
        t_col = _column(header, text_column, path, "text")
        has_labels = label_column in header or label_column.lstrip("-").isdigit()
        l_col = _column(header, label_column, path, "label") if (has_labels or require_labels) else None
        id_col = header.index("id") if "id" in header else None
        texts, labels, ids, lines = [], [], [], []
        line = reader.line_num + 1
        for row in reader:
            if not any(cell.strip() for cell in row):
                line = reader.line_num + 1
                continue  # blank lines are not rows
            if len(row) != len(header):
                raise DatasetError(f"{path} line {line}: {len(row)} fields, but the header has {len(header)}")
            if not row[t_col].strip():
                raise DatasetError(f"{path} line {line}: empty text in column '{header[t_col]}'")
            texts.append(row[t_col])
            if l_col is not None:
                label = row[l_col].strip()
                if not label:
                    raise DatasetError(f"{path} line {line}: empty label in column '{header[l_col]}'")
                labels.append(label)
            ids.append(row[id_col] if id_col is not None else str(len(ids) + 1))
            lines.append(line)
            line = reader.line_num + 1
    except csv.Error as e:
        raise DatasetError(f"{path} line {reader.line_num}: malformed CSV ({e})") from None
    if not texts:
        raise DatasetError(f"{path} has a header but no data rows")
    return Examples(texts, labels if l_col is not None else None, ids, lines, str(path))


def sort_labels(names) -> list[str]:
    """Class order: numeric when every label is an integer ('2' < '10'), else lexicographic."""
    names = set(names)
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


class LabelMap:
    """Label string <-> class index, fixed by the training data and saved with the checkpoint."""

    def __init__(self, names: list[str]):
        self.names = list(names)
        self.index = {n: i for i, n in enumerate(self.names)}

    @classmethod
    def from_labels(cls, labels: list[str]) -> "LabelMap":
        return cls(sort_labels(labels))

    def encode(self, ex: Examples) -> np.ndarray:
        """Class indices [N]; a label the training data never had is an error naming its line."""
        out = np.empty(len(ex), np.int32)
        for i, label in enumerate(ex.labels):
            if label not in self.index:
                known = ", ".join(self.names[:10]) + (" ..." if len(self.names) > 10 else "")
                raise DatasetError(f"{ex.source} line {ex.lines[i]}: label '{label}' does not occur in the "
                                   f"training data (classes: {known})")
            out[i] = self.index[label]
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"classes": self.names}, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "LabelMap":
        path = Path(path)
        if not path.is_file():
            raise DatasetError(f"{path.parent} is not a classification checkpoint: {path.name} not found")
        return cls(json.loads(path.read_text())["classes"])


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) index arrays with each class split in the same proportion. Every class with
    at least two examples keeps one in each split; a singleton class stays in training."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.nonzero(labels == c)[0])
        n_val = 0 if idx.size < 2 else min(max(int(round(idx.size * val_fraction)), 1), idx.size - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """'Balanced' weights n / (C * count_c), as scikit-learn's; absent classes get weight 1."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    w = np.where(counts > 0, labels.size / (num_classes * np.maximum(counts, 1)), 1.0)
    return w.astype(np.float32)


def encode_texts(texts: list[str], tokenizer, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """tokens [N,max_len] int32 (BOS + text + EOS, truncated, right-padded) and lengths [N];
    BOS only when the tokenizer's config adds one (tokenizer.add_bos, as transformers does).

    Truncation keeps the start of the text and still ends with EOS, so last-token pooling always
    reads the same summary position. Padding positions hold the tokenizer's pad id (0 if none);
    the model never sees them because their segment id is 0.
    """
    bos = [tokenizer.bos_id] if tokenizer.add_bos else []
    eos = [tokenizer.eos_id] if tokenizer.eos_id >= 0 else []
    room = max_len - len(bos) - len(eos)
    if room < 1:
        raise DatasetError(f"task.max_len ({max_len}) leaves no room for text after BOS/EOS")
    pad = tokenizer.pad_id if tokenizer.pad_id >= 0 else 0
    tokens = np.full((len(texts), max_len), pad, np.int32)
    lengths = np.empty(len(texts), np.int32)
    for i, text in enumerate(texts):
        ids = bos + tokenizer.encode(text)[:room] + eos
        tokens[i, :len(ids)] = ids
        lengths[i] = len(ids)
    return tokens, lengths


def train_tokenizer(texts: list[str], vocab_size: int, path: str | Path, sample_bytes: int = 20_000_000):
    """The project's BPE byte-fallback sentencepiece trainer (data.train_tokenizer: pad 0, bos 1,
    eos 2, unk 3, as the LM tokenizer) run on the training texts; the vocabulary shrinks to what
    the data supports."""
    import data
    return data.train_tokenizer(list(texts), vocab_size, path, sample_bytes)
