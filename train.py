"""Train a Tessera model.

  python train.py CONFIG [--dry-run] [--samples N] [key.sub=value ...]

CONFIG is a YAML preset (configs/tiny.yaml) or its name (tiny). The run directory
(train.run_dir) holds checkpoints, the tokenizer, metrics.jsonl and TensorBoard events;
running the same command again resumes from the newest complete checkpoint.
Multi-process: --coordinator HOST:PORT --num-processes N --process-id I (or TESSERA_* env vars);
on a multi-host TPU VM slice nothing extra is needed.
"""
from __future__ import annotations

import argparse
import logging
import sys

from configs.cli import parse_cli


def parse_args(argv):
    """Flags and key=value overrides, in any order."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML preset path or name")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--dry-run", action="store_true", help="print what would be built; allocate nothing")
    p.add_argument("--devices", type=int, default=None, help="device count for --dry-run (default: this host's)")
    p.add_argument("--samples", type=int, default=0, help="print N greedy samples after training")
    p.add_argument("--coordinator", default=None, help="jax.distributed coordinator HOST:PORT")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    return parse_cli(p, argv)


SAMPLE_PROMPTS = ["def ", "import os\n", "class ", "    for i in range(", "# "]


def print_samples(trainer, n: int) -> None:
    """Greedy continuations of a few code prompts from the trained model."""
    from training.sample import greedy_generate
    tok = trainer.tokenizer
    prompts = [tok.encode(p, add_bos=tok.add_bos) for p in SAMPLE_PROMPTS[:n]]  # BOS as the tokenizer says
    outs = greedy_generate(trainer.graphdef, trainer.state["params"], prompts, 64, eos_id=tok.eos_id)
    for prompt, out in zip(SAMPLE_PROMPTS, outs):
        print(f"--- sample (prompt {prompt!r}) ---")
        print(prompt + tok.decode(out))


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from sharding.platforms import skip_absent_tpu
    skip_absent_tpu()  # before jax starts its backends: no libtpu start-up errors on hosts without TPU
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from configs import ConfigError, load_config
    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            import jax
            from aot.dry_run import describe
            print(describe(cfg, args.devices or jax.device_count()))
            return 0
        from training import distributed
        distributed.initialize(args.coordinator, args.num_processes, args.process_id)
        if cfg.task.kind == "classify":
            from tasks.classify.train import main as classify_main
            return classify_main(cfg, args)
        from training.loop import Trainer
        trainer = Trainer(cfg)
        if cfg.train.compiled_step:  # a step compiled ahead of time by compile.py --save
            from aot.executable import use_saved_step
            use_saved_step(trainer)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        summary = trainer.run()
        full = None
        if cfg.train.final_eval and "stopped_by" not in summary:
            full = trainer.full_validation(summary["step"])
        import jax
        if jax.process_index() == 0:
            print_report(trainer.eval_label, summary, full)
            if args.samples:
                print_samples(trainer, args.samples)
    finally:
        trainer.close()
    return 0


def print_report(eval_label: str, summary: dict, full: dict | None) -> None:
    """The cheap periodic eval, labelled as such, then model and xz -9e on the same bytes."""
    final, step = summary.get("final", {}), summary["step"]
    if "val_bpb" in final:
        before = f"{summary['initial']['val_bpb']:.3f} before training, " if "initial" in summary else ""
        print(f"{eval_label}: {before}{final['val_bpb']:.3f} after {step} steps")
    if full is not None:
        note = ""
        if int(full["full_val_token_bytes"]) != full["full_val_bytes"]:
            note = f"; the scored tokens' pieces spell {full['full_val_token_bytes']:,.0f}"
        print(f"whole validation split: {full['full_val_documents']} documents, {full['full_val_bytes']:,} bytes "
              f"({full['full_val_tokens']:,.0f} tokens scored in {full['full_val_seconds']:.0f}s{note})")
        model = f"model after {step} steps"
        width = max(len(model), len("xz -9e, same bytes"))
        print(f"  {model:<{width}}  {full['full_val_bpb']:.3f} bits per byte")
        print(f"  {'xz -9e, same bytes':<{width}}  {full['xz_bpb']:.3f} bits per byte")


if __name__ == "__main__":
    sys.exit(main())
