"""Tests of the data package: split, tokenizer, packing, loader determinism, metrics and errors."""
import json
import math
import shutil

import numpy as np
import pytest

import data
from configs import Config, DataConfig, ModelConfig, TrainConfig, load_config
from data import corpus
from data import prepare as prepare_mod
from data.corpus import is_val, stdlib_files, stdlib_root
from data_helpers import write_prepared

VOCAB = 512
CODE = ("class A:\n    def f(self, x):\n\tif x:   # tab, 3 spaces  \n            return x**2 + 1e-3\r\n"
        "\n\n  s = 'ünïcödé € 😀 \\u2581'  \n    \n")


def make_cfg(path, **data_kw):
    train_kw = {"batch_size": data_kw.pop("batch_size", 4)}
    data_kw.setdefault("seq_len", 32)
    return Config(model=ModelConfig(vocab_size=data_kw.pop("vocab", VOCAB), max_seq_len=1024),
                  data=DataConfig(path=str(path), **data_kw), train=TrainConfig(**train_kw))


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """A small directory of real Python files (copied from the stdlib json and email packages)."""
    root = tmp_path_factory.mktemp("corpus")
    for pkg in ("json", "email"):
        for rel in sorted(p for p in stdlib_files() if p.startswith(pkg + "/") and "/test" not in p)[:12]:
            dst = root / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(stdlib_root() / rel, dst)
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("run")


@pytest.fixture(scope="module")
def tok(corpus_dir, run_dir):
    return data.load_tokenizer(make_cfg(corpus_dir, val_fraction=0.25), run_dir)


# ---- corpus and split ----

def test_stdlib_split_is_stable_and_about_five_percent():
    files = stdlib_files()
    assert files == sorted(files) and len(files) > 500
    assert not any("site-packages" in f or f.startswith("test/tokenizedata/") or "__pycache__" in f
                   or f.startswith("lib2to3/tests/data/") for f in files)
    val = [f for f in files if is_val(f, 0.05)]
    assert val == [f for f in stdlib_files() if is_val(f, 0.05)]
    assert 0.03 < len(val) / len(files) < 0.07
    # The hash is sha256-based, not Python's salted hash(): a fixed value on every machine.
    assert corpus.stable_fraction("os.py") == int("d9d7c69c64b6688c", 16) / 2**64
    assert is_val("x.py", 1.0) and not is_val("x.py", 0.0)


def test_text_file_split_per_line_and_jsonl_per_record(tmp_path):
    lines = [f"line {i}\n" for i in range(200)]
    (tmp_path / "t.txt").write_text("".join(lines))
    cfg = make_cfg(tmp_path / "t.txt", val_fraction=0.2)
    train, val = data.split_documents(cfg, "train"), data.split_documents(cfg, "val")
    assert sorted("".join(train + val).splitlines(keepends=True)) == sorted(lines)
    assert set("".join(val).splitlines(keepends=True)) == {l for i, l in enumerate(lines) if is_val(str(i), 0.2)}
    recs = [{"text": f"doc {i}", "id": i} for i in range(100)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    cfg = make_cfg(tmp_path / "d.jsonl", val_fraction=0.2)
    val = data.validation_texts(cfg)
    assert val == [f"doc {i}" for i in range(100) if is_val(str(i), 0.2)]
    assert len(data.split_documents(cfg, "train")) + len(val) == 100
    cfg = make_cfg(tmp_path / "d.jsonl", val_path=str(tmp_path / "t.txt"))
    assert len(data.split_documents(cfg, "train")) == 100 and data.validation_texts(cfg) == ["".join(lines)]


# ---- packing ----

def test_packing_hand_example(tmp_path):
    docs = [[10, 11, 12], [20], [30, 31, 32, 33, 34, 35]]
    stream = data.pack_documents(docs, bos_id=1, eos_id=2)
    ids, start = data.unpack(stream)
    assert ids.tolist() == [1, 10, 11, 12, 2, 1, 20, 2, 1, 30, 31, 32, 33, 34, 35, 2]
    assert np.flatnonzero(start).tolist() == [0, 5, 8]
    # The second shard ends mid-row: its last row is padded.
    shards = data.ShardSet(write_prepared(tmp_path / "p", {"train": [docs, [[40]]]}), "train", seq_len=4)
    assert shards.num_rows == 5 and shards.num_tokens == 19
    ld = data.Loader(shards, global_batch=6, shuffle=False, seed=0)
    b = ld.batch(0)
    assert b["inputs"].tolist() == [[1, 10, 11, 12], [2, 1, 20, 2], [1, 30, 31, 32], [33, 34, 35, 2],
                                    [1, 40, 2, 0], [0] * 4]
    assert b["segment_ids"].tolist() == [[1, 1, 1, 1], [1, 2, 2, 2], [1, 1, 1, 1], [1, 1, 1, 1],
                                         [1, 1, 1, 0], [0] * 4]
    assert b["positions"].tolist() == [[0, 1, 2, 3], [0, 0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3],
                                       [0, 1, 2, 0], [0] * 4]
    assert b["targets"].tolist() == [[10, 11, 12, 0], [0, 20, 2, 0], [30, 31, 32, 0], [34, 35, 2, 0],
                                      [40, 2, 0, 0], [0] * 4]
    assert b["loss_mask"].tolist() == [[1, 1, 1, 0], [0, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0],
                                       [1, 1, 0, 0], [0] * 4]
    assert {k: v.dtype.name for k, v in b.items()} == {
        "inputs": "int32", "targets": "int32", "segment_ids": "int32", "positions": "int32",
        "loss_mask": "float32"}


# ---- tokenizer ----

def test_tokenizer_round_trips_code_and_reserves_ids(tok, corpus_dir, run_dir):
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.sp.unk_id()) == (0, 1, 2, 3)
    assert tok.vocab_size == VOCAB and tok.path == str(run_dir / "tokenizer.model")
    assert tok.decode(tok.encode(CODE)) == CODE
    src = (corpus_dir / "json" / "decoder.py").read_text()
    assert tok.decode(tok.encode(src)) == src
    assert 3 not in tok.encode(CODE)  # byte fallback: never unk
    assert tok.decode([1] + tok.encode("x = 1") + [2, 0]) == "x = 1"


