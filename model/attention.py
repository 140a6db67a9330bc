"""The one attention entry point of the model: picks an implementation by config and platform."""
from __future__ import annotations

import jax

from model.kernels.reference import attention_reference


def resolve_impl(impl: str) -> str:
    """`auto` -> the fastest implementation measured for this platform (see docs/kernels.md)."""
    if impl != "auto":
        return impl
    return "xla"


def attention(q, k, v, *, q_segment_ids=None, kv_segment_ids=None, q_positions=None,
              kv_positions=None, causal: bool = True, sliding_window: int = 0,
              logit_softcap: float = 0.0, impl: str = "auto") -> jax.Array:
    """q [B,T,N,H], k/v [B,S,K,H] -> [B,T,N,H]. Masking rules: model/kernels/reference.py."""
    impl = resolve_impl(impl)
    kwargs = dict(q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                  q_positions=q_positions, kv_positions=kv_positions, causal=causal,
                  sliding_window=sliding_window, logit_softcap=logit_softcap)
    if impl == "xla":
        return attention_reference(q, k, v, **kwargs)
    raise ValueError(f"model.attention_impl '{impl}' is not available")
