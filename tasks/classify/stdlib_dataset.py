"""The embedded default classification task, built offline from the Python standard library:
which top-level package a snippet of source code comes from.

Each example is a run of consecutive non-blank lines (dedented) from one module of a package.
Snippets are drawn with a fixed seed, capped per class so the classes stay roughly balanced,
and written as a CSV (id, text, label) that the ordinary CSV pipeline reads; the id names the
file and line, so predictions can be traced back to the source.
"""
from __future__ import annotations

import csv
import sysconfig
import textwrap
from pathlib import Path

import numpy as np

# Eight packages that ship as pure-Python source in every CPython build; test suites excluded.
PACKAGES = ("asyncio", "email", "xml", "multiprocessing", "unittest", "importlib", "http", "logging")
SNIPPET_LINES = 8
MAX_PER_CLASS = 500


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def package_snippets(package: str, root: Path, lines: int = SNIPPET_LINES) -> list[tuple[str, str]]:
    """(id, text) for every non-overlapping run of `lines` non-blank lines in a package's modules."""
    out = []
    for path in sorted((root / package).rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in ("test", "tests") for part in rel.parts):
            continue
        numbered = [(i + 1, s) for i, s in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines())
                    if s.strip()]
        for start in range(0, len(numbered) - lines + 1, lines):
            chunk = numbered[start:start + lines]
            out.append((f"{rel.as_posix()}:{chunk[0][0]}", textwrap.dedent("\n".join(s for _, s in chunk))))
    return out


def build_rows(seed: int = 0, max_per_class: int = MAX_PER_CLASS, packages=PACKAGES) -> list[tuple[str, str, str]]:
    """(id, text, label) rows, at most `max_per_class` per package, in a fixed order."""
    root = stdlib_dir()
    rng = np.random.default_rng(seed)
    rows = []
    for package in packages:
        snippets = package_snippets(package, root)
        if not snippets:
            raise FileNotFoundError(f"no source for package '{package}' under {root}")
        keep = np.sort(rng.permutation(len(snippets))[:max_per_class])
        rows += [(snippets[i][0], snippets[i][1], package) for i in keep]
    return rows


def held_out_rows(seed: int = 0, max_per_class: int = MAX_PER_CLASS, test_per_class: int = 100,
                  packages=PACKAGES) -> list[tuple[str, str, str]]:
    """(id, text, label) rows that build_rows(seed, max_per_class) did not draw: a test set no run
    of the task has trained or selected on; at most `test_per_class` per package (fewer where the
    package has no more snippets)."""
    taken = {row[0] for row in build_rows(seed, max_per_class, packages)}
    rng = np.random.default_rng((seed, 1))
    root, rows = stdlib_dir(), []
    for package in packages:
        rest = [s for s in package_snippets(package, root) if s[0] not in taken]
        keep = np.sort(rng.permutation(len(rest))[:test_per_class])
        rows += [(rest[i][0], rest[i][1], package) for i in keep]
    return rows


def write_csv(path: str | Path, seed: int = 0, max_per_class: int = MAX_PER_CLASS, held_out: bool = False) -> Path:
    """Write the dataset (or, with `held_out`, its test set) to `path` (columns id, text, label)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "label"])
        w.writerows(held_out_rows(seed, max_per_class) if held_out else build_rows(seed, max_per_class))
    tmp.replace(path)
    return path


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="Write the embedded stdlib task's CSV, or its held-out test CSV.")
    ap.add_argument("out")
    ap.add_argument("--test", action="store_true", help="snippets the task did not draw (<= 100 per package)")
    ap.add_argument("--seed", type=int, default=0, help="data.shuffle_seed of the run")
    a = ap.parse_args()
    print(write_csv(a.out, a.seed, held_out=a.test))
