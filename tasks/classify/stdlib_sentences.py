"""A short-text classification task built offline from the Python standard library: what kind of
English sentence a line of prose is.

Three classes of one-sentence texts, all written by the same people about the same code, so
vocabulary alone does not separate them; style and intent do:
  docstring  the first sentence of a function's or class's docstring ("Return the number of ...")
  comment    a `#` comment, its lines joined ("# We can't use ... here because ...")
  error      the message of a raised exception or a warning ("expected str, got ...")
Markers that would give the class away (`#`, quotes, the exception's name) are not in the text;
f-string fields become `{}`. Texts are 20-200 characters and at least 4 words, deduplicated
across classes; test suites are skipped. This is a harder, more realistic check than the package
task (short texts, natural language, overlapping vocabulary), used to see that the classify
preset is not tuned to one task:

  python -m tasks.classify.stdlib_sentences runs/sentences.csv --test runs/sentences_test.csv
"""
from __future__ import annotations

import argparse
import ast
import csv
import io
import re
import tokenize
from pathlib import Path

import numpy as np

from tasks.classify.stdlib_dataset import stdlib_dir

CLASSES = ("comment", "docstring", "error")
PER_CLASS = 1700       # rows per class in the training CSV (5,100 in all, split 90/10 by train.py)
TEST_PER_CLASS = 300    # rows per class in the separate test CSV (the error class has ~2,000 texts)
WARN_CALLS = ("warn", "warning", "warn_explicit")


def _clean(text: str) -> str | None:
    """One line of prose, or None when it is too short, too long or not prose."""
    text = " ".join(text.split())
    if not 20 <= len(text) <= 200 or len(text.split()) < 4 or not re.search(r"[A-Za-z]{3}", text):
        return None
    return text


def _message(node: ast.AST) -> str | None:
    """The literal text of a str constant or f-string (fields as {}), else None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod):  # "... %s ..." % args
        return _message(node.left)
    return None


def _first_sentence(doc: str) -> str:
    """The docstring's first paragraph up to its first full stop."""
    para = doc.strip().split("\n\n")[0]
    para = " ".join(para.split())
    m = re.match(r"(.+?[.!?])(\s|$)", para)
    return m.group(1) if m else para


def module_texts(source: str) -> dict[str, list[str]]:
    """{class: texts} of one module's source."""
    out = {c: [] for c in CLASSES}
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            doc = ast.get_docstring(node)
            if doc:
                out["docstring"].append(_first_sentence(doc))
        elif isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args:
            out["error"].append(_message(node.exc.args[0]))
        elif isinstance(node, ast.Call) and node.args:
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in WARN_CALLS:
                out["error"].append(_message(node.args[0]))
    # Consecutive comment lines are one comment; a code line or blank line ends it.
    comment, last_row = [], -2
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            body = tok.string.lstrip("#").strip()
            if comment and tok.start[0] != last_row + 1:
                out["comment"].append(" ".join(comment))
                comment = []
            if body and not body.startswith(("!", "-*-", "type:", "noqa", "pragma")):
                comment.append(body)
            last_row = tok.start[0]
    if comment:
        out["comment"].append(" ".join(comment))
    return {c: [t for t in (_clean(x) for x in texts if x) if t] for c, texts in out.items()}


def collect(root: Path | None = None) -> dict[str, list[str]]:
    """{class: deduplicated texts} over the whole standard library (test suites excluded); a text
    seen in more than one class is dropped from all of them."""
    root = root or stdlib_dir()
    found: dict[str, dict[str, None]] = {c: {} for c in CLASSES}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(p in ("test", "tests", "idle_test", "site-packages") for p in rel):
            continue
        try:
            texts = module_texts(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, tokenize.TokenError, ValueError):
            continue  # lib2to3 fixtures and the like: not Python 3 source
        for c, xs in texts.items():
            found[c].update(dict.fromkeys(xs))
    seen_twice = {t for c in CLASSES for t in found[c] if sum(t in found[o] for o in CLASSES) > 1}
    return {c: [t for t in found[c] if t not in seen_twice] for c in CLASSES}


def build_rows(seed: int = 0, per_class: int = PER_CLASS, test_per_class: int = TEST_PER_CLASS):
    """(rows, test_rows), each a list of (id, text, label): disjoint seeded draws per class."""
    rng = np.random.default_rng(seed)
    rows, test = [], []
    for c, texts in collect().items():
        need = per_class + test_per_class
        if len(texts) < need:
            raise ValueError(f"only {len(texts)} '{c}' texts in the standard library, need {need}")
        pick = rng.permutation(len(texts))[:need]
        rows += [(f"{c}-{i}", texts[i], c) for i in pick[:per_class]]
        test += [(f"{c}-{i}", texts[i], c) for i in pick[per_class:]]
    order = rng.permutation(len(rows))  # interleave the classes: the file reads like real data
    return [rows[i] for i in order], test


def write(path: str | Path, rows) -> Path:
    """Write (id, text, label) rows as a CSV with a header."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "label"])
        w.writerows(rows)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="training CSV (the run splits off its validation rows)")
    p.add_argument("--test", default="", help="also write the held-out test CSV here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rows, test = build_rows(args.seed)
    print(f"{write(args.out, rows)}: {len(rows)} rows")
    if args.test:
        print(f"{write(args.test, test)}: {len(test)} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
