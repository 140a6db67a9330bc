"""Training metrics: throughput and MFU, and their sinks (metrics.jsonl, TensorBoard, console).

MFU = model FLOPs per second per device / the device's peak dense bf16 FLOP/s. Model FLOPs per
token come from model.stats.flops_per_token (6N plus causal attention, remat not counted).
"""
from __future__ import annotations

import math
import sys
import time

import jax

from sharding import hardware
from store.paths import JsonLines, run_path


def peak_flops(device=None) -> float | None:
    """Peak dense bf16 FLOP/s of a device (sharding/hardware.py), or None where unknown (CPU)."""
    device = device or jax.devices()[0]
    return hardware.peak_flops(device.platform, device.device_kind)


def throughput(tokens: float, seconds: float, flops_per_token: float, n_devices: int,
               peak: float | None) -> dict:
    """tokens/s, TFLOP/s per device and MFU (None without a known peak)."""
    tps = tokens / max(seconds, 1e-9)
    per_device = tps * flops_per_token / n_devices
    return {"tokens_per_s": tps, "tflops_per_device": per_device / 1e12,
            "mfu": per_device / peak if peak else None}


class MetricsLogger:
    """Writes metrics.jsonl and TensorBoard events, and a progress bar on the console.

    Only process 0 writes; other processes get a logger that does nothing.
    """

    def __init__(self, run_dir, total_steps: int, start_step: int = 0, enabled: bool = True):
        self.enabled = enabled and jax.process_index() == 0
        self.total, self.start, self.t0 = total_steps, start_step, time.time()
        if not self.enabled:
            return
        run_dir = run_path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = JsonLines(run_dir / "metrics.jsonl")
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(str(run_dir / "tensorboard"))  # a gs:// string is written by tensorboardX

    def log(self, step: int, metrics: dict) -> None:
        """Record one row of metrics for `step` to every sink."""
        if not self.enabled:
            return
        clean = {k: (float(v) if v is not None else None) for k, v in metrics.items()}
        self.jsonl.write({"step": step, **clean})
        for k, v in clean.items():
            if v is not None and math.isfinite(v):
                self.tb.add_scalar(k, v, step)

    def progress(self, step: int, metrics: dict) -> None:
        """One console line: step, loss, lr, throughput, MFU and ETA."""
        if not self.enabled:
            return
        done = step - self.start
        elapsed = time.time() - self.t0
        eta = elapsed / max(done, 1) * (self.total - step)
        mfu = metrics.get("mfu")
        parts = [f"step {step}/{self.total}", f"loss {metrics['loss']:.4f}", f"lr {metrics['lr']:.2e}",
                 f"gnorm {metrics['grad_norm']:.2f}", f"{metrics['tokens_per_s']:,.0f} tok/s",
                 f"{metrics['step_time']*1e3:.0f} ms/step",
                 f"{metrics['tflops_per_device']:.2f} TFLOP/s/dev",
                 f"MFU {'n/a' if mfu is None else f'{100*mfu:.1f}%'}", f"ETA {_fmt_time(eta)}"]
        bar = _bar(step / max(self.total, 1))
        print(f"{bar} " + " | ".join(parts), file=sys.stderr, flush=True)

    def flush(self) -> None:
        """Make the metrics logged so far durable (GCS: rewrite metrics.jsonl now)."""
        if self.enabled:
            self.jsonl.flush()
            self.tb.flush()

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


def _bar(fraction: float, width: int = 20) -> str:
    filled = int(round(fraction * width))
    return "[" + "#" * filled + "." * (width - filled) + f"] {100 * fraction:3.0f}%"


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
