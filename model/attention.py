"""The one attention entry point of the model: picks an implementation by config and platform.

impl (model.attention_impl):
  xla    pure jnp; XLA fuses it; partitions like any jnp code. Rows attending over themselves
         (training, evaluation) skip the causally hidden blocks (kernels/xla_causal.py); other
         calls run the reference (kernels/reference.py).
  pallas our flash kernels: TPU Mosaic kernel on TPU, Triton kernel on GPU, and on CPU the TPU
         kernel in Pallas interpret mode (slow; for tests). Called through shard_map on a mesh.
         (Generic interpret, not TPU interpret mode: the latter's io callbacks cannot go under
         jax.checkpoint, which the model's remat uses. The kernel tests use TPU interpret mode.)
  cudnn  jax.nn.dot_product_attention (cuDNN flash on NVIDIA GPUs, its XLA path elsewhere).
  auto   TPU -> pallas; GPU -> cudnn, or pallas when a logit soft cap is set (cuDNN has none);
         CPU -> xla. See docs/kernels.md for the measurements behind the choice.
"""
from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp

from configs.schema import ATTENTION_IMPLS as IMPLS
from model.kernels import sharded
from model.kernels.blocking import default_blocks
from model.kernels.paged_xla import BLOCK_TOKENS, DECODE_BLOCK_TOKENS, paged_attention_blocked
from model.kernels.reference import (attention_mask, attention_reference, default_positions,
                                     fill_masking_defaults)
from model.kernels.xla_causal import causal_self_attention


def resolve_impl(impl: str, *, logit_softcap: float = 0.0, platform: str | None = None) -> str:
    """`auto` -> the fastest implementation measured for this platform (see docs/kernels.md)."""
    if impl not in IMPLS:
        raise ValueError(f"model.attention_impl '{impl}' is not one of {IMPLS}")
    if impl != "auto":
        return impl
    platform = platform or target_platform()
    if platform == "tpu":
        return "pallas"
    if platform in ("gpu", "cuda", "rocm"):
        return "pallas" if logit_softcap else "cudnn"
    return "xla"


# Set while compiling ahead of time for another platform (aot/compile_train.py: a TPU topology from a
# CPU host), so the pallas path builds that platform's kernels, not their interpret-mode emulation.
_TARGET: contextvars.ContextVar = contextvars.ContextVar("attention_compile_target", default=None)


@contextlib.contextmanager
def compile_target(platform: str, device_kind: str = ""):
    """Trace attention for `platform` ('tpu') and `device_kind` (block sizes), not for this host."""
    token = _TARGET.set((platform, device_kind))
    try:
        yield
    finally:
        _TARGET.reset(token)


def target_platform() -> str:
    """The platform kernels are built for: the compile target when one is set, else this host's."""
    target = _TARGET.get()
    return target[0] if target else jax.default_backend()


def _pallas_kernel(causal, sliding_window, logit_softcap, block_q, block_kv):
    """The per-device flash kernel for this platform, as f(q, k, v, q_pos, q_seg, kv_pos, kv_seg)."""
    platform = target_platform()
    if platform == "gpu":
        from model.kernels.gpu_flash import flash_attention_gpu as flash
        extra = {}
    else:  # TPU; elsewhere the TPU kernel interpreted (generic mode: works under remat/scan)
        from model.kernels.tpu_flash import flash_attention as flash
        extra = dict(interpret=False if platform == "tpu" else "jax")
        if _TARGET.get() and _TARGET.get()[1]:  # block sizes for the target TPU generation
            extra["device_kind"] = _TARGET.get()[1]

    def kernel(q, k, v, q_pos, q_seg, kv_pos, kv_seg):
        return flash(q, k, v, q_positions=q_pos, q_segment_ids=q_seg, kv_positions=kv_pos,
                     kv_segment_ids=kv_seg, causal=causal, sliding_window=sliding_window,
                     logit_softcap=logit_softcap, block_q=block_q, block_kv=block_kv, **extra)
    return kernel


def _cudnn(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions, causal,
           sliding_window):
    """jax.nn.dot_product_attention: built-in causal/window when positions are the defaults
    (no [B,T,S] mask in memory), an explicit mask otherwise; rows with no visible key -> zeros."""
    B, T, N, H = q.shape
    S = k.shape[1]
    on_gpu = jax.default_backend() == "gpu"
    impl = "cudnn" if on_gpu else None
    if q_positions is None and kv_positions is None and q_segment_ids is None and T == S:
        window = (sliding_window - 1, 0) if sliding_window else None
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, local_window_size=window,
                                            implementation=impl)
    q_positions = default_positions(B, T, S - T) if q_positions is None else q_positions
    kv_positions = default_positions(B, S) if kv_positions is None else kv_positions
    mask = attention_mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids,
                          causal=causal, sliding_window=sliding_window)           # [B,T,S]
    out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation=impl)
    return jnp.where(mask.any(-1)[:, :, None, None], out, 0).astype(q.dtype)     # [B,T,N,H]


