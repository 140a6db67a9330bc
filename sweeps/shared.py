"""One tokenizer for the whole sweep, trained once instead of once per trial.

train.py trains a sentencepiece tokenizer in each run directory when data.tokenizer is empty.
When no axis changes what the tokenizer is trained on (data.*, model.vocab_size, task.*), every
trial would train the same one; the sweep trains it once into SWEEP_DIR/tokenizer/ and passes
data.tokenizer=... to each trial. It is also what makes trials' val_loss comparable.

  python -m sweeps.shared CONFIG [key=value ...] --out SWEEP_DIR/tokenizer/tokenizer.model
"""
from __future__ import annotations

import os
import subprocess
import sys

from configs import ConfigError, load_config
from store.paths import as_path, run_path, write_atomic
from sweeps.spec import ROOT, SweepError, SweepSpec

TOKENIZER_KEYS = ("data.", "task.", "model.vocab_size")


def applies(spec: SweepSpec) -> bool:
    """Share a tokenizer when the sweep asks for it, none is given, and no axis changes it."""
    if not spec.share_tokenizer:
        return False
    if any(k.startswith(TOKENIZER_KEYS) for k in spec.keys):
        return False
    cfg = load_config(spec.base, list(spec.trials[0].overrides))  # data.* is the same in every trial
    return not cfg.data.tokenizer and cfg.task.kind == "lm"


def tokenizer_path(spec: SweepSpec):
    return spec.sweep_dir / "tokenizer" / "tokenizer.model"


def shared_tokenizer(spec: SweepSpec) -> tuple[tuple[str, ...], list[str] | None]:
    """(overrides to add to every trial, the command that trains the tokenizer), or ((), None)."""
    if not applies(spec):
        return (), None
    path = tokenizer_path(spec)
    cmd = ["python", "-m", "sweeps.shared", spec.base, *spec.trials[0].overrides, "--out", str(path)]
    return (f"data.tokenizer={path}",), cmd


def prepare(cmd: list[str], spec: SweepSpec) -> None:
    """Run the tokenizer command once (skipped when the tokenizer exists: a resumed sweep)."""
    from sweeps.local import die_with_parent
    from sweeps.runner import error_line, log
    path = tokenizer_path(spec)
    if path.is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    log(f"training the shared tokenizer into {path}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    from sweeps.runner import local_dir
    local_log = local_dir(spec) / "tokenizer-prepare.log"  # written here, copied beside the tokenizer
    local_log.parent.mkdir(parents=True, exist_ok=True)
    with open(local_log, "w") as logf:
        rc = subprocess.run([sys.executable, *cmd[1:]], stdout=logf, stderr=subprocess.STDOUT, env=env,
                            preexec_fn=die_with_parent).returncode
    write_atomic(path.parent / "prepare.log", local_log.read_bytes())
    if rc != 0 or not path.is_file():
        why = error_line(local_log, rc).removeprefix("error: ")
        raise SweepError(f"training the shared tokenizer failed: {why} (log: {path.parent / 'prepare.log'})")


def main(argv: list[str]) -> int:
    """Train the tokenizer train.py would train for CONFIG; --out must end in tokenizer.model."""
    if "--out" not in argv or argv.index("--out") + 1 >= len(argv) or argv.index("--out") == 0:
        print("usage: python -m sweeps.shared CONFIG [key=value ...] --out PATH", file=sys.stderr)
        return 2
    i = argv.index("--out")
    out, rest = as_path(argv[i + 1]), argv[:i] + argv[i + 2:]
    try:
        cfg = load_config(rest[0], rest[1:])
        import data
        tok = data.load_tokenizer(cfg, str(out.parent))  # trains into DIR/tokenizer.model, atomically
    except ConfigError as e:  # DataError included
        print(f"error: {e}", file=sys.stderr)
        return 2
    if run_path(tok.path) != run_path(out):
        write_atomic(out, run_path(tok.path).read_bytes())  # a half-written tokenizer never looks finished
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
