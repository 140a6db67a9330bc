"""The blocked causal path of the xla attention (model/kernels/xla_causal.py) against the reference:
packed rows, GQA, sliding windows, soft caps, uneven last blocks, gradients, bf16 inputs, and the
padding rule (real tokens exact; padding may see less)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.attention import attention
from model.kernels.reference import attention_reference
from model.kernels.xla_causal import causal_self_attention, key_spans
from test_kernels_common import assert_close, packed_segments, qkv


def packed_positions(seg):
    """Positions 0.. restarting at every segment boundary, as the packer writes them."""
    T = seg.shape[1]
    idx = jnp.broadcast_to(jnp.arange(T), seg.shape)
    start = jnp.where(jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], 1), idx, 0)
    return (idx - jax.lax.cummax(start, axis=1)).astype(jnp.int32)


def test_key_spans_cover_the_causal_and_window_ranges():
    assert key_spans(10, 4) == [(0, 4, 0, 4), (4, 8, 0, 8), (8, 10, 0, 10)]
    assert key_spans(10, 4, sliding_window=3) == [(0, 4, 0, 4), (4, 8, 2, 8), (8, 10, 6, 10)]


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("window,softcap,block", [(0, 0.0, 8), (7, 0.0, 8), (0, 20.0, 16), (12, 5.0, 5)])
def test_blocked_matches_reference_on_packed_rows(window, softcap, block, recompute):
    B, T, N, K, H = 2, 37, 4, 2, 16
    q, k, v = qkv(B, T, T, N, K, H, jnp.float32)
    seg = packed_segments(B, T, 3)
    pos = packed_positions(seg)
    kw = dict(sliding_window=window, logit_softcap=softcap)
    ref = attention_reference(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos,
                              kv_positions=pos, **kw)
    out = causal_self_attention(q, k, v, pos, seg, block=block, recompute=recompute, **kw)
    assert_close(out, ref, 1e-5, "output")


@pytest.mark.parametrize("recompute,softcap", [(False, 0.0), (True, 0.0), (True, 5.0)])
def test_blocked_gradients_match_reference(recompute, softcap):
    """Both backwards: autodiff through the saved probabilities, and the custom VJP that
    recomputes them from the log-sum-exp."""
    B, T, N, K, H = 2, 40, 4, 4, 8
    q, k, v = qkv(B, T, T, N, K, H, jnp.float32)
    seg = packed_segments(B, T, 2)
    pos = packed_positions(seg)
    w = jax.random.normal(jax.random.key(1), q.shape)

    def grads(fn):
        return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2))(q, k, v)
    ref = grads(lambda q, k, v: attention_reference(q, k, v, q_segment_ids=seg, kv_segment_ids=seg,
                                                    q_positions=pos, kv_positions=pos, sliding_window=9,
                                                    logit_softcap=softcap))
    out = grads(lambda q, k, v: causal_self_attention(q, k, v, pos, seg, sliding_window=9, block=8,
                                                      logit_softcap=softcap, recompute=recompute))
    for name, a, e in zip("qkv", out, ref):
        assert_close(a, e, 1e-5, f"d{name}")


def test_bf16_inputs_close_to_fp32_reference():
    """bf16 q/k/v: probabilities meet V in bf16 with fp32 accumulation, within bf16 rounding."""
    B, T, N, K, H = 1, 64, 4, 2, 32
    q, k, v = qkv(B, T, T, N, K, H, jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    ref = attention_reference(q, k, v)
    out = causal_self_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), pos, block=16)
    assert out.dtype == jnp.bfloat16
    assert_close(out, ref, 3e-2, "bf16")


def test_attention_entry_point_uses_it_only_for_self_attention():
    """self_attention=True on the xla impl gives the reference's real-token outputs; padding
    (segment 0, positions 0) sees only earlier padding, so only padding rows may differ."""
    B, T, N, K, H = 2, 150, 2, 1, 8  # three blocks of the default 64 rows
    q, k, v = qkv(B, T, T, N, K, H, jnp.float32)
    seg = jnp.where(jnp.arange(T) < 100, 1, 0)[None].repeat(B, 0).astype(jnp.int32)
    pos = jnp.where(seg > 0, jnp.arange(T), 0).astype(jnp.int32)
    kw = dict(q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos, kv_positions=pos, impl="xla")
    ref = attention(q, k, v, **kw)
    out = attention(q, k, v, self_attention=True, **kw)
    real = np.asarray(seg > 0)
    assert_close(np.asarray(out)[real], np.asarray(ref)[real], 1e-5, "real tokens")
    assert not np.allclose(np.asarray(out)[~real], np.asarray(ref)[~real]), "padding saw later padding"


def test_recompute_is_chosen_by_the_size_of_the_saved_probabilities(monkeypatch):
    """recompute=None: the custom VJP only where a row's saved fp32 probabilities would pass
    RECOMPUTE_ABOVE_BYTES (here 8 heads x 9/16 of 512 x 512 x 4 bytes = 4.5 MiB per row)."""
    from model.kernels import xla_causal
    q, k, v = qkv(1, 512, 512, 8, 2, 8, jnp.float32)
    pos = jnp.arange(512, dtype=jnp.int32)[None]
    jaxpr = lambda: str(jax.make_jaxpr(lambda q: causal_self_attention(q, k, v, pos))(q))
    assert "custom_vjp" not in jaxpr()
    monkeypatch.setattr(xla_causal, "RECOMPUTE_ABOVE_BYTES", 4 << 20)
    assert "custom_vjp" in jaxpr()
