"""Bits per byte: the tokenizer-independent measure of a language model, and the xz baseline."""
from __future__ import annotations

import lzma
import math

import numpy as np


def token_bytes(tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for, int32 [V] (every tokenizer defines its own
    `token_bytes`: control and unknown ids count 0, byte pieces 1)."""
    return np.asarray(tokenizer.token_bytes(), np.int32)


def bits_per_byte(nll_nats_sum: float, n_bytes: float) -> float:
    """Summed negative log-likelihood (nats) over the bytes it covers, in bits per byte."""
    if n_bytes <= 0:
        return float("nan")
    return float(nll_nats_sum) / (math.log(2) * float(n_bytes))


def utf8_bytes(texts: list[str]) -> int:
    """UTF-8 length of the texts concatenated: the bytes xz_bits_per_byte compresses, and the
    denominator of a model's bits per byte on the same texts."""
    return sum(len(t.encode("utf-8")) for t in texts)


def xz_bits_per_byte(texts) -> float:
    """Bits per byte of xz (lzma preset 9 | EXTREME) on the texts concatenated as one stream,
    over utf8_bytes(texts) bytes. `texts` may be any iterable: it is compressed as it streams.

    Concatenated is the fair comparison with a language model, which also learns across documents.
    """
    xz, n_in, n_out = lzma.LZMACompressor(preset=9 | lzma.PRESET_EXTREME), 0, 0
    for text in texts:
        raw = text.encode("utf-8")
        n_in += len(raw)
        n_out += len(xz.compress(raw))
    n_out += len(xz.flush())
    return 8 * n_out / n_in if n_in else float("nan")
