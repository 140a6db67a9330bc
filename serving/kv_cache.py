"""Paged KV cache: fixed-size pages per layer, a page table per sequence, a host-side free list.

Device side (`KVCache`, a pytree): k/v [L, P, page_size, K, H] in bf16/fp32, or int8 with
k_scale/v_scale [L, P, page_size, K] float32 (one symmetric scale per token and kv head, so a
token's entry is final once written: value = int8 * scale). Page 0 is never handed out: inactive
decode slots and padded prefill positions write into it, so a jitted step never needs a branch.

Host side (`PageAllocator`): the free list, each slot's pages and the [max_batch, max_pages]
page table fed to every step. Pages are taken on demand: a sequence holds pages for the tokens
it has and `grow`s as it prefills and decodes; the engine preempts a sequence when the pool runs
dry (serving/engine.py). Pages return the moment a sequence finishes, is cancelled or preempted.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from configs import Config
from configs.schema import KV_CACHE_DTYPES
from sharding.rules import RULES, spec

KV_DTYPES = {name: jnp.dtype(name) for name in KV_CACHE_DTYPES if name != "auto"}  # resolved serve.kv_dtype
CACHE_AXES = ("layers", "cache_pages", "cache_page_tokens", "cache_kv_heads", "head_dim")  # k, v
SCALE_AXES = CACHE_AXES[:-1]                                                                # scales


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Stacked per-layer pages; scales are None unless the cache is int8."""

    k: jax.Array                      # [L,P,S,K,H]  S = page_size
    v: jax.Array                      # [L,P,S,K,H]
    k_scale: jax.Array | None = None  # [L,P,S,K]
    v_scale: jax.Array | None = None  # [L,P,S,K]

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    @property
    def page_size(self) -> int:
        return self.k.shape[2]


def cache_shardings(cfg: Config, mesh: Mesh | None, kv_dtype: str):
    """NamedShardings of a KVCache from its logical axes under cfg.mesh.rules (serve_tp: kv heads
    over the tensor axis)."""
    if mesh is None:
        return None
    rules = RULES[cfg.mesh.rules]
    s5 = NamedSharding(mesh, spec(CACHE_AXES, rules))
    s4 = NamedSharding(mesh, spec(SCALE_AXES, rules))
    q = kv_dtype == "int8"
    return KVCache(s5, s5, s4 if q else None, s4 if q else None)


def init_cache(cfg: Config, mesh: Mesh | None = None) -> KVCache:
    """Zeroed cache of cfg.serve.num_pages pages, placed under the serving shardings."""
    m, s = cfg.model, cfg.serve
    shape = (m.n_layers, s.num_pages, s.page_size, m.n_kv_heads, m.resolved_head_dim)
    dtype = KV_DTYPES[s.kv_dtype]
    q = s.kv_dtype == "int8"

    def make():
        z = lambda shp, dt: jnp.zeros(shp, dt)
        return KVCache(z(shape, dtype), z(shape, dtype), z(shape[:-1], jnp.float32) if q else None,
                       z(shape[:-1], jnp.float32) if q else None)

    return jax.jit(make, out_shardings=cache_shardings(cfg, mesh, s.kv_dtype))()


def quantize_kv(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [B,T,K,H] -> int8 [B,T,K,H], scale [B,T,K]: symmetric over H per token and kv head."""
    x32 = x.astype(jnp.float32)
    scale = jnp.maximum(jnp.max(jnp.abs(x32), axis=-1), 1e-8) / 127.0  # [B,T,K]
    return jnp.clip(jnp.round(x32 / scale[..., None]), -127, 127).astype(jnp.int8), scale


def slot_indices(page_table: jax.Array, positions: jax.Array, valid: jax.Array, page_size: int):
    """Cache coordinates of tokens: page ids and in-page offsets [B,T] (invalid -> page 0)."""
    page = jnp.take_along_axis(page_table, positions // page_size, axis=1)  # [B,T]
    return jnp.where(valid, page, 0), jnp.where(valid, positions % page_size, 0)


def write_layer(cache: KVCache, layer, k: jax.Array, v: jax.Array, pages, offsets) -> KVCache:
    """Store k, v [B,T,K,H] of one layer at (pages, offsets) [B,T]; returns the updated cache.

    A scatter into the stacked arrays (not a per-layer copy), so with the cache donated and
    carried through the layer scan XLA updates it in place.
    """
    lay = jnp.full(pages.shape, layer, jnp.int32)
    if cache.quantized:
        kq, ks = quantize_kv(k)
        vq, vs = quantize_kv(v)
        return KVCache(cache.k.at[lay, pages, offsets].set(kq), cache.v.at[lay, pages, offsets].set(vq),
                       cache.k_scale.at[lay, pages, offsets].set(ks),
                       cache.v_scale.at[lay, pages, offsets].set(vs))
    dt = cache.k.dtype
    return KVCache(cache.k.at[lay, pages, offsets].set(k.astype(dt)),
                   cache.v.at[lay, pages, offsets].set(v.astype(dt)))


class PageAllocator:
    """Free list and page table for `max_batch` slots (host side, single-threaded use)."""

    def __init__(self, num_pages: int, page_size: int, max_batch: int, max_seq_len: int):
        if num_pages < 2:
            raise ValueError("serve.num_pages must be at least 2 (page 0 is reserved)")
        self.page_size = page_size
        self.max_pages_per_seq = math.ceil(max_seq_len / page_size)
        self.free = list(range(num_pages - 1, 0, -1))  # pop() hands out low page ids first
        self.capacity = num_pages - 1
        self.slot_pages: list[list[int]] = [[] for _ in range(max_batch)]
        self.page_table = np.zeros((max_batch, self.max_pages_per_seq), np.int32)

    def pages_for(self, n_tokens: int) -> int:
        return math.ceil(n_tokens / self.page_size)

    @property
    def pages_in_use(self) -> int:
        return self.capacity - len(self.free)

    def missing(self, slot: int, n_tokens: int) -> int:
        """Pages `slot` still needs to hold n_tokens positions."""
        return max(0, self.pages_for(n_tokens) - len(self.slot_pages[slot]))

    def grow(self, slot: int, n_tokens: int) -> bool:
        """Give `slot` pages for n_tokens positions; False (nothing taken) when too few are free."""
        have = len(self.slot_pages[slot])
        need = self.pages_for(n_tokens)
        if need > self.max_pages_per_seq:
            raise ValueError(f"{n_tokens} tokens exceed the context of {self.max_pages_per_seq} pages")
        if need - have > len(self.free):
            return False
        new = [self.free.pop() for _ in range(need - have)]
        self.slot_pages[slot] += new
        self.page_table[slot, have:need] = new
        return True

    def release(self, slot: int) -> None:
        """Return the slot's pages to the free list."""
        self.free.extend(reversed(self.slot_pages[slot]))
        self.slot_pages[slot] = []
        self.page_table[slot] = 0
