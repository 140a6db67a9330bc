"""Entry scripts leave TPU out of jax's platforms on hosts without TPU chips (no libtpu noise)."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from sharding import platforms


def test_host_has_tpu_looks_for_accel_and_vfio_group_devices(tmp_path):
    assert not platforms.host_has_tpu(tmp_path)
    (tmp_path / "vfio").mkdir()
    (tmp_path / "vfio" / "vfio").touch()  # the vfio container node alone is not a chip
    assert not platforms.host_has_tpu(tmp_path)
    (tmp_path / "vfio" / "0").touch()     # v5p / v6e VMs: /dev/vfio/<group>
    assert platforms.host_has_tpu(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "accel0").touch()            # v2-v5e VMs: /dev/accel<N>
    assert platforms.host_has_tpu(other)


@pytest.mark.parametrize("env,tpu,plugins,amd,expected", [
    (None, False, set(), False, "cpu"),                              # CPU host with libtpu installed
    (None, False, {"xla_cuda12"}, False, "cuda,cpu"),                # jax skips cuda without a GPU
    (None, False, {"xla_cuda13", "xla_cuda12"}, False, "cuda,cpu"),
    (None, False, {"xla_rocm7"}, False, "cpu"),                      # rocm listed only with /dev/kfd
    (None, False, {"xla_rocm7"}, True, "rocm,cpu"),
    (None, False, {"xla_tpu"}, False, "cpu"),
    (None, False, {"some_vendor"}, False, None),                     # unknown plugin: jax decides
    (None, True, set(), False, None),                                # a TPU host: untouched
    ("", False, set(), False, None),                                 # the user's choice, even ""
    ("tpu", False, set(), False, None),
])
def test_choose_platforms(env, tpu, plugins, amd, expected):
    assert platforms.choose_platforms(env, tpu, plugins, amd) == expected


def test_installed_plugins_finds_namespace_modules(tmp_path, monkeypatch):
    pkg = tmp_path / "jax_plugins" / "xla_cuda12"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "jax_plugins", raising=False)
    assert "xla_cuda12" in platforms.installed_plugins()


SNIPPET = """
import os, sys
from sharding import platforms
platforms.host_has_tpu = lambda: False
platforms.installed_plugins = lambda: set()
if sys.argv[1] == "late":
    import jax
print(platforms.skip_absent_tpu(), os.environ.get("JAX_PLATFORMS"))
import jax
print(jax.config.jax_platforms, jax.devices()[0].platform)
"""


@pytest.mark.parametrize("when", ["early", "late"])
def test_skip_absent_tpu_sets_cpu_before_or_after_jax_import(when):
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    out = subprocess.run([sys.executable, "-c", SNIPPET, when], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()
    # Before jax is imported the choice goes to the environment (sweep trials inherit it);
    # after, to jax's config, leaving the environment alone.
    assert first == ("cpu cpu" if when == "early" else "cpu None")
    assert second == "cpu cpu"
    assert "TPU_WORKER_HOSTNAMES" not in out.stderr


def test_explicit_jax_platforms_is_left_alone():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    code = "from sharding import platforms; print(platforms.skip_absent_tpu())"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.strip() == "None"


@pytest.mark.skipif(platforms.host_has_tpu(), reason="a TPU host legitimately starts libtpu")
def test_dry_run_without_jax_platforms_prints_no_libtpu_errors():
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    out = subprocess.run([sys.executable, "train.py", "tiny", "--dry-run"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("# resolved config")
    for noise in ("Failed to find host bounds", "TPU_WORKER_HOSTNAMES", "INVALID_ARGUMENT"):
        assert noise not in out.stderr
