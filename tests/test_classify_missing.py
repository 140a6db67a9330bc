"""`evaluate.py classify` on a file where some of the model's classes have no rows: a clear note names
them, and the plots are drawn without matplotlib's empty-legend warning."""
import csv
import json
import warnings

import numpy as np
import pytest

from tasks.classify.dataset import Examples
from tasks.classify.evaluate import write_report
from tasks.classify.plots import plot_roc

TINY = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1", "model.mlp_dim=64",
        "model.vocab_size=512", "model.max_seq_len=64", "data.seq_len=32", "task.max_len=32",
        "train.batch_size=16", "train.warmup_steps=1", "checkpoint.async_save=false"]
WORDS = {"food": "bread soup apple", "sport": "goal match team", "tech": "laptop server kernel"}


def write_csv(path, labels):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "label"])
        for i, label in enumerate(labels):
            w.writerow([f"row{i}", f"today we saw {WORDS[label].split()[i % 3]} again", label])
    return path


@pytest.mark.parametrize("num_classes,present", [(2, [0]), (2, [1]), (3, [0]), (3, [0, 2])])
def test_roc_plot_without_curves_or_with_some_draws_no_legend_warning(tmp_path, num_classes, present):
    y = np.array(present * 4)
    probs = np.full((len(y), num_classes), 1 / num_classes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "No artists with labels found" is a UserWarning
        plot_roc(y, probs, [f"c{i}" for i in range(num_classes)], tmp_path / "roc.png")
    assert (tmp_path / "roc.png").read_bytes()[:4] == b"\x89PNG"


def test_report_lists_missing_classes(tmp_path):
    y = np.array([0, 0, 2, 2])
    probs = np.array([[0.8, 0.1, 0.1], [0.6, 0.2, 0.2], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]])
    ex = Examples(texts=["t"] * 4, labels=["a", "a", "c", "c"], ids=[f"r{i}" for i in range(4)],
                  lines=[2, 3, 4, 5], source="mem.csv")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics = write_report(tmp_path, ex, probs, ["a", "b", "c"], y)
    assert metrics["missing_classes"] == ["b"]
    assert json.loads((tmp_path / "metrics.json").read_text())["missing_classes"] == ["b"]


def test_missing_classes_line_wording():
    from evaluate import missing_classes_line
    one = missing_classes_line(["tech"], "test.csv")
    assert one.startswith("note: class 'tech' has no rows in test.csv:") and "no ROC curve" in one
    two = missing_classes_line(["sport", "tech"], "t.csv")
    assert two.startswith("note: classes 'sport', 'tech' have no rows in t.csv:")


def test_evaluate_classify_names_the_absent_class(tmp_path, capsys):
    import evaluate
    import train
    run = tmp_path / "run"
    labels = ["food", "sport", "tech"] * 16
    assert train.main(["configs/tasks/classify.yaml", f"data.path={write_csv(tmp_path / 'train.csv', labels)}",
                       f"train.run_dir={run}", "train.steps=2", "train.eval_every=2", "checkpoint.every=2",
                       *TINY]) == 0
    test_csv = write_csv(tmp_path / "test.csv", ["food", "sport"] * 4)  # no 'tech' row
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert evaluate.main(["classify", str(run), str(test_csv), "--out", str(tmp_path / "eval")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"note: class 'tech' has no rows in {test_csv}: its precision, recall and F1 count as 0 "
                      "in the macro averages, and it has no ROC curve")
    assert out[1].startswith("8 rows: accuracy")
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["missing_classes"] == ["tech"]
