"""Shared helpers of the kernel tests: fresh random inputs and scale-relative error checks.

Tolerances are relative to the largest magnitude of the reference (so one number works for
outputs and gradients of any scale):
  fp32 inputs: outputs 1e-5, gradients 1e-4 (fp32 accumulation; only summation order differs)
  bf16 inputs: outputs 2e-2, gradients 4e-2 (p and dS are rounded to bf16 before the PV / dS.K
               matmuls, as on the MXU; the reference keeps them in fp32)
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

TOL = {"float32": (1e-5, 1e-4), "bfloat16": (2e-2, 4e-2)}
_counter = itertools.count(1)


def fresh_key():
    """A new PRNG key per call: every case gets fresh inputs (never zeros)."""
    return jax.random.key(next(_counter) * 7919)


def qkv(B, T, S, N, K, H, dtype):
    """Random normal q [B,T,N,H], k/v [B,S,K,H] in dtype."""
    kq, kk, kv = jax.random.split(fresh_key(), 3)
    return (jax.random.normal(kq, (B, T, N, H), dtype), jax.random.normal(kk, (B, S, K, H), dtype),
            jax.random.normal(kv, (B, S, K, H), dtype))


def packed_segments(B, L, n_segments):
    """[B, L] sorted segment ids 1..n_segments with random boundaries (packed rows)."""
    key = fresh_key()
    cuts = jnp.sort(jax.random.randint(key, (B, n_segments - 1), 1, L), axis=-1)
    return 1 + (jnp.arange(L)[None, :, None] >= cuts[:, None, :]).sum(-1).astype(jnp.int32)


def assert_close(actual, expected, tol, what=""):
    """max |a - e| <= tol * max |e| (plus a tiny floor), with a readable failure message."""
    a = np.asarray(jnp.asarray(actual, jnp.float32))
    e = np.asarray(jnp.asarray(expected, jnp.float32))
    assert a.shape == e.shape, (what, a.shape, e.shape)
    assert np.all(np.isfinite(a)), f"{what}: non-finite values"
    err, scale = np.abs(a - e).max(), max(np.abs(e).max(), 1e-6)
    assert err <= tol * scale + 1e-6, f"{what}: max err {err:.3e} > {tol} x {scale:.3e}"


def value_and_grads(fn, q, k, v, w):
    """Output and d(sum(o * w))/d(q, k, v) of fn(q, k, v), w a random cotangent."""
    def loss(q, k, v):
        o = fn(q, k, v)
        return jnp.sum(o.astype(jnp.float32) * w), o
    (_, o), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return o, grads
