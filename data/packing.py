"""Pack tokenized documents into fixed-length rows of T tokens.

Storage is a flat int32 token stream (every document as bos + tokens + eos, concatenated in corpus
order) plus int64 document offsets; row r is stream[r*T : (r+1)*T]. Rows are index math over the
stream, so the cache does not depend on T and there is no padding except at the end of the last row.

Per row (all [T]):
  inputs       the tokens (pad_id after the end of the stream)
  segment_ids  1, 2, 3 ... for each document chunk in the row; 0 at padding
  positions    0 at the start of each chunk. A document cut by a row boundary continues in the next
               row as a new chunk that restarts at position 0 (with no attention to the first part).
  targets      the next token when it belongs to the same chunk, else pad_id
  loss_mask    1.0 where targets is a real next token of the same chunk; 0.0 at padding and at the
               last token of every chunk (so 1 in T targets is lost at a row boundary, the price of
               rows that stand alone).

Evaluation over a whole split uses overlapping rows instead: with `stride` S < T, row r is
stream[r*S : r*S+T] and only targets not scored by row r-1 count (loss_mask 0 on the rest). With
S = T-1 consecutive rows share one token (the last target of a row is the first input of the
next), so every token of the stream except the first is a target exactly once (`num_rows(tokens,
T, T-1)` rows); targets that cross a document boundary (a bos) stay masked, so what is scored is
every document's tokens and its eos, each once, at the cost of T/(T-1) of one pass.
"""
from __future__ import annotations

import numpy as np


def pack_stream(docs_ids, bos_id: int, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate bos + ids + eos per document: (tokens int32 [N], offsets int64 [D+1])."""
    lengths = np.array([len(ids) + 2 for ids in docs_ids], dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.empty(int(offsets[-1]), dtype=np.int32)
    for start, ids in zip(offsets[:-1], docs_ids):
        end = start + len(ids) + 2
        tokens[start] = bos_id
        tokens[start + 1:end - 1] = ids
        tokens[end - 1] = eos_id
    return tokens, offsets


def _stride(seq_len: int, stride: int | None) -> int:
    stride = seq_len if stride is None else stride
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    return stride


def num_rows(tokens: np.ndarray, seq_len: int, stride: int | None = None) -> int:
    """Rows of T tokens, starting every `stride` (default T) tokens, that cover the stream (the last
    one possibly padded)."""
    stride, n = _stride(seq_len, stride), len(tokens)
    return 0 if n == 0 else 1 + max(0, -(-(n - seq_len) // stride))


def make_rows(tokens: np.ndarray, offsets: np.ndarray, rows: np.ndarray, seq_len: int,
              pad_id: int = 0, stride: int | None = None) -> dict[str, np.ndarray]:
    """The batch of packed rows `rows` ([b] int; -1 gives an all-padding row); arrays are [b, T].

    Row r starts at stream position r*stride (default T); with stride < T a target already scored
    by row r-1 is masked (loss_mask 0), so no target is counted twice.
    """
    stride = _stride(seq_len, stride)
    rows = np.asarray(rows, dtype=np.int64)
    n = len(tokens)
    start = rows[:, None] * stride                                 # [b, 1] first stream position
    pos = start + np.arange(seq_len)                               # [b, T] stream positions
    valid = (rows[:, None] >= 0) & (pos < n)
    safe = np.where(valid, pos, 0)
    inputs = np.where(valid, tokens[safe] if n else 0, pad_id).astype(np.int32)
    doc = np.searchsorted(offsets, safe, side="right") - 1         # [b, T] document index
    chunk_start = np.maximum(offsets[doc], start)
    positions = np.where(valid, safe - chunk_start, 0).astype(np.int32)
    segment_ids = np.where(valid, doc - doc[:, :1] + 1, 0).astype(np.int32)
    same = valid[:, 1:] & (segment_ids[:, 1:] == segment_ids[:, :-1])  # [b, T-1]
    targets = np.full_like(inputs, pad_id)
    targets[:, :-1] = np.where(same, inputs[:, 1:], pad_id)
    loss_mask = np.zeros(inputs.shape, dtype=np.float32)
    if stride < seq_len:  # targets at stream positions <= start + T - 1 - stride were row r-1's
        same &= (rows[:, None] == 0) | (pos[:, 1:] > start + seq_len - 1 - stride)
    loss_mask[:, :-1] = same
    return {"inputs": inputs, "targets": targets, "segment_ids": segment_ids,
            "positions": positions, "loss_mask": loss_mask}
