"""SentencePiece tokenizer: trained on the training split (saved as RUN_DIR/tokenizer.model) or loaded.

Reserved ids of a trained tokenizer: pad=0, bos=1, eos=2, unk=3; then the 256 byte-fallback pieces
<0x00>..<0xFF>, then learned pieces. Settings are chosen for source code and exact round trips:
BPE (fast to train), byte_fallback (any text encodes, never unk), identity normalization,
remove_extra_whitespaces=False and add_dummy_prefix=False (indentation and leading spaces survive
decoding), allow_whitespace_only_pieces + split_by_whitespace=False (pieces such as '▁▁▁▁' and
'▁▁▁▁def'), digits not split. Newlines are not in the trainer's sentences (it is fed lines), so a
newline encodes as the byte piece <0x0A>.

decode(encode(text)) == text for any text, with one exception inherent to sentencepiece: the
character U+2581 '▁' itself (its space symbol) decodes as a space.
"""
from __future__ import annotations

import io
import os
import sys
import time

import numpy as np
import sentencepiece as spm
from etils import epath

from data.corpus import split_documents, stable_fraction
from data.errors import DataError
from data.shards import is_prepared
from store.paths import run_path, write_atomic

PAD, BOS, EOS, UNK = 0, 1, 2, 3
MIN_VOCAB = 384  # 4 control + 256 byte pieces + the corpus's common characters and some merges
TOKENIZER_FILE = "tokenizer.model"


class Tokenizer:
    """A SentencePiece model: Tessera's one sentencepiece wrapper (interop.tokenizers adds the
    special tokens and chat template of a Hugging Face directory on top of it).

    Attributes: sp (SentencePieceProcessor), path, vocab_size, bos_id, eos_id (-1 when the model
    defines none), pad_id (pad falls back to 0 for foreign models without one: padded positions
    are masked out anyway), add_bos (whether a prompt starts with BOS: whenever there is one, as
    Tessera trains every document as bos + text + eos).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        try:
            # Read through epath: the file may be on gs:// (a prepared directory, a run directory).
            self.sp = spm.SentencePieceProcessor(model_proto=epath.Path(self.path).read_bytes())
        except (OSError, RuntimeError):
            raise DataError(f"tokenizer file {self.path} is not a valid sentencepiece model") from None
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = max(self.sp.pad_id(), 0)
        self.add_bos = self.bos_id >= 0

    def __reduce__(self):  # pickled by path for data.prepare's worker processes
        return type(self), (self.path,)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`, no special tokens added (a leading BOS when add_bos)."""
        ids = self.sp.encode(text)
        return [self.bos_id] + ids if add_bos and self.bos_id >= 0 else ids

    def encode_batch(self, texts: list[str], num_threads: int = 2) -> list[list[int]]:
        """Token ids of many texts, encoded by sentencepiece's C++ threads (the GIL is released)."""
        return self.sp.encode(list(texts), num_threads=num_threads)

    def decode(self, ids) -> str:
        """Text of token ids; control ids (pad/bos/eos) decode to nothing."""
        return self.sp.decode([int(i) for i in ids])

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each id stands for, int32 [V]: byte-fallback pieces (<0x0A>) 1, '▁' one
        space byte, control, unknown and unused pieces (pad, bos, eos, unk) 0."""
        sp, out = self.sp, np.zeros(self.vocab_size, np.int32)
        for i in range(len(out)):
            if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
                continue
            out[i] = 1 if sp.is_byte(i) else len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        return out


def _sample_lines(docs: list[str], max_bytes: int):
    """Lines of the documents, in a stable pseudo-random document order, up to `max_bytes` of text.

    The order is by content hash so a byte budget below the corpus size still samples every part of
    it, and the sample (hence the tokenizer) is identical on every machine.
    """
    order = sorted(range(len(docs)), key=lambda i: stable_fraction(f"{i}:{docs[i][:256]}"))
    used = 0
    for i in order:
        for line in docs[i].split("\n"):
            used += len(line.encode("utf-8")) + 1
            if used > max_bytes:
                return
            if line:
                yield line


def train_tokenizer(docs: list[str], vocab_size: int, path: str | os.PathLike, sample_bytes: int,
                    num_threads: int = 2) -> Tokenizer:
    """Train a BPE byte-fallback tokenizer of `vocab_size` on `docs` and write it atomically to `path`."""
    if vocab_size < MIN_VOCAB:
        raise DataError(f"model.vocab_size ({vocab_size}) is too small for a byte-fallback tokenizer "
                        f"(needs at least {MIN_VOCAB})")
    print(f"[data] training a {vocab_size}-piece tokenizer on up to {sample_bytes / 1e6:.0f} MB of text",
          file=sys.stderr, flush=True)
    t0 = time.time()
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sample_lines(docs, sample_bytes), model_writer=model,
            model_type="bpe", vocab_size=vocab_size, byte_fallback=True,
            pad_id=PAD, bos_id=BOS, eos_id=EOS, unk_id=UNK,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_by_whitespace=False,
            split_digits=False, character_coverage=0.9995, max_sentence_length=16384,
            hard_vocab_limit=False, num_threads=num_threads, minloglevel=2)
    except RuntimeError as e:
        raise DataError(f"tokenizer training failed: {str(e).strip().splitlines()[-1]}") from None
    path = run_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, model.getvalue())  # a crash never leaves a half-written tokenizer
    print(f"[data] tokenizer trained in {time.time() - t0:.1f}s -> {path}", file=sys.stderr, flush=True)
    return Tokenizer(path)


def load_tokenizer(cfg, run_dir: str | os.PathLike) -> Tokenizer:
    """The run's tokenizer: data.tokenizer if set, else that of a prepared data.path, else
    RUN_DIR/tokenizer.model, trained on the training split if missing.

    A trained tokenizer has model.vocab_size pieces with pad=0, bos=1, eos=2, unk=3 and byte fallback;
    either way its vocabulary must fit model.vocab_size (the embedding table) and it must define bos
    and eos (documents are stored as bos + tokens + eos).
    """
    want = cfg.model.vocab_size
    if cfg.data.tokenizer:
        if not epath.Path(cfg.data.tokenizer).is_file():
            raise DataError(f"tokenizer file not found: {cfg.data.tokenizer} (data.tokenizer)")
        tok = Tokenizer(cfg.data.tokenizer)
    elif is_prepared(cfg.data.path):  # a directory made by data.prepare carries its tokenizer
        path = epath.Path(cfg.data.path) / TOKENIZER_FILE
        if not path.exists():
            raise DataError(f"{cfg.data.path} has no {TOKENIZER_FILE}: set data.tokenizer to the tokenizer "
                            f"it was prepared with")
        tok = Tokenizer(path)
    else:
        path = run_path(run_dir) / TOKENIZER_FILE
        if path.is_file():
            tok = Tokenizer(path)
        else:
            docs = split_documents(cfg, "train")
            tok = train_tokenizer(docs, want, path, cfg.data.tokenizer_sample_bytes)
    if tok.bos_id < 0 or tok.eos_id < 0:
        raise DataError(f"tokenizer file {tok.path} defines no bos/eos pieces")
    if tok.vocab_size > want:
        raise DataError(f"tokenizer {tok.path} has {tok.vocab_size} pieces but model.vocab_size is {want}")
    return tok
