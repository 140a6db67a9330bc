"""Load average around a benchmark: a ratio taken on a busy machine is not a result.

Every bench script runs its main under `load_report()`, which prints the 1/5/15-minute load
average before and after, next to the core count, and warns when other work competed for the CPUs
(it skews the systems compared unequally): the reading before the run above the core count, or the
one after it above 1.25x the cores (the benchmark's own threads load every core up to 1.0x).
"""
from __future__ import annotations

import contextlib
import os
import sys


def report(when: str, limit: float = 1.0) -> bool:
    """Print 'load average before: 0.52 0.40 0.31 on 2 cores'; True if the 1-minute figure exceeds
    limit x the cores."""
    one, five, fifteen = os.getloadavg()
    cores = os.cpu_count() or 1
    print(f"load average {when}: {one:.2f} {five:.2f} {fifteen:.2f} on {cores} cores", flush=True)
    return one > limit * cores


@contextlib.contextmanager
def load_report():
    """Print the load average before and after the block; warn on stderr when it was busy."""
    busy = report("before")
    try:
        yield
    finally:
        busy |= report("after", limit=1.25)
        if busy:
            print("WARNING: the load average shows other work sharing the CPUs, so "
                  "these figures are not a result. Rerun on a quiet machine.", file=sys.stderr, flush=True)
