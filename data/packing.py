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


def num_rows(tokens: np.ndarray, seq_len: int) -> int:
    """Rows of T tokens the stream fills (the last one possibly padded)."""
    return -(-len(tokens) // seq_len)


def make_rows(tokens: np.ndarray, offsets: np.ndarray, rows: np.ndarray, seq_len: int,
              pad_id: int = 0) -> dict[str, np.ndarray]:
    """The batch of packed rows `rows` ([b] int; -1 gives an all-padding row); arrays are [b, T]."""
    rows = np.asarray(rows, dtype=np.int64)
    n = len(tokens)
    pos = rows[:, None] * seq_len + np.arange(seq_len)            # [b, T] stream positions
    valid = (rows[:, None] >= 0) & (pos < n)
    safe = np.where(valid, pos, 0)
    inputs = np.where(valid, tokens[safe] if n else 0, pad_id).astype(np.int32)
    doc = np.searchsorted(offsets, safe, side="right") - 1         # [b, T] document index
    chunk_start = np.maximum(offsets[doc], rows[:, None] * seq_len)
    positions = np.where(valid, safe - chunk_start, 0).astype(np.int32)
    segment_ids = np.where(valid, doc - doc[:, :1] + 1, 0).astype(np.int32)
    same = valid[:, 1:] & (segment_ids[:, 1:] == segment_ids[:, :-1])  # [b, T-1]
    targets = np.full_like(inputs, pad_id)
    targets[:, :-1] = np.where(same, inputs[:, 1:], pad_id)
    loss_mask = np.zeros(inputs.shape, dtype=np.float32)
    loss_mask[:, :-1] = same
    return {"inputs": inputs, "targets": targets, "segment_ids": segment_ids,
            "positions": positions, "loss_mask": loss_mask}
