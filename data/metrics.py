"""Bits per byte: the tokenizer-independent measure of a language model, and the xz baseline."""
from __future__ import annotations

import lzma
import math

import numpy as np


def token_bytes(tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for, int32 [V].

    Byte-fallback pieces (<0x0A>) count 1, '▁' counts as one space byte, control and unknown
    tokens (pad, bos, eos, unk) count 0.
    """
    if hasattr(tokenizer, "token_bytes"):  # Hugging Face tokenizers know their own byte lengths
        return np.asarray(tokenizer.token_bytes(), np.int32)
    sp = tokenizer.sp
    out = np.zeros(sp.get_piece_size(), dtype=np.int32)
    for i in range(len(out)):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        if sp.is_byte(i):
            out[i] = 1
        else:
            out[i] = len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    return out


def bits_per_byte(nll_nats_sum: float, n_bytes: float) -> float:
    """Summed negative log-likelihood (nats) over the bytes it covers, in bits per byte."""
    if n_bytes <= 0:
        return float("nan")
    return float(nll_nats_sum) / (math.log(2) * float(n_bytes))


def utf8_bytes(texts: list[str]) -> int:
    """UTF-8 length of the texts concatenated: the bytes xz_bits_per_byte compresses, and the
    denominator of a model's bits per byte on the same texts."""
    return sum(len(t.encode("utf-8")) for t in texts)


def xz_bits_per_byte(texts: list[str]) -> float:
    """Bits per byte of xz (lzma preset 9 | EXTREME) on the texts concatenated as one stream,
    over utf8_bytes(texts) bytes.

    Concatenated is the fair comparison with a language model, which also learns across documents.
    """
    raw = "".join(texts).encode("utf-8")
    if not raw:
        return float("nan")
    packed = lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)
    return 8 * len(packed) / len(raw)
