"""Command line: convert Hugging Face checkpoints to and from Tessera run directories.

    python -m interop.hf import HF_DIR OUT_DIR [key=value ...]
    python -m interop.hf export RUN_DIR OUT_DIR [--dtype bfloat16] [--max-shard-size 5GB] [key=value ...]

`key=value` are Tessera config overrides (e.g. model.param_dtype=bfloat16, mesh.fsdp=4,
mesh.rules=fsdp_tp), in any order with the flags. Errors in the input are one line on stderr and
exit code 2.
"""
from __future__ import annotations

import argparse
import re
import sys

from configs import ConfigError
from configs.cli import parse_cli

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB' / '500MiB' / '1000000' -> bytes (decimal units, as transformers' max_shard_size)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).upper() not in UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 5GB, 500MiB)")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m interop.hf", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF directory -> Tessera run directory")
    imp.add_argument("hf_dir")
    imp.add_argument("out_dir")
    imp.add_argument("overrides", nargs="*", help="config overrides, key=value")
    exp = sub.add_parser("export", help="Tessera run directory -> HF directory")
    exp.add_argument("run_dir")
    exp.add_argument("out_dir")
    exp.add_argument("overrides", nargs="*", help="config overrides, key=value")
    exp.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                     help="weight dtype in the safetensors (default: model.param_dtype)")
    exp.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GB"),
                     help="split the weights into shards of at most this size (default 5GB)")
    for p in (imp, exp):
        p.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit code (2 for bad input, with a one-line message)."""
    args = parse_cli(build_parser(), argv)
    from sharding.platforms import skip_absent_tpu
    skip_absent_tpu()  # before jax starts its backends: no libtpu start-up errors on hosts without TPU
    from interop.convert import export_hf, import_hf
    try:
        if args.command == "import":
            cfg = import_hf(args.hf_dir, args.out_dir, overrides=args.overrides, progress=not args.quiet)
            m = cfg.model
            print(f"imported {args.hf_dir} -> {args.out_dir} (L={m.n_layers} D={m.d_model} "
                  f"N={m.n_heads} K={m.n_kv_heads} V={m.vocab_size}, {m.param_dtype})")
        else:
            files = export_hf(args.run_dir, args.out_dir, dtype=args.dtype, max_shard_bytes=args.max_shard_size,
                              overrides=args.overrides, progress=not args.quiet)
            print(f"exported {args.run_dir} -> {args.out_dir} ({len(files)} safetensors file(s))")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
