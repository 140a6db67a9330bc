"""The end-of-training report: the model's bits per byte on the whole validation split, every token
scored once, over exactly the bytes xz -9e compresses."""
import lzma
import math
import shutil
import sysconfig
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import data
from data.packing import num_rows
from data_helpers import stream_of, write_prepared

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def scored_positions(tmp_path, docs, seq_len, stride):
    """Stream positions of every target with loss_mask 1 over all rows of a one-shard split, and
    the targets' ids."""
    shards = data.ShardSet(write_prepared(tmp_path, {"val": [docs]}), "val", seq_len, stride)
    ld = data.Loader(shards, global_batch=shards.num_rows, shuffle=False, seed=0)
    b = ld.batch(0)
    r, t = np.nonzero(b["loss_mask"])
    return r * stride + t + 1, b["targets"][r, t]


@pytest.mark.parametrize("seq_len,stride", [(2, 1), (4, 3), (8, 7), (8, 3), (32, 31), (200, 199), (8, 8)])
def test_overlapping_rows_score_every_token_once(tmp_path, seq_len, stride):
    rng = np.random.default_rng(seq_len)
    docs = [list(rng.integers(4, 50, size=n)) for n in (0, 1, 5, 31, 32, 33, 70, 3, 2)]
    tokens = stream_of(docs)
    pos, targets = scored_positions(tmp_path, docs, seq_len, stride)
    np.testing.assert_array_equal(targets, tokens[pos])
    if stride == seq_len:  # standalone rows: no double counting, one target lost per row boundary
        assert len(np.unique(pos)) == len(pos) and num_rows(len(tokens), seq_len) == math.ceil(len(tokens) / seq_len)
        return
    # Every token except the bos of each document (never predicted across documents) exactly once.
    bos = np.cumsum([0] + [len(d) + 2 for d in docs[:-1]])
    np.testing.assert_array_equal(np.sort(pos), np.setdiff1d(np.arange(len(tokens)), bos))


