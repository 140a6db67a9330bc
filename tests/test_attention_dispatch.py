"""model.attention dispatch: impl=pallas on CPU runs the TPU kernel in TPU interpret mode (also
under jax.grad and through shard_map on a mesh), cudnn runs jax.nn.dot_product_attention, auto
resolves by platform, and paged_attention dispatches the same way."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from model.attention import attention, paged_attention, resolve_impl
from test_kernels_common import assert_close, packed_segments, qkv
from test_kernels_paged import make_cache


def test_resolve_impl():
    assert resolve_impl("auto", platform="tpu") == "pallas"
    assert resolve_impl("auto", platform="gpu") == "cudnn"
    assert resolve_impl("auto", platform="gpu", logit_softcap=30.0) == "pallas"
    assert resolve_impl("auto", platform="cpu") == "xla"
    assert resolve_impl("xla") == "xla"
    with pytest.raises(ValueError, match="attention_impl"):
        resolve_impl("flash")


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_pallas_grad_on_mesh_matches_xla(axis_type):
    """Sharded over data x tensor (batch and kv heads), differentiated, vs the xla path."""
    B, T, N, K, H = 2, 24, 4, 2, 32
    q, k, v = qkv(B, T, T, N, K, H, jnp.float32)
    seg = packed_segments(B, T, 2)
    mesh = jax.make_mesh((2, 1, 2), ("data", "fsdp", "tensor"), axis_types=(axis_type,) * 3,
                         devices=jax.devices()[:4])

    def loss(impl):
        def f(q, k, v):
            o = attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, sliding_window=10,
                          impl=impl, block_q=8, block_kv=16)
            return jnp.sum(jnp.sin(o))
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))

    with jax.set_mesh(mesh):
        val, grads = loss("pallas")(q, k, v)
    val_ref, grads_ref = loss("xla")(q, k, v)
    assert_close(val, val_ref, 1e-5, "loss")
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        assert_close(g, g_ref, 1e-4, f"d{name}")


def test_cudnn_impl_matches_xla():
    """The cudnn impl (XLA path of jax.nn.dot_product_attention on CPU): default positions,
    then explicit segments with an empty query row, which must come back as zeros."""
    B, T, N, K, H = 2, 16, 4, 2, 32
    q, k, v = qkv(B, T, T, N, K, H, jnp.float32)
    assert_close(attention(q, k, v, impl="cudnn", sliding_window=5),
                 attention(q, k, v, impl="xla", sliding_window=5), 1e-5, "cudnn default")
    q_seg = packed_segments(B, T, 3).at[:, -1].set(99)
    kv_seg = q_seg.at[:, -1].set(98)
    kw = dict(q_segment_ids=q_seg, kv_segment_ids=kv_seg)
    out = attention(q, k, v, impl="cudnn", **kw)
    assert float(jnp.abs(out[:, -1]).max()) == 0.0
    assert_close(out, attention(q, k, v, impl="xla", **kw), 1e-5, "cudnn segments")
    with pytest.raises(ValueError, match="soft cap"):
        attention(q, k, v, impl="cudnn", logit_softcap=5.0)


def test_paged_dispatch_on_mesh():
    q, kp, vp, table, lengths, ks, vs = make_cache(4, 2, 4, 2, 32, 16, 4, 3, "int8")
    mesh = jax.make_mesh((2, 1, 2), ("data", "fsdp", "tensor"),
                         axis_types=(AxisType.Explicit,) * 3, devices=jax.devices()[:4])
    kw = dict(k_scales=ks, v_scales=vs, sliding_window=6)
    with jax.set_mesh(mesh):
        out = jax.jit(lambda *a: paged_attention(*a, impl="pallas", **kw))(
            q, kp, vp, table, lengths)
    ref = paged_attention(q, kp, vp, table, lengths, impl="auto", **kw)  # auto = xla on CPU
    assert_close(out, ref, 3e-5, "paged pallas on mesh")
    assert float(np.abs(np.asarray(out)[0]).max()) == 0.0  # inactive slot
