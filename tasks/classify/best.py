"""Model selection for classification runs: keep the params of the best periodic evaluation.

With task.best_by = val_accuracy (ties broken by the lower validation loss) or val_loss, every
evaluation that beats the best so far saves the params to RUN_DIR/best/checkpoints/<step>/ (one
kept) and then records its step and metrics in RUN_DIR/best/best.json, so a resumed run knows
what it has to beat and `evaluate.py classify` and the end-of-training report score those params.
With task.best_by = last nothing is kept and the newest checkpoint is the result.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax

BEST_DIR = "best"
RECORD = "best.json"


def is_better(candidate: dict, best: dict | None, best_by: str) -> bool:
    """Whether evaluation metrics `candidate` beat `best` (None: nothing yet) under `best_by`:
    higher val_accuracy with ties to the lower val_loss, or lower val_loss. A NaN loss never wins."""
    if best is None:
        return candidate["val_loss"] == candidate["val_loss"]  # not NaN
    if best_by == "val_accuracy":
        if candidate["val_accuracy"] != best["val_accuracy"]:
            return candidate["val_accuracy"] > best["val_accuracy"]
    return candidate["val_loss"] < best["val_loss"]


def best_step(evaluations: list[tuple[int, dict]], best_by: str) -> int | None:
    """The step whose metrics win under `best_by` (the earliest on a full tie); None if none do."""
    best, step = None, None
    for s, m in evaluations:
        if is_better(m, best, best_by):
            best, step = m, s
    return step


def read_record(run_dir: str | Path) -> dict | None:
    """{"step", "best_by", "metrics"} of a run's kept best params, or None when it has none."""
    path = Path(run_dir) / BEST_DIR / RECORD
    return json.loads(path.read_text()) if path.is_file() else None


class BestKeeper:
    """Saves the params of each evaluation that beats the best so far (side effects: files)."""

    def __init__(self, run_dir: str | Path, best_by: str):
        self.run_dir, self.best_by = Path(run_dir), best_by
        record = read_record(run_dir) if best_by != "last" else None
        # A record left by a run with another criterion cannot be compared with: start over.
        self.record = record if record is not None and record.get("best_by") == best_by else None

    @property
    def enabled(self) -> bool:
        return self.best_by != "last"

    def offer(self, step: int, metrics: dict, params) -> bool:
        """Keep `params` if `metrics` (validation, at `step`) beat the best so far; True if kept."""
        if not self.enabled or not is_better(metrics, self.record and self.record["metrics"], self.best_by):
            return False
        from store.checkpoint import Checkpointer
        from store.paths import write_atomic
        # Synchronous: best.json must never name a step whose params are not on disk yet.
        ckpt = Checkpointer(self.run_dir / BEST_DIR, keep=1, async_save=False)
        try:
            ckpt.save(step, params, meta={"step": step, "best_by": self.best_by}, force=True)
        finally:
            ckpt.close()
        self.record = {"step": step, "best_by": self.best_by,
                       "metrics": {k: float(v) for k, v in metrics.items()}}
        if jax.process_index() == 0:
            write_atomic(self.run_dir / BEST_DIR / RECORD, (json.dumps(self.record, indent=1) + "\n").encode())
        return True
