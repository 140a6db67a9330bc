"""Config sweeps: sweep files (spec), the trial loop (runner) over an executor (local subprocesses,
or Ray jobs: executor, local, ray_jobs), results (report)."""
from sweeps.spec import Axis, SweepError, SweepSpec, Trial, load_sweep

__all__ = ["Axis", "SweepError", "SweepSpec", "Trial", "load_sweep"]
