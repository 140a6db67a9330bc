"""Data: the embedded stdlib corpus or user data, prepared once into token shards (data.prepare),
a sentencepiece tokenizer, packed deterministic batches streamed by grain, and bits-per-byte metrics.

    tok = load_tokenizer(cfg, run_dir)
    train = make_loader(cfg, tok, run_dir, "train", process_index, process_count)
    batch = train.batch(step)   # inputs/targets/segment_ids/positions [b, T] int32, loss_mask float32
"""
from data.corpus import split_documents, stdlib_files, validation_texts
from data.errors import DataError
from data.loader import Loader, full_pass_loader, make_loader, prepared_dir
from data.metrics import bits_per_byte, token_bytes, utf8_bytes, xz_bits_per_byte
from data.packing import num_rows, rows_from_windows
from data.shards import ShardSet, pack_documents, unpack, write_streams
from data.tokenizer import BOS, EOS, PAD, UNK, Tokenizer, load_tokenizer, train_tokenizer

__all__ = ["BOS", "DataError", "EOS", "Loader", "PAD", "ShardSet", "Tokenizer", "UNK", "bits_per_byte",
           "full_pass_loader", "load_tokenizer", "make_loader", "num_rows", "pack_documents", "prepared_dir",
           "rows_from_windows", "split_documents", "stdlib_files", "token_bytes",
           "train_tokenizer", "unpack", "utf8_bytes", "write_streams", "validation_texts", "xz_bits_per_byte"]
