"""TPU flash attention (TPU interpret mode on CPU) against the pure-jnp reference: outputs and
dq/dk/dv, fp32 and bf16 (tolerances in test_kernels_common.py). Block sizes are small so that
T and S are not multiples of them and several blocks are skipped."""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import pytest

from model.kernels.reference import attention_reference
from model.kernels.tpu_flash import flash_attention
from test_kernels_common import TOL, assert_close, fresh_key, packed_segments, qkv, value_and_grads

# (B, T, S, N, K, H, dtype, causal, window, softcap, segments, block_q, block_kv)
CASES = [
    (1, 37, 37, 2, 2, 64, "float32", True, 0, 0.0, 2, 16, 16),      # G=1, T % block, segments
    (2, 20, 52, 4, 2, 128, "float32", False, 0, 0.0, 0, 16, 32),    # G=2, T != S, no causal
    (1, 40, 40, 8, 1, 64, "float32", True, 12, 20.0, 0, 16, 16),    # G=8, window + soft cap
    (1, 45, 45, 8, 2, 128, "bfloat16", True, 10, 0.0, 2, 16, 32),   # bf16, G=4, segs + window
    (1, 24, 40, 4, 2, 64, "bfloat16", False, 0, 5.0, 0, 16, 32),    # bf16, G=2, soft cap
]


def _run_case(B, T, S, N, K, H, dtype, causal, window, softcap, segments, bq, bk, positions=None):
    dtype = jnp.dtype(dtype)
    q, k, v = qkv(B, T, S, N, K, H, dtype)
    w = jax.random.normal(fresh_key(), (B, T, N, H), jnp.float32)
    kw = dict(causal=causal, sliding_window=window, logit_softcap=softcap)
    if segments:
        seg = packed_segments(B, S, segments)
        kw.update(q_segment_ids=seg[:, S - T:], kv_segment_ids=seg)
    if positions is not None:
        kw.update(q_positions=positions[0], kv_positions=positions[1])
    flash = jax.jit(lambda q, k, v: flash_attention(q, k, v, block_q=bq, block_kv=bk,
                                                    interpret=True, **kw))
    o, grads = value_and_grads(flash, q, k, v, w)
    o_ref, grads_ref = value_and_grads(lambda q, k, v: attention_reference(q, k, v, **kw),
                                       q, k, v, w)
    tol_o, tol_g = TOL[dtype.name]
    assert o.dtype == dtype
    assert_close(o, o_ref, tol_o, "out")
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        assert g.dtype == dtype
        assert_close(g, g_ref, tol_g, f"d{name}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_flash_matches_reference(case):
    _run_case(*case)


def test_flash_decode_positions_and_empty_rows():
    """Queries at explicit positions against a longer key range, and a padded query (segment 0
    against keys without segment 0) that must return zeros with zero, finite gradients."""
    B, T, S, N, K, H = 1, 6, 40, 4, 2, 64
    q, k, v = qkv(B, T, S, N, K, H, jnp.float32)
    q_pos = jnp.array([[30, 31, 32, 33, 34, 35]], jnp.int32)
    kv_pos = jnp.arange(S, dtype=jnp.int32)[None]
    q_seg = jnp.array([[1, 1, 1, 1, 1, 0]], jnp.int32)
    kv_seg = jnp.ones((B, S), jnp.int32)
    kw = dict(q_positions=q_pos, kv_positions=kv_pos, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
              causal=True, sliding_window=9)
    w = jax.random.normal(fresh_key(), (B, T, N, H))
    o, grads = value_and_grads(
        lambda q, k, v: flash_attention(q, k, v, block_q=8, block_kv=32, interpret=True, **kw),
        q, k, v, w)
    o_ref, grads_ref = value_and_grads(lambda q, k, v: attention_reference(q, k, v, **kw),
                                       q, k, v, w)
    assert float(jnp.abs(o[0, -1]).max()) == 0.0
    assert_close(o, o_ref, 1e-5, "out")
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        assert_close(g, g_ref, 1e-4, f"d{name}")


SWEEP = list(itertools.product(
    [1, 2, 4, 8],                  # G
    [64, 128],                     # H
    ["float32", "bfloat16"],
    [True, False],                 # causal
    [(0, 0), (11, 0), (0, 3)],     # (window, segments)
))


def test_default_blocks_per_generation():
    """Block sizes are keyed by the hardware table's generations, found from jax's device kinds."""
    from model.kernels.blocking import TPU_BLOCKS, default_blocks
    from sharding.hardware import TPU_GENERATIONS
    assert set(TPU_BLOCKS) == set(TPU_GENERATIONS)
    kinds = {"TPU v4": (512, 512), "TPU v5 lite": (512, 512), "TPU v5": (512, 1024),
             "TPU v6 lite": (512, 1024), "TPU7x": (512, 512)}
    assert {k: default_blocks("tpu", k) for k in kinds} == kinds
    assert default_blocks("cpu") == (128, 128)


@pytest.mark.slow
@pytest.mark.parametrize("G,H,dtype,causal,ws", SWEEP)
def test_flash_sweep(G, H, dtype, causal, ws):
    window, segments = ws
    T, S = (33, 33) if causal else (21, 50)
    _run_case(1, T, S, 2 * G if G < 8 else 8, 2 if G < 8 else 1, H, dtype, causal, window,
              7.5 if G == 2 else 0.0, segments, 16, 16)
