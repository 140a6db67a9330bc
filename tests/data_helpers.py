"""Prepared directories written by hand: exact streams for packing and loader tests."""
import numpy as np

from data.shards import pack_documents, write_streams


def write_prepared(directory, splits: dict[str, list[list[list[int]]]], bos_id: int = 1, eos_id: int = 2) -> str:
    """A prepared directory with one shard per list of documents (token-id lists) in each split."""
    return write_streams(directory, {split: [pack_documents(docs, bos_id, eos_id) for docs in shards]
                                     for split, shards in splits.items()})


def stream_of(docs, bos_id: int = 1, eos_id: int = 2) -> np.ndarray:
    """The plain token stream (no marks) of documents: bos + ids + eos each."""
    return np.concatenate([np.array([bos_id] + list(d) + [eos_id], np.int32) for d in docs])
