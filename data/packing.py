"""Packed rows of T tokens, cut from a shard's stream of documents (see data/shards.py).

A shard is every document as bos + tokens + eos, concatenated, with each document's first token
marked. Row r is stream[r*T : (r+1)*T]: rows are index math over the stream, so prepared data does
not depend on T, and there is no padding except at the end of a shard's last row.

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
next), so every token of the stream except the first is a target exactly once (`num_rows(n,
T, T-1)` rows); targets that cross a document boundary (a bos) stay masked, so what is scored is
every document's tokens and its eos, each once, at the cost of T/(T-1) of one pass.
"""
from __future__ import annotations

import numpy as np


def _stride(seq_len: int, stride: int | None) -> int:
    stride = seq_len if stride is None else stride
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    return stride


def num_rows(n_tokens: int, seq_len: int, stride: int | None = None) -> int:
    """Rows of T tokens, starting every `stride` (default T) tokens, that cover a stream of
    n_tokens (the last one possibly padded)."""
    stride = _stride(seq_len, stride)
    return 0 if n_tokens == 0 else 1 + max(0, -(-(n_tokens - seq_len) // stride))


def rows_from_windows(ids: np.ndarray, doc_start: np.ndarray, valid: np.ndarray, first: np.ndarray,
                      pad_id: int = 0, stride: int | None = None) -> dict[str, np.ndarray]:
    """Training rows from stream windows: ids, doc_start (a document's first token), valid
    (inside the stream) all [b, T]; first [b]: no earlier row overlaps this one.

    With stride S < T a target that row r-1 already scored (the first T-1-S) is masked unless
    the row is `first`, so no target is counted twice.
    """
    b, T = ids.shape
    stride = _stride(T, stride)
    t = np.arange(T)
    chunk_start = valid & (doc_start | (t == 0))                          # [b, T]
    segment_ids = np.where(valid, np.cumsum(chunk_start, axis=1), 0).astype(np.int32)
    last_start = np.maximum.accumulate(np.where(chunk_start, t, 0), axis=1)
    positions = np.where(valid, t - last_start, 0).astype(np.int32)
    inputs = np.where(valid, ids, pad_id).astype(np.int32)
    same = valid[:, 1:] & (segment_ids[:, 1:] == segment_ids[:, :-1])     # [b, T-1]
    targets = np.full_like(inputs, pad_id)
    targets[:, :-1] = np.where(same, inputs[:, 1:], pad_id)
    if stride < T:
        same &= first[:, None] | (t[1:] > T - 1 - stride)
    loss_mask = np.zeros((b, T), np.float32)
    loss_mask[:, :-1] = same
    return {"inputs": inputs, "targets": targets, "segment_ids": segment_ids,
            "positions": positions, "loss_mask": loss_mask}