def test_full_pass_loader_batches_cover_the_split_once(tmp_path):
    shards = [[list(range(4, 4 + n)) for n in (40, 3)], [list(range(4, 4 + n)) for n in (17, 90)]]
    val = data.Loader(data.ShardSet(write_prepared(tmp_path, {"val": shards}), "val", 16), global_batch=4,
                      shuffle=False, seed=0)
    full = data.full_pass_loader(val)
    masks = [full.batch(i)["loss_mask"].sum() for i in range(full.num_batches)]
    assert sum(masks) == val.num_tokens - 4  # every token but each document's bos
    # Two processes' slices of each global batch add up to the same targets.
    halves = [data.full_pass_loader(val, pi, 2) for pi in range(2)]
    split = sum(h.batch(i)["loss_mask"].sum() for h in halves for i in range(full.num_batches))
    assert split == sum(masks)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A 2-step tiny run whose validation split is a few real files, one with multi-byte UTF-8."""
    root = tmp_path_factory.mktemp("final_eval")
    train_dir, val_dir = root / "train", root / "val"
    train_dir.mkdir()
    val_dir.mkdir()
    for f in sorted((STDLIB / "json").glob("*.py")):
        shutil.copy(f, train_dir / f.name)
    shutil.copy(STDLIB / "email" / "quoprimime.py", val_dir / "a_quoprimime.py")
    shutil.copy(STDLIB / "email" / "charset.py", val_dir / "b_charset.py")
    (val_dir / "c_short.py").write_text("x = 1\n")
    (val_dir / "d_unicode.py").write_text("# café, naïve, 日本語, emoji 🐍\ns = 'Grüße'\n" * 3)
    docs = [p.read_text() for p in sorted(train_dir.glob("*.py"))]
    tok = data.train_tokenizer(docs, 384, root / "tok.model", sample_bytes=10**6)
    from configs import load_config
    from training.loop import Trainer
    cfg = load_config("tiny", [
        f"data.path={train_dir}", f"data.val_path={val_dir}", f"data.tokenizer={tok.path}",
        f"train.run_dir={root / 'run'}", "model.vocab_size=384", "model.d_model=32", "model.n_layers=2",
        "model.n_heads=2", "model.n_kv_heads=1", "model.mlp_dim=64", "model.max_seq_len=64",
        "data.seq_len=32", "train.batch_size=8", "train.steps=2", "train.eval_every=1",
        "train.eval_batches=1", "model.attention_impl=xla"])
    trainer = Trainer(cfg, log_enabled=False)
    summary = trainer.run()
    full = trainer.full_validation(summary["step"])
    yield cfg, trainer, summary, full
    trainer.close()


def test_final_report_scores_the_bytes_xz_compresses(small_run):
    cfg, trainer, _, full = small_run
    texts = [p.read_text(encoding="utf-8") for p in sorted(Path(cfg.data.val_path).glob("*.py"))]
    raw = b"".join(p.read_bytes() for p in sorted(Path(cfg.data.val_path).glob("*.py")))
    assert len(texts) == full["full_val_documents"] == 4
    # The model's denominator is the byte length of the very files xz compresses, concatenated.
    assert full["full_val_bytes"] == len(raw) == data.utf8_bytes(texts)
    assert full["full_val_token_bytes"] == len(raw)  # the lossless tokenizer spells the same bytes
    xz = 8 * len(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)) / len(raw)
    assert full["xz_bpb"] == pytest.approx(xz, rel=1e-12)

    # Total nats computed independently of the loader: tokenize each file, cut the bos+ids+eos
    # stream into windows of T tokens every T-1, run each document's piece of a window alone.
    tok, T = trainer.tokenizer, cfg.data.seq_len
    stream, doc_of = [], []
    for d, text in enumerate(texts):
        ids = [tok.bos_id] + tok.encode(text) + [tok.eos_id]
        stream += ids
        doc_of += [d] * len(ids)
    pieces = []
    for w in range(0, len(stream) - 1, T - 1):
        window = list(zip(stream[w:w + T], doc_of[w:w + T]))
        for d in sorted({d for _, d in window}):
            piece = [t for t, dd in window if dd == d]
            if len(piece) > 1:
                pieces.append(piece)
    P = len(pieces)
    inputs, targets, mask = np.zeros((P, T), np.int32), np.zeros((P, T), np.int32), np.zeros((P, T), np.float32)
    for i, piece in enumerate(pieces):
        inputs[i, :len(piece)] = piece
        targets[i, :len(piece) - 1] = piece[1:]
        mask[i, :len(piece) - 1] = 1
    seg = (np.arange(T)[None, :] < np.array([len(p) for p in pieces])[:, None]).astype(np.int32)
    batch = {"inputs": jnp.asarray(inputs), "targets": jnp.asarray(targets), "segment_ids": jnp.asarray(seg),
             "positions": jnp.asarray(np.broadcast_to(np.arange(T, dtype=np.int32), (P, T)))}
    from training.step import token_nll
    params = jax.device_get(trainer.state["params"])
    nll, _ = jax.jit(lambda p, b: token_nll(trainer.graphdef, p, b))(params, batch)
    nats = float(np.sum(np.asarray(nll, np.float64) * mask))
    assert full["full_val_tokens"] == mask.sum() == len(stream) - len(texts)  # every token but bos, once
    assert full["full_val_bpb"] == pytest.approx(nats / math.log(2) / len(raw), rel=1e-5)


def test_printed_report_puts_model_and_xz_on_the_same_bytes(small_run, capsys):
    from train import print_report
    _, trainer, summary, full = small_run
    print_report(trainer.eval_label, summary, full)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("val bpb (first 1 batch): ") and "after 2 steps" in lines[0]
    assert f"whole validation split: 4 documents, {full['full_val_bytes']:,} bytes" in lines[1]
    assert lines[2].split()[-4:] == [f"{full['full_val_bpb']:.3f}", "bits", "per", "byte"]
    assert lines[3].strip().startswith("xz -9e, same bytes") and f"{full['xz_bpb']:.3f}" in lines[3]