def attention(q, k, v, *, q_segment_ids=None, kv_segment_ids=None, q_positions=None,
              kv_positions=None, causal: bool = True, sliding_window: int = 0,
              logit_softcap: float = 0.0, impl: str = "auto", block_q: int = 0,
              block_kv: int = 0, mesh=None, self_attention: bool = False) -> jax.Array:
    """q [B,T,N,H], k/v [B,S,K,H] -> [B,T,N,H]. Masking rules: model/kernels/reference.py.

    self_attention: q and k/v come from the same rows, whose positions increase along each
    segment (q_/kv_positions and segment ids are the same arrays); the xla path then computes
    only the blocks the causal mask can show (the other paths skip blocks by their own means).
    block_q/block_kv (model.attn_block_q/attn_block_kv; 0 = per-generation default) tune the
    pallas kernels. mesh: for the shard_map of the pallas kernels (default: the context mesh)."""
    impl = resolve_impl(impl, logit_softcap=logit_softcap)
    kwargs = dict(q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                  q_positions=q_positions, kv_positions=kv_positions, causal=causal,
                  sliding_window=sliding_window, logit_softcap=logit_softcap)
    if impl == "xla":
        if self_attention and causal and q_positions is not None:
            return causal_self_attention(q, k, v, q_positions, q_segment_ids,
                                         sliding_window=sliding_window, logit_softcap=logit_softcap)
        return attention_reference(q, k, v, **kwargs)
    if impl == "cudnn":
        if logit_softcap:
            raise ValueError("attention_impl=cudnn has no logit soft cap; use pallas or xla")
        kwargs.pop("logit_softcap")
        return _cudnn(q, k, v, **kwargs)
    q_positions, kv_positions, q_segment_ids, kv_segment_ids = fill_masking_defaults(
        q.shape[0], q.shape[1], k.shape[1], q_positions, kv_positions, q_segment_ids, kv_segment_ids)
    kernel = _pallas_kernel(causal, sliding_window, logit_softcap, block_q, block_kv)
    return sharded.sharded_attention(kernel, q, k, v, q_positions, q_segment_ids, kv_positions,
                                     kv_segment_ids, mesh=mesh)


def paged_attention(q, k_pages, v_pages, page_table, lengths, *, k_scales=None, v_scales=None,
                    sliding_window: int = 0, logit_softcap: float = 0.0, impl: str = "auto",
                    q_positions=None, layer=None, mesh=None) -> jax.Array:
    """Attention of T new tokens per sequence against a paged KV cache.

    q [B,T,N,H] (their K/V already written); k/v_pages [P,page_size,K,H] bf16/fp32, or int8 with
    k/v_scales [P,page_size,K] fp32; page_table [B,M] int32; lengths [B] int32 (keys 0..length-1;
    0 = inactive slot -> zeros). -> [B,T,N,H].
    Decode (q_positions None): the queries sit at positions lengths-T .. lengths-1, T in 1..8.
    Chunked prefill: q_positions [B,T] gives each query's position (padding rows at or past the
    length return zeros); it always runs the blocked jnp path (kernels/paged_xla.py).
    layer: the pages and scales are the stacked cache [L,P,...] and this is the layer to read.
    impl: xla (kernels/paged_xla.py) | pallas (TPU kernel; Triton on GPU; interpreted on CPU) |
    auto (pallas on TPU and GPU, xla on CPU). cudnn has no paged kernel and means xla here."""
    if impl not in IMPLS:
        raise ValueError(f"model.attention_impl '{impl}' is not one of {IMPLS}")
    platform = target_platform()
    if impl == "auto":
        impl = "pallas" if platform in ("tpu", "gpu") else "xla"
    if impl != "pallas" or q_positions is not None:
        block = BLOCK_TOKENS if q_positions is not None else DECODE_BLOCK_TOKENS
        if q_positions is None:
            T = q.shape[1]
            q_positions = lengths[:, None] - T + jnp.arange(T, dtype=jnp.int32)[None, :]   # [B,T]
        return paged_attention_blocked(q, k_pages, v_pages, page_table, q_positions, lengths, block_tokens=block,
                                       k_scales=k_scales, v_scales=v_scales,
                                       sliding_window=sliding_window, logit_softcap=logit_softcap,
                                       layer=layer)
    if layer is not None:
        pick = lambda a: None if a is None else a[layer]
        k_pages, v_pages, k_scales, v_scales = map(pick, (k_pages, v_pages, k_scales, v_scales))
    if platform == "gpu":
        from model.kernels.gpu_paged import paged_attention_gpu as paged
        extra = {}
    else:
        from model.kernels.tpu_paged import paged_attention_tpu as paged
        extra = dict(interpret=False if platform == "tpu" else "jax")

    def kernel(q, k_pages, v_pages, page_table, lengths, k_scales, v_scales):
        return paged(q, k_pages, v_pages, page_table, lengths, k_scales=k_scales,
                     v_scales=v_scales, sliding_window=sliding_window,
                     logit_softcap=logit_softcap, **extra)
    return sharded.sharded_paged_attention(kernel, q, k_pages, v_pages, page_table, lengths,
                                           k_scales, v_scales, mesh=mesh)


__all__ = ["attention", "paged_attention", "resolve_impl", "default_blocks"]
