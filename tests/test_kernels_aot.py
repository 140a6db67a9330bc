"""Ahead-of-time checks that the kernels lower for real hardware from this CPU host:
every TPU kernel (flash forward, forward+backward, paged decode bf16/int8) compiles through
libtpu (Mosaic) for v5e and v6e topologies, and the GPU kernels lower to Triton for CUDA."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import pytest

from model.kernels.gpu_flash import flash_attention_gpu
from model.kernels.gpu_paged import paged_attention_gpu
from model.kernels.tpu_flash import flash_attention
from model.kernels.tpu_paged import paged_attention_tpu

B, T, N, K, H = 1, 1024, 8, 2, 128
PAGES, PS, M = 256, 16, 32


def _tpu_device(topology: str):
    try:
        import libtpu  # noqa: F401
    except ImportError:
        pytest.skip("libtpu is not installed: cannot compile for TPU topologies (pip install libtpu)")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # Several processes on one host may compile for TPU at once (pytest -n, other engineers).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    return topologies.get_topology_desc(topology, "tpu").devices[0]


def _abstract(device, *shapes):
    sharding = jax.sharding.SingleDeviceSharding(device)
    return [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in shapes]


def _flash_fns(kind):
    kw = dict(causal=True, sliding_window=512, logit_softcap=30.0, interpret=False,
              device_kind=kind)
    fwd = lambda q, k, v: flash_attention(q, k, v, **kw)                       # noqa: E731
    grad = jax.grad(lambda q, k, v: fwd(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))
    return fwd, grad


@pytest.mark.parametrize("topology", ["v5e:2x2", "v6e:2x2"])
def test_tpu_flash_compiles(topology):
    dev = _tpu_device(topology)
    args = _abstract(dev, ((B, T, N, H), jnp.bfloat16), ((B, T, K, H), jnp.bfloat16),
                     ((B, T, K, H), jnp.bfloat16))
    fwd, grad = _flash_fns(dev.device_kind)
    for fn in (fwd, grad):
        compiled = jax.jit(fn).lower(*args).compile()
        assert compiled.memory_analysis() is not None
        assert compiled.cost_analysis()["flops"] > 0  # the CostEstimate reached XLA


@pytest.mark.parametrize("topology", ["v5e:2x2", "v6e:2x2"])
@pytest.mark.parametrize("kv_dtype", ["bfloat16", "int8"])
def test_tpu_paged_compiles(topology, kv_dtype):
    dev = _tpu_device(topology)
    dt = jnp.dtype(kv_dtype)
    shapes = [((8, 4, 4 * K, H), jnp.bfloat16), ((PAGES, PS, K, H), dt), ((PAGES, PS, K, H), dt),
              ((8, M), jnp.int32), ((8,), jnp.int32)]
    if kv_dtype == "int8":
        shapes += [((PAGES, PS, K), jnp.float32)] * 2

    def fn(q, kp, vp, table, lengths, *scales):
        return paged_attention_tpu(q, kp, vp, table, lengths, sliding_window=300,
                                   k_scales=scales[0] if scales else None,
                                   v_scales=scales[1] if scales else None, interpret=False)
    compiled = jax.jit(fn).lower(*_abstract(dev, *shapes)).compile()
    assert compiled.cost_analysis()["flops"] > 0


def _cuda_export(fn, *shapes):
    from jax import export
    args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    try:
        exp = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*args)
    except (ImportError, NotImplementedError) as e:  # a jaxlib built without Triton bindings
        pytest.skip(f"cannot lower Pallas Triton kernels on this host: {e}")
    assert "xla.gpu.triton" in exp.mlir_module()


def test_gpu_kernels_lower_to_triton():
    """Forward, backward and paged decode lower to Triton IR for CUDA (no GPU needed)."""
    shapes = [((1, 256, 8, 128), jnp.bfloat16), ((1, 256, 2, 128), jnp.bfloat16),
              ((1, 256, 2, 128), jnp.bfloat16)]
    kw = dict(causal=True, sliding_window=100, logit_softcap=20.0, interpret=False)
    fwd = lambda q, k, v: flash_attention_gpu(q, k, v, **kw)                   # noqa: E731
    _cuda_export(fwd, *shapes)
    _cuda_export(jax.grad(lambda q, k, v: fwd(q, k, v).astype(jnp.float32).sum(),
                          argnums=(0, 1, 2)), *shapes)
    paged = [((4, 2, 8, 128), jnp.bfloat16), ((64, 16, 2, 128), jnp.int8),
             ((64, 16, 2, 128), jnp.int8), ((4, 8), jnp.int32), ((4,), jnp.int32),
             ((64, 16, 2), jnp.float32), ((64, 16, 2), jnp.float32)]
    _cuda_export(lambda q, kp, vp, t, ln, ks, vs: paged_attention_gpu(
        q, kp, vp, t, ln, k_scales=ks, v_scales=vs, interpret=False), *paged)
