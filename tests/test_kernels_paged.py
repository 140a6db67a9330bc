"""Paged decode attention kernels (TPU kernel in TPU interpret mode, GPU kernel in Pallas interpret
mode, and the blocked jnp loop of paged_xla.py) against paged_reference.py: random page tables and lengths, including an inactive slot
(length 0), length 1 / T and a full cache; bf16, fp32 and int8 (with scales) pages."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from model.kernels.gpu_paged import paged_attention_gpu
from model.kernels.paged_reference import decode_positions, paged_attention_reference
from model.kernels.paged_xla import paged_attention_blocked
from model.kernels.reference import attention_reference
from model.kernels.tpu_paged import paged_attention_tpu
from test_kernels_common import TOL, assert_close, fresh_key



def _blocked(q, kp, vp, table, lengths, **kw):
    """paged_xla's loop in the decode convention, two pages per block (so several iterations)."""
    q_pos = decode_positions(lengths, q.shape[1], 1)[0]
    return paged_attention_blocked(q, kp, vp, table, q_pos, lengths, block_tokens=2 * kp.shape[1], **kw)


KERNELS = {"tpu": lambda *a, **kw: paged_attention_tpu(*a, pages_per_step=2, interpret=True, **kw),
           "gpu": lambda *a, **kw: paged_attention_gpu(*a, pages_per_chunk=2, interpret=True, **kw),
           "xla": _blocked}


def make_cache(B, T, N, K, H, P, ps, M, kv_dtype, q_dtype=jnp.float32):
    """Random q, pages (int8 with scales, or float), a random page table of distinct pages and
    lengths covering: inactive (0), the minimum (T), a full cache, and random ones."""
    keys = jax.random.split(fresh_key(), 8)
    q = jax.random.normal(keys[0], (B, T, N, H), q_dtype)
    if kv_dtype == "int8":
        kp = jax.random.randint(keys[1], (P, ps, K, H), -127, 128, jnp.int8)
        vp = jax.random.randint(keys[2], (P, ps, K, H), -127, 128, jnp.int8)
        ks = jax.random.uniform(keys[3], (P, ps, K), minval=0.002, maxval=0.02)
        vs = jax.random.uniform(keys[4], (P, ps, K), minval=0.002, maxval=0.02)
    else:
        kp = jax.random.normal(keys[1], (P, ps, K, H), kv_dtype)
        vp = jax.random.normal(keys[2], (P, ps, K, H), kv_dtype)
        ks = vs = None
    table = jax.random.permutation(keys[5], P)[:B * M].reshape(B, M).astype(jnp.int32)
    fixed = jnp.array([0, T, M * ps], jnp.int32)
    rand = jax.random.randint(keys[6], (B,), T, M * ps + 1)
    lengths = jnp.where(jnp.arange(B) < 3, fixed[jnp.minimum(jnp.arange(B), 2)], rand)
    return q, kp, vp, table, lengths.astype(jnp.int32), ks, vs


# (B, T, N, K, H, P, ps, M, kv dtype, q dtype, window, softcap)
CASES = [
    (4, 1, 8, 2, 64, 24, 8, 5, "bfloat16", "bfloat16", 0, 0.0),   # one token, G=4, length 1
    (3, 3, 4, 4, 128, 16, 8, 4, "float32", "float32", 9, 0.0),    # T=3, G=1, sliding window
    (4, 4, 8, 1, 64, 24, 8, 5, "int8", "float32", 0, 30.0),       # int8 + scales, G=8, soft cap
]


@pytest.mark.parametrize("platform", ["tpu", "gpu", "xla"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_paged_matches_reference(platform, case):
    B, T, N, K, H, P, ps, M, kv_dtype, q_dtype, window, softcap = case
    q, kp, vp, table, lengths, ks, vs = make_cache(B, T, N, K, H, P, ps, M, jnp.dtype(kv_dtype)
                                                   if kv_dtype != "int8" else "int8",
                                                   jnp.dtype(q_dtype))
    kw = dict(k_scales=ks, v_scales=vs, sliding_window=window, logit_softcap=softcap)
    out = jax.jit(lambda *a: KERNELS[platform](*a, **kw))(q, kp, vp, table, lengths)
    ref = paged_attention_reference(q, kp, vp, table, lengths, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert float(jnp.abs(out[0]).max()) == 0.0  # inactive slot
    assert_close(out, ref, TOL[jnp.dtype(q_dtype).name][0] * (3 if kv_dtype == "int8" else 1),
                 f"{platform} paged")


@pytest.mark.slow
@pytest.mark.parametrize("platform", ["tpu", "gpu"])
@pytest.mark.parametrize("T", [1, 2, 8])
@pytest.mark.parametrize("G", [1, 2, 4, 8])
@pytest.mark.parametrize("kv_dtype", ["bfloat16", "int8"])
def test_paged_sweep(platform, T, G, kv_dtype):
    K, H, P, ps, M = 2, 64, 40, 8, 6
    q, kp, vp, table, lengths, ks, vs = make_cache(5, T, K * G, K, H, P, ps, M,
                                                   jnp.dtype(kv_dtype) if kv_dtype != "int8"
                                                   else "int8")
    kw = dict(k_scales=ks, v_scales=vs, sliding_window=13 if G == 2 else 0)
    out = KERNELS[platform](q, kp, vp, table, lengths, **kw)
    assert_close(out, paged_attention_reference(q, kp, vp, table, lengths, **kw), 3e-5, "paged")


@pytest.mark.parametrize("window", [0, 11])
@pytest.mark.parametrize("kv_dtype", ["float32", "int8"])
def test_blocked_chunk_matches_dense_attention(window, kv_dtype):
    """Chunked prefill: T=12 queries at explicit positions 20..31 of which the last 3 are padding
    (past the length 29), against dense causal attention over the sequence's gathered keys."""
    B, T, N, K, H, P, ps, M = 1, 12, 4, 2, 16, 24, 4, 10
    q, kp, vp, table, _, ks, vs = make_cache(B, T, N, K, H, P, ps, M, kv_dtype if kv_dtype == "int8"
                                             else jnp.float32)
    length, start = 29, 20
    q_pos = (start + jnp.arange(T, dtype=jnp.int32))[None]                    # [1,T]
    kw = dict(k_scales=ks, v_scales=vs, sliding_window=window)
    out = paged_attention_blocked(q, kp, vp, table, q_pos, jnp.array([length]), block_tokens=8, **kw)
    dense = lambda pages, scales: (pages[table[0]].astype(jnp.float32) * (
        1.0 if scales is None else scales[table[0]][..., None])).reshape(1, M * ps, K, H)
    kv_pos = jnp.arange(M * ps, dtype=jnp.int32)[None]
    ref = attention_reference(q, dense(kp, ks), dense(vp, vs), q_positions=q_pos, kv_positions=kv_pos,
                              q_segment_ids=jnp.zeros((1, T), jnp.int32),
                              kv_segment_ids=jnp.where(kv_pos < length, 0, -1), causal=True,
                              sliding_window=window)
    valid = start + T - 3 - start
    assert_close(out[:, :valid], ref[:, :valid], 3e-5, "blocked chunk")
    assert float(jnp.abs(out[:, valid:]).max()) == 0.0  # padding rows see no key
