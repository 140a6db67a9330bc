"""GPU flash attention (Pallas interpret mode on CPU) against the reference: outputs and dq/dk/dv.
(Its Triton lowering for CUDA is checked in test_kernels_aot.py.)"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from model.kernels.gpu_flash import flash_attention_gpu
from model.kernels.reference import attention_reference
from test_kernels_common import TOL, assert_close, fresh_key, packed_segments, qkv, value_and_grads

# (B, T, S, N, K, H, dtype, causal, window, softcap, segments, block_q, block_kv)
CASES = [
    (1, 45, 45, 8, 2, 64, "float32", True, 13, 0.0, 2, 16, 16),     # G=4, segs + window, T%16
    (2, 20, 50, 4, 4, 128, "float32", False, 0, 9.0, 0, 16, 32),    # G=1, T != S, soft cap
    (1, 40, 40, 8, 1, 48, "bfloat16", True, 0, 0.0, 0, 16, 16),     # G=8, bf16, H padded to 64
]


def _run(B, T, S, N, K, H, dtype, causal, window, softcap, segments, bq, bk):
    dtype = jnp.dtype(dtype)
    q, k, v = qkv(B, T, S, N, K, H, dtype)
    w = jax.random.normal(fresh_key(), (B, T, N, H))
    kw = dict(causal=causal, sliding_window=window, logit_softcap=softcap)
    if segments:
        seg = packed_segments(B, S, segments)
        kw.update(q_segment_ids=seg[:, S - T:], kv_segment_ids=seg)
    o, grads = value_and_grads(lambda q, k, v: flash_attention_gpu(
        q, k, v, block_q=bq, block_kv=bk, interpret=True, **kw), q, k, v, w)
    o_ref, grads_ref = value_and_grads(lambda q, k, v: attention_reference(q, k, v, **kw),
                                       q, k, v, w)
    tol_o, tol_g = TOL[dtype.name]
    assert_close(o, o_ref, tol_o, "out")
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        assert g.dtype == dtype
        assert_close(g, g_ref, tol_g, f"d{name}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_gpu_flash_matches_reference(case):
    _run(*case)


@pytest.mark.slow
@pytest.mark.parametrize("G", [1, 2, 4, 8])
@pytest.mark.parametrize("H", [64, 128])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window,segments", [(0, 0), (11, 0), (0, 3)])
def test_gpu_flash_sweep(G, H, dtype, causal, window, segments):
    T, S = (37, 37) if causal else (21, 50)
    K = 1 if G == 8 else 2
    _run(1, T, S, K * G, K, H, dtype, causal, window, 0.0, segments, 16, 16)
