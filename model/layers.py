"""Stateless building blocks: parameter declaration, linear maps, RMSNorm, RoPE, dtype policy."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from configs import ModelConfig
from model.attention import target_platform  # the compile target: a TPU when compiling AOT


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], dtype, init: str | float = "normal",
          std: float = 0.02) -> nnx.Param:
    """An nnx.Param carrying its logical axis names (read by sharding.rules); init is normal,
    ones, zeros or a constant fill value."""
    assert len(shape) == len(axes), (shape, axes)
    if isinstance(init, float):
        value = jnp.full(shape, init, jnp.float32)
    elif init == "normal":
        value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    elif init == "ones":
        value = jnp.ones(shape, jnp.float32)
    else:
        value = jnp.zeros(shape, jnp.float32)
    return nnx.Param(value.astype(dtype), axes=axes)


def resolve_compute_dtype(setting: str, platform: str) -> str:
    """model.compute_dtype for a platform: `auto` is bfloat16 on TPU/GPU and float32 on CPU
    (bf16 is no faster there); an explicit dtype stays. The one rule, also used for AOT targets."""
    if setting != "auto":
        return setting
    return "float32" if platform == "cpu" else "bfloat16"


def compute_dtype(cfg: ModelConfig):
    """The activation dtype on this host's backend."""
    return jnp.dtype(resolve_compute_dtype(cfg.compute_dtype, jax.default_backend()))


def linear(eq: str, x: jax.Array, w) -> jax.Array:
    """The one matmul: einsum of activations with a weight (a plain array or a quantized array)."""
    if hasattr(w, "matmul"):  # model.quant.QArray: int8 values + scales
        return w.matmul(eq, x)
    return jnp.einsum(eq, x, w.astype(x.dtype))


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, offset: float = 0.0) -> jax.Array:
    """RMSNorm over the last axis, statistics in fp32, times (offset + scale) (Gemma: offset 1)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * (offset + scale.astype(jnp.float32))).astype(x.dtype)


def rope_frequencies(cfg: ModelConfig, local: bool = False) -> jax.Array:
    """[H/2] inverse frequencies. Global layers: rope_theta, scaled (Llama-3.1 or linear) when
    rope_scaling_factor > 0; local layers: rope_local_theta (or rope_theta), never scaled."""
    H = cfg.resolved_head_dim
    theta = (cfg.rope_local_theta or cfg.rope_theta) if local else cfg.rope_theta
    inv = 1.0 / theta ** (jnp.arange(0, H, 2, dtype=jnp.float32) / H)
    if cfg.rope_scaling_factor <= 0 or local:
        return inv
    if cfg.rope_scaling_type == "linear":
        return inv / cfg.rope_scaling_factor
    factor, low, high = cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / inv
    low_wavelen = cfg.rope_original_max_len / low
    high_wavelen = cfg.rope_original_max_len / high
    smooth = (cfg.rope_original_max_len / wavelen - low) / (high - low)
    mid = (1 - smooth) * inv / factor + smooth * inv
    return jnp.where(wavelen > low_wavelen, inv / factor, jnp.where(wavelen < high_wavelen, inv, mid))


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate x [B,T,N,H] by positions [B,T]; rotate-half layout (as Hugging Face Llama)."""
    angles = positions[:, :, None].astype(jnp.float32) * inv_freq  # [B,T,H/2]
    sin = jnp.sin(angles)[:, :, None, :]                           # [B,T,1,H/2]
    cos = jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)          # [B,T,N,H/2] each
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def _glu(gate: jax.Array, up: jax.Array, kind: str) -> jax.Array:
    act = jax.nn.silu(gate) if kind == "silu" else jax.nn.gelu(gate, approximate=True)
    return act * up


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _glu_row_major_grads(gate, up, kind):
    return _glu(gate, up, kind)


def _glu_fwd(gate, up, kind):
    return _glu(gate, up, kind), (gate, up)


def _glu_bwd(kind, residuals, d_out):
    _, vjp = jax.vjp(lambda g, u: _glu(g, u, kind), *residuals)
    # The barrier keeps XLA CPU from fusing the transposes its weight-gradient matmuls want into
    # this elementwise code: its loop emitter writes transposed outputs ~10x slower than a copy.
    return tuple(jax.lax.optimization_barrier(vjp(d_out)))


_glu_row_major_grads.defvjp(_glu_fwd, _glu_bwd)


def gated_activation(gate: jax.Array, up: jax.Array, kind: str) -> jax.Array:
    """act(gate) * up, act = silu (SwiGLU) or tanh GELU (GeGLU); [B,T,F] each -> [B,T,F]. On CPU
    the backward materialises its gradients before the matmuls read them (measured ~5% of a
    training step at d512); elsewhere XLA's own fusion is left alone."""
    if target_platform() == "cpu":
        return _glu_row_major_grads(gate, up, kind)
    return _glu(gate, up, kind)
