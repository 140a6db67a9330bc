"""Config sweeps: sweep files (spec), running trials as train.py subprocesses (runner), results (report)."""
from sweeps.spec import Axis, SweepError, SweepSpec, Trial, load_sweep

__all__ = ["Axis", "SweepError", "SweepSpec", "Trial", "load_sweep"]
