"""The packages import each other in one direction only (docs/architecture.md draws the graph)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("configs", "sharding", "model", "store", "data", "interop", "training", "serving", "aot",
            "tasks", "sweeps")
# Bottom to top: a package may import only packages listed before it (and itself).
LAYERS = PACKAGES


def package_imports() -> dict[str, set[str]]:
    """{package: project packages its modules import}, lazy (in-function) imports included."""
    graph = {p: set() for p in PACKAGES}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                else:
                    continue
                graph[pkg] |= {n.split(".")[0] for n in names if n.split(".")[0] in PACKAGES} - {pkg}
    return graph


def test_packages_import_only_lower_layers():
    graph = package_imports()
    upward = [f"{pkg} imports {dep}" for pkg, deps in graph.items() for dep in deps
              if LAYERS.index(dep) > LAYERS.index(pkg)]
    assert not upward, upward


def test_nothing_claims_top_level_names_in_site_packages(tmp_path):
    """pyproject installs dependencies only: from another directory our packages are not importable,
    and a user's own `configs/` folder cannot shadow ours when an entry script runs."""
    import subprocess
    import sys
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "__init__.py").write_text("raise ImportError('the user folder')\n")
    probe = "import importlib.util as u; print([n for n in ('model', 'training', 'serving', 'evaluate', 'interop') " \
            "if (s := u.find_spec(n)) and str(s.origin or '').startswith(%r)])" % str(ROOT)
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
    help_ = subprocess.run([sys.executable, str(ROOT / "compile.py"), "--help"], cwd=tmp_path,
                           capture_output=True, text=True)
    assert help_.returncode == 0 and "topology" in help_.stdout, help_.stderr
