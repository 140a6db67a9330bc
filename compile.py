"""Compile a config ahead of time for a TPU slice, on any host: does it fit, how fast should it run.

  python compile.py CONFIG --topology v5p-8 [--slices N] [--serve] [--suggest] [--json FILE]
                    [--save DIR] [--no-estimate] [key.sub=value ...]

Compiles the exact jitted train step train.py runs (with --serve: the serving prefill and decode
steps) for the topology through libtpu (`pip install libtpu`; no TPU needed) and prints per-chip
HBM against the chip's capacity, model and compiled FLOPs per step, the compiler's estimated step
time, estimated tokens/s per chip and MFU, and compile time. Topologies: v4-N, v5p-N (N counts
TensorCores, 2 per chip: v5p-8 is 4 chips), v5e-N, v6e-N (N counts chips).
--suggest tries remat policies and per-chip batch sizes and prints the fastest that fits.
--save DIR writes the compiled train step; train.py loads it with train.compiled_step=DIR.
See docs/compile.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from configs.cli import parse_cli


def parse_args(argv):
    """Flags and key=value overrides, in any order."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML preset path or name")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--topology", required=True, help="TPU slice: v4-N, v5e-N, v5p-N or v6e-N")
    p.add_argument("--slices", type=int, default=1, help="number of slices joined over DCN (default 1)")
    p.add_argument("--serve", action="store_true", help="compile the serving prefill and decode steps")
    p.add_argument("--suggest", action="store_true",
                   help="try remat policies and per-chip batch sizes; print the fastest that fits")
    p.add_argument("--remats", default="full,save_dots,minimal,none", help="--suggest: remat policies")
    p.add_argument("--batches", default="1,2,4,8,16", help="--suggest: rows per chip to try")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON")
    p.add_argument("--save", default=None, metavar="DIR", help="write the compiled train step to DIR")
    p.add_argument("--no-estimate", action="store_true",
                   help="skip the 1- and 2-layer-group compiles that correct the step-time estimate under scan")
    return parse_cli(p, argv)


def int_list(text: str, what: str) -> list[int]:
    from configs import ConfigError
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{what} must be a comma-separated list of integers; got {text!r}") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{what} must list positive integers; got {text!r}")
    return values


def run(args) -> dict:
    """Build the target, compile, print the report(s); returns what --json writes."""
    from configs import ConfigError, load_config
    from configs.schema import REMATS
    from aot import compile_train as aot
    from aot.topology import parse_topology, topology_devices

    topo = parse_topology(args.topology, args.slices)  # bad names fail before any slow work
    cfg = aot.target_config(load_config(args.config, args.overrides), topo)
    aot.check_mesh(cfg, topo)  # a mesh/chip-count mismatch is a one-line error up front
    devices = topology_devices(topo)
    print(topo.describe(), flush=True)
    if args.serve:
        from aot import compile_serve as aot_serve
        report = aot_serve.estimate(cfg, topo, devices)
        print(aot_serve.format_report(report))
        return report
    if args.suggest:
        from aot import suggest as aot_suggest
        remats = [r.strip() for r in args.remats.split(",") if r.strip()]
        bad = [r for r in remats if r not in REMATS]
        if bad:
            raise ConfigError(f"--remats: unknown remat policy {bad[0]!r} ({', '.join(REMATS)})")
        result = aot_suggest.suggest(cfg, topo, devices, remats, int_list(args.batches, "--batches"),
                                     log=lambda line: print(line, flush=True))
        print(aot_suggest.format_result(result))
        return result
    report = aot.estimate(cfg, topo, devices, extrapolate=not args.no_estimate, keep=bool(args.save))
    compiled = report.pop("compiled", None)
    print(aot.format_report(report))
    if args.save:
        from aot.executable import save_executable
        path = save_executable(args.save, compiled, cfg, topo.name, devices)
        print(f"saved the compiled train step to {path} (train.py: train.compiled_step={args.save})")
    return report


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu installed, no TPU here: stay on CPU
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from configs import ConfigError
    try:
        report = run(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
