"""Classification data: CSV parsing, label maps, stratified split, tokenization, and bad input
(one-line errors naming the row or column, exit code 2)."""
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from tasks.classify import dataset as D
from tasks.classify import stdlib_dataset


def write(path, text, mode="w"):
    if mode == "wb":
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_read_csv_columns_quotes_and_ids(tmp_path):
    p = write(tmp_path / "a.csv", 'id,body,y\nr1,"hello, ""world""\nsecond line",2\n\nr2,bye,10\n')
    ex = D.read_csv(p, "body", "y")
    assert ex.texts == ['hello, "world"\nsecond line', "bye"] and ex.labels == ["2", "10"]
    assert ex.ids == ["r1", "r2"] and ex.lines == [2, 5]
    by_index = D.read_csv(p, "1", "2")  # columns may be given by 0-based position
    assert by_index.texts == ex.texts and by_index.labels == ex.labels
    assert D.LabelMap.from_labels(ex.labels).names == ["2", "10"]  # integer labels sort numerically
    assert D.LabelMap.from_labels(["b", "a", "b"]).names == ["a", "b"]


def test_stratified_split_keeps_class_proportions():
    labels = np.repeat(np.arange(4), [100, 50, 20, 2])
    train, val = D.stratified_split(labels, 0.2, seed=0)
    assert np.intersect1d(train, val).size == 0 and train.size + val.size == labels.size
    assert np.bincount(labels[val], minlength=4).tolist() == [20, 10, 4, 1]
    again = D.stratified_split(labels, 0.2, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip((train, val), again))


def test_class_weights_match_sklearn():
    utils = pytest.importorskip("sklearn.utils")
    y = np.repeat(np.arange(3), [10, 30, 60])
    want = utils.compute_class_weight("balanced", classes=np.arange(3), y=y)
    np.testing.assert_allclose(D.class_weights(y, 3), want, rtol=1e-6)


def test_encode_pads_truncates_and_ends_with_eos(tmp_path):
    texts = ["short", "a much longer text " * 20]
    tok = D.train_tokenizer(texts * 50, 512, tmp_path / "tok" / "tokenizer.model")
    tokens, lengths = D.encode_texts(texts, tok, 16)
    assert tokens.shape == (2, 16) and lengths[1] == 16
    assert tokens[0, 0] == tok.bos_id and tokens[0, lengths[0] - 1] == tok.eos_id
    assert (tokens[0, lengths[0]:] == 0).all() and tokens[1, -1] == tok.eos_id


def test_stdlib_dataset_is_real_and_balanced(tmp_path):
    ex = D.read_csv(stdlib_dataset.write_csv(tmp_path / "s.csv", max_per_class=40))
    assert sorted(set(ex.labels)) == sorted(stdlib_dataset.PACKAGES) and len(stdlib_dataset.PACKAGES) >= 5
    assert all(ex.labels.count(p) == 40 for p in stdlib_dataset.PACKAGES)
    assert ex.ids[0].startswith(ex.labels[0] + "/") and ":" in ex.ids[0]


GOOD = "text,label\n" + "".join(f"text number {i},{'ab'[i % 2]}\n" for i in range(20))


@pytest.mark.parametrize("case,content,overrides,expect", [
    ("missing_column", "words,label\nhi,a\n", [], "has no text column 'text'"),
    ("missing_label_column", "text,category\nhi,a\n", ["data.label_column=klass"], "has no label column 'klass'"),
    ("empty", "", [], "is empty"),
    ("header_only", "text,label\n", [], "has a header but no data rows"),
    ("empty_label", "text,label\nhi,a\nhello,\n", [], "line 3: empty label"),
    ("unseen_val_label", GOOD, ["data.val_path={val}"], "line 3: label 'zebra' does not occur in the training data"),
    ("non_utf8", b"text,label\nok,a\ncaf\xe9 au lait,b\n", [], "line 3: not valid UTF-8"),
    ("ragged", "text,label\nhi,a\nhello,b,extra\n", [], "line 3: 3 fields, but the header has 2"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, case, content, overrides, expect):
    import train
    p = write(tmp_path / f"{case}.csv", content, "wb" if isinstance(content, bytes) else "w")
    val = write(tmp_path / "val.csv", "text,label\nfine,a\nstripes,zebra\n")
    args = ["configs/tasks/classify.yaml", f"data.path={p}", f"train.run_dir={tmp_path / 'run'}"]
    rc = train.main(args + [o.format(val=val) for o in overrides])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and expect in err, err
    assert str(val if case == "unseen_val_label" else p) in err


def test_cli_exit_code_2(tmp_path):
    """The real entry scripts: one line on stderr, exit code 2, no traceback."""
    p = write(tmp_path / "bad.csv", b"text,label\n\xff\xfe,a\n", "wb")
    cmds = [[sys.executable, "train.py", "configs/tasks/classify.yaml", f"data.path={p}",
             f"train.run_dir={tmp_path / 'run'}"],
            [sys.executable, "evaluate.py", "classify", str(tmp_path / "no_such_run"), str(p)]]
    for cmd in cmds:
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={"JAX_PLATFORMS": "cpu", "PATH": ""})
        assert out.returncode == 2, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