def test_tokenizer_training_is_deterministic(tmp_path):
    docs = [CODE * 3, "def g(y):\n    return y + 1\n" * 20]
    a = data.train_tokenizer(docs, 400, tmp_path / "a.model", 10_000)
    b = data.train_tokenizer(docs, 400, tmp_path / "b.model", 10_000)
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert a.decode(a.encode(CODE)) == CODE and b.vocab_size == 400


def test_tokenizer_is_reused_not_retrained(tok, corpus_dir, run_dir, monkeypatch):
    monkeypatch.setattr(data.tokenizer, "train_tokenizer", lambda *a, **k: pytest.fail("retrained"))
    again = data.load_tokenizer(make_cfg(corpus_dir, val_fraction=0.25), run_dir)
    assert again.path == tok.path and again.encode(CODE) == tok.encode(CODE)
    other = data.load_tokenizer(make_cfg("/nonexistent", tokenizer=tok.path), run_dir / "elsewhere")
    assert other.vocab_size == VOCAB


# ---- loader ----

def test_loader_deterministic_and_resumable(tok, corpus_dir, run_dir, monkeypatch):
    cfg = make_cfg(corpus_dir, val_fraction=0.25)
    a = data.make_loader(cfg, tok, run_dir)
    assert a.num_tokens > 1000 and a.num_rows == math.ceil(a.num_tokens / 32)
    # The second loader reads the cache: no tokenizing.
    monkeypatch.setattr(prepare_mod, "prepare_unit", lambda *x, **k: pytest.fail("re-tokenized"))
    b = data.make_loader(cfg, tok, run_dir)
    for k in (0, 5, 123):
        x, y = a.batch(k), b.batch(k)
        assert all(np.array_equal(x[n], y[n]) for n in x)
    seen = [next(a)["inputs"] for _ in range(4)]
    state = a.get_state()
    assert state == {"step": 4}
    c = data.make_loader(cfg, tok, run_dir)
    c.set_state(state)
    assert np.array_equal(next(c)["inputs"], a.batch(4)["inputs"])
    assert not np.array_equal(seen[0], seen[1])


def test_multi_process_slices_union_to_global_batch(tok, corpus_dir, run_dir):
    cfg = make_cfg(corpus_dir, val_fraction=0.25, batch_size=8)
    full = data.make_loader(cfg, tok, run_dir).batch(7)
    parts = [data.make_loader(cfg, tok, run_dir, process_index=i, process_count=4).batch(7) for i in range(4)]
    assert parts[0]["inputs"].shape == (2, 32)
    for name in full:
        assert np.array_equal(np.concatenate([p[name] for p in parts]), full[name])


