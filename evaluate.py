"""Evaluate a checkpoint.

  python evaluate.py classify CKPT FILE.csv [--out DIR] [--text-column C] [--label-column C] [key=value ...]
      metrics.json (accuracy, per-class precision/recall/F1, macro and weighted F1, confusion
      matrix, ROC-AUC), predictions.csv, confusion_matrix.png and roc_curves.png in DIR
  python evaluate.py lm CKPT PATH [--out DIR] [--seq-len T] [--max-tokens N] [key=value ...]
      perplexity and bits per byte of a language model on a text file or a directory of files
  python evaluate.py choice CKPT FILE.jsonl [--out DIR] [key=value ...]
      multiple-choice accuracy: each choice scored by its log-likelihood after the context

CKPT is a Tessera run directory (a classification run for `classify`) or, for `lm` and `choice`,
a Hugging Face model directory. key=value are config overrides applied to the checkpoint's config
(e.g. model.attention_impl=xla), in any order with the flags. Bad input is a one-line error and
exit code 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from configs.cli import parse_cli


def parse_args(argv):
    """The command line: a subcommand, its arguments and flags, key=value overrides in any order."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("classify", help="classification metrics of a fine-tuned run on a CSV")
    c.add_argument("checkpoint")
    c.add_argument("data", help="CSV with a header row")
    c.add_argument("--text-column", default=None, help="default: the run's data.text_column")
    c.add_argument("--label-column", default=None, help="default: the run's data.label_column")
    lm = sub.add_parser("lm", help="perplexity and bits per byte on text")
    lm.add_argument("checkpoint")
    lm.add_argument("data", help="text file, .jsonl file or directory")
    lm.add_argument("--seq-len", type=int, default=0, help="tokens per scored window (default: data.seq_len)")
    lm.add_argument("--max-tokens", type=int, default=0, help="stop after this many tokens (0: all)")
    ch = sub.add_parser("choice", help="multiple-choice accuracy from a JSONL file")
    ch.add_argument("checkpoint")
    ch.add_argument("data", help="JSONL rows: {context, choices, answer}")
    for s in (c, lm, ch):
        s.add_argument("overrides", nargs="*", help="config overrides, key=value")
        s.add_argument("--out", default=None, help="output directory (default: CKPT/eval/<data name>)")
        s.add_argument("--batch-size", type=int, default=0, help="rows per forward pass (default: train.batch_size)")
    return parse_cli(p, argv)


def out_dir(args) -> Path:
    return Path(args.out) if args.out else Path(args.checkpoint) / "eval" / Path(args.data).stem


def eval_mesh():
    """Data-parallel mesh over every device: parameters replicated, rows split, so no model
    dimension has to divide the device count (evaluation holds no optimizer state)."""
    from configs import MeshConfig
    from sharding.mesh import make_mesh
    return make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1))


def missing_classes_line(missing: list[str], path) -> str:
    """The note printed when some of the model's classes have no row in the evaluated file."""
    if len(missing) == 1:
        return (f"note: class {missing[0]!r} has no rows in {path}: its precision, recall and F1 count as 0 "
                "in the macro averages, and it has no ROC curve")
    names = ", ".join(repr(m) for m in missing)
    return (f"note: classes {names} have no rows in {path}: their precision, recall and F1 count as 0 "
            "in the macro averages, and they have no ROC curves")


def run(args) -> dict:
    """Dispatch a subcommand; returns the metrics it wrote."""
    mesh = eval_mesh()
    out = out_dir(args)
    if args.command == "classify":
        from tasks.classify.evaluate import evaluate_csv
        metrics = evaluate_csv(args.checkpoint, args.data, out, mesh, args.text_column, args.label_column,
                               batch_size=args.batch_size or None, overrides=args.overrides)
        if metrics is None:
            print(f"no label column: wrote predictions to {out / 'predictions.csv'}")
            return {}
        if metrics["missing_classes"]:
            print(missing_classes_line(metrics["missing_classes"], args.data))
        from tasks.classify.baseline import baseline_line
        print(f"{metrics['n']} rows: accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['macro_f1']:.4f}, "
              f"weighted F1 {metrics['weighted_f1']:.4f}, ROC-AUC "
              + ("n/a" if metrics["roc_auc"] is None else f"{metrics['roc_auc']:.4f}")
              + f" ({metrics['params']}) -> {out}")
        print(baseline_line(metrics["baseline_tfidf_logreg"]))
        return metrics
    from tasks import lm_eval
    model = lm_eval.load_lm(args.checkpoint, mesh, args.overrides)
    if args.command == "lm":
        metrics = lm_eval.perplexity(model, args.data, seq_len=args.seq_len, batch_size=args.batch_size,
                                     max_tokens=args.max_tokens)
        print(f"{metrics['tokens']:,} tokens, {metrics['bytes']:,} bytes: perplexity {metrics['perplexity']:.3f}, "
              f"bits per byte {metrics['bits_per_byte']:.4f} -> {out}")
    else:
        metrics = lm_eval.multiple_choice(model, args.data, batch_size=args.batch_size, out_dir=out)
        print(f"{metrics['n']} questions: accuracy {metrics['accuracy']:.4f} (length-normalised "
              f"{metrics['accuracy_norm']:.4f}, chance {metrics['chance']:.4f}) -> {out}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from sharding.platforms import skip_absent_tpu
    skip_absent_tpu()  # before jax starts its backends: no libtpu start-up errors on hosts without TPU
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from configs import ConfigError
    try:
        run(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
