"""Which jax backends an entry script tries: TPU only on hosts that have TPU chips.

libtpu is installed by the `[tpu]` extra (and by `make test`) because compile.py compiles for TPU
topologies on any host. With it installed and JAX_PLATFORMS unset, jax tries the TPU backend first
on every host, and on a host without chips libtpu prints "Failed to find host bounds for accelerator
type ... TPU_WORKER_HOSTNAMES" errors before jax falls back. Entry scripts (train.py, serve.py,
evaluate.py, sweep.py, `python -m interop.hf`, bench/attention_gpu.py) call `skip_absent_tpu()`
before jax initialises its backends; compile.py does not (its compile-only TPU topologies come
from libtpu and work with any jax_platforms).

Rules, all conservative (when in doubt jax's own default is kept):
  - JAX_PLATFORMS set in the environment (even to "") or jax_platforms already configured: untouched.
  - A TPU host (a /dev/accel* device, or /dev/vfio/<digits> as on newer TPU VMs): untouched.
  - Otherwise jax_platforms becomes the installed accelerator plugins it can use, then cpu:
    "cuda,cpu" with a CUDA PJRT plugin (jax itself skips cuda when no NVIDIA device is visible,
    and fails loudly on a broken plugin either way), "rocm,cpu" with a ROCm plugin and /dev/kfd,
    else "cpu". An unknown plugin leaves jax's default alone (we cannot name its platform).
"""
from __future__ import annotations

import importlib.util
import os
import pkgutil
import sys
from importlib.metadata import entry_points
from pathlib import Path


def host_has_tpu(dev: str | os.PathLike = "/dev") -> bool:
    """Whether this host exposes TPU chips: /dev/accel* (v2-v5e VMs) or /dev/vfio/<n> (v5p, v6e)."""
    dev = Path(dev)
    if any(dev.glob("accel*")):
        return True
    vfio = dev / "vfio"
    try:
        return any(p.name.isdigit() for p in vfio.iterdir())
    except OSError:
        return False


def installed_plugins() -> set[str]:
    """Names of installed jax PJRT plugins (modules of the `jax_plugins` namespace package and
    `jax_plugins` entry points, e.g. 'xla_cuda12'), found without importing jax or the plugins."""
    names = {ep.name for ep in entry_points(group="jax_plugins")}
    try:
        spec = importlib.util.find_spec("jax_plugins")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        names |= {m.name for m in pkgutil.iter_modules(list(spec.submodule_search_locations))}
    return names


def choose_platforms(env: str | None, has_tpu: bool, plugins: set[str], has_amd_gpu: bool) -> str | None:
    """The jax_platforms value to set, or None to leave jax's default (see the module doc)."""
    if env is not None or has_tpu:
        return None
    platforms = []
    for name in sorted(plugins):
        low = name.lower()
        if "cuda" in low:
            platforms.append("cuda")
        elif "rocm" in low:
            if has_amd_gpu:
                platforms.append("rocm")
        elif "tpu" not in low:
            return None  # a plugin we cannot name a platform for: keep jax's default
    return ",".join(dict.fromkeys(platforms + ["cpu"]))


def skip_absent_tpu() -> str | None:
    """Leave TPU out of the platforms jax tries when this host has none; returns what was set."""
    jax = sys.modules.get("jax")
    if jax is not None and jax.config.jax_platforms:
        return None  # configured in code already
    value = choose_platforms(os.environ.get("JAX_PLATFORMS"), host_has_tpu(), installed_plugins(),
                             os.path.exists("/dev/kfd"))
    if value is None:
        return None
    if jax is not None:
        jax.config.update("jax_platforms", value)
    else:  # read by jax when it is imported; child processes (sweep trials) inherit the choice
        os.environ["JAX_PLATFORMS"] = value
    return value