def test_epochs_cover_all_rows_and_reshuffle(tok, corpus_dir, run_dir):
    ld = data.make_loader(make_cfg(corpus_dir, val_fraction=0.25), tok, run_dir)
    r, per_epoch = ld.num_rows, ld.num_rows * 3
    idx = np.concatenate([ld.row_indices(s) for s in range(per_epoch // ld.global_batch + 1)])
    e0, e1 = idx[:r], idx[r:2 * r]
    assert sorted(e0) == list(range(r)) and sorted(e1) == list(range(r))
    assert not np.array_equal(e0, e1) and not np.array_equal(e0, np.arange(r))
    other = data.make_loader(make_cfg(corpus_dir, val_fraction=0.25, shuffle_seed=5), tok, run_dir)
    assert not np.array_equal(other.row_indices(0), ld.row_indices(0))


def test_validation_loader_is_ordered_and_covers_rows_once(tok, corpus_dir, run_dir):
    val = data.make_loader(make_cfg(corpus_dir, val_fraction=0.25), tok, run_dir, "val")
    idx = np.concatenate([val.row_indices(s) for s in range(val.num_batches)])
    assert idx[idx >= 0].tolist() == list(range(val.num_rows))
    last = val.batch(val.num_batches)
    assert last["loss_mask"].sum() == 0 and (last["segment_ids"] == 0).all()
    text = tok.decode(val.batch(0)["inputs"][0])
    assert text and text in "".join(data.validation_texts(make_cfg(corpus_dir, val_fraction=0.25)))


# ---- metrics ----

def test_token_bytes_and_bits_per_byte(tok):
    tb = data.token_bytes(tok)
    assert tb.shape == (VOCAB,) and tb.dtype == np.int32
    assert tb[:4].tolist() == [0, 0, 0, 0]                               # pad, bos, eos, unk
    assert tb[tok.sp.piece_to_id("<0x0A>")] == 1
    four = tok.sp.piece_to_id("\u2581" * 4)
    assert four != 3 and tb[four] == 4                                    # '▁' is a space byte
    # Over any text, the tokens' byte counts add up to its UTF-8 length exactly.
    assert tb[tok.encode(CODE)].sum() == len(CODE.encode("utf-8"))
    assert data.bits_per_byte(10 * math.log(2), 10) == pytest.approx(1.0)
    assert data.bits_per_byte(12.0, 3) == pytest.approx(12.0 / (3 * math.log(2)))
    assert math.isnan(data.bits_per_byte(1.0, 0))
    assert data.xz_bits_per_byte(["ab" * 5000, "ab" * 5000]) < 0.1
    rng = np.random.default_rng(0)
    noise = "".join(chr(c) for c in rng.integers(33, 127, 20000))
    assert 6.0 < data.xz_bits_per_byte([noise]) < 7.0                     # log2(94) = 6.55


# ---- errors ----

def test_errors_name_the_problem(tmp_path, tok, run_dir):
    def err(fn, *a):
        with pytest.raises(data.DataError) as e:
            fn(*a)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert issubclass(data.DataError, __import__("configs").ConfigError)
    msg = err(data.load_tokenizer, make_cfg(tmp_path / "missing"), tmp_path / "r1")
    assert msg == f"data path not found: {tmp_path / 'missing'} (data.path)"
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blob.bin").write_bytes(b"\0\1\2")
    (tmp_path / "empty" / "blank.txt").write_text("")
    assert err(data.validation_texts, make_cfg(tmp_path / "empty")) == \
        f"no val documents with text in {tmp_path / 'empty'} (data.path)"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n\n{"text": oops}\n')
    assert err(data.validation_texts, make_cfg(bad)) == f"{bad} line 3 is not valid JSON"
    bad.write_text('{"text": "a"}\n{"body": "b"}\n')
    assert err(data.validation_texts, make_cfg(bad)) == \
        f"{bad} line 2 has no string field 'text' (data.jsonl_field)"
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a model")
    assert err(data.load_tokenizer, make_cfg("", tokenizer=str(garbage)), tmp_path / "r2") == \
        f"tokenizer file {garbage} is not a valid sentencepiece model"
    assert err(data.load_tokenizer, make_cfg("", tokenizer=str(tmp_path / "no.model")), tmp_path) == \
        f"tokenizer file not found: {tmp_path / 'no.model'} (data.tokenizer)"
    assert err(data.load_tokenizer, make_cfg("", tokenizer=tok.path, vocab=256), tmp_path) == \
        f"tokenizer {tok.path} has {VOCAB} pieces but model.vocab_size is 256"
    (tmp_path / "t.txt").write_text("hello world\n" * 50)
    assert err(data.load_tokenizer, make_cfg(tmp_path / "t.txt", vocab=256), tmp_path / "r3") == \
        "model.vocab_size (256) is too small for a byte-fallback tokenizer (needs at least 384)"
    assert err(data.make_loader, make_cfg(tmp_path / "t.txt", batch_size=6), tok, tmp_path / "r4",
               "train", 0, 4) == "train.batch_size (6) is not divisible by the process count (4)"
    with pytest.raises(__import__("configs").ConfigError, match=r"data.seq_len \(4096\) exceeds model.max_seq_len"):
        load_config("tiny", ["data.seq_len=4096", "model.max_seq_len=2048"])


def test_errors_leave_run_dir_untouched(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "tokenizer.model").write_bytes(b"previous")
    (run / "keep.txt").write_text("x")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(data.DataError, match="not a valid sentencepiece model"):
        data.load_tokenizer(make_cfg(tmp_path / "nothing"), run)
    with pytest.raises(data.DataError, match="data path not found"):
        data.load_tokenizer(make_cfg(tmp_path / "nothing"), tmp_path / "run2")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    assert not (tmp_path / "run2").exists()
