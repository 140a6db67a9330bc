"""shard_map wrappers: run a kernel per device over the batch and head axes of the mesh.

A pallas_call is opaque to the SPMD partitioner, so under a sharded jit the kernels are called
through jax.shard_map: activations split over the mesh axes of their logical `batch` and
`act_kv_heads` axes (the cache pages over those of `cache_kv_heads`), each device runs the kernel
on its [B/dp, T, N/tp, H] slice and no communication is needed (attention is independent per
batch row and per kv-head group). Heads are split only when the kv heads divide by their mesh
axes (so each shard holds whole GQA groups); batch only when it divides by the batch axes;
otherwise that dimension stays whole on every device.
"""
from __future__ import annotations

import math

import jax
from jax.sharding import AxisType, PartitionSpec as P

from sharding.rules import RULES, mesh_axes

# The kernels are not told the config's table. serve_tp maps every name they use; fsdp_tp lays
# activations out the same way, and the fsdp table requires a tensor axis of 1 (sharding/mesh.py),
# so splitting as serve_tp does is splitting as the activations and the cache are laid out.
KERNEL_RULES = RULES["serve_tp"]
BATCH_AXES = mesh_axes("batch", KERNEL_RULES)
HEAD_AXES = mesh_axes("act_kv_heads", KERNEL_RULES)
CACHE_HEAD_AXES = mesh_axes("cache_kv_heads", KERNEL_RULES)


def current_mesh(mesh=None):
    """The mesh passed in, else the one in context (jax.sharding.get_abstract_mesh()); None if
    there is none or it has a single device."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh is None or mesh.empty or math.prod(mesh.shape.values()) == 1:
        return None
    return mesh


def _axes(mesh, names, dim: int):
    """The subset of mesh axes `names` present in the mesh, if their product divides dim."""
    present = tuple(a for a in names if a in mesh.shape and mesh.shape[a] > 1)
    if not present or dim % math.prod(mesh.shape[a] for a in present):
        return None
    return present if len(present) > 1 else present[0]


def _shard_map(fn, mesh, in_specs, out_specs):
    # check_vma off: a pallas_call carries no varying-manual-axes rule for shard_map to check.
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def _place(mesh, args, specs):
    """Under Explicit mesh axes shard_map needs inputs already laid out as in_specs: reshard them.
    (Auto axes: the partitioner inserts the resharding itself.)"""
    explicit = any(t == AxisType.Explicit for t in getattr(mesh, "axis_types", ()))
    if not explicit:
        return args
    return tuple(a if a is None else jax.sharding.reshard(a, s) for a, s in zip(args, specs))


def sharded_attention(kernel, q, k, v, q_pos, q_seg, kv_pos, kv_seg, *, mesh=None):
    """kernel(q, k, v, q_pos, q_seg, kv_pos, kv_seg) -> o, mapped over batch and heads.

    q [B,T,N,H], k/v [B,S,K,H], q_pos/q_seg [B,T], kv_pos/kv_seg [B,S] (all given, not None)."""
    mesh = current_mesh(mesh)
    if mesh is None:
        return kernel(q, k, v, q_pos, q_seg, kv_pos, kv_seg)
    b = _axes(mesh, BATCH_AXES, q.shape[0])
    h = _axes(mesh, HEAD_AXES, k.shape[2])
    heads, rows = P(b, None, h, None), P(b, None)                 # [B,T,N,H] and [B,T]
    specs = (heads, heads, heads, rows, rows, rows, rows)
    fn = _shard_map(kernel, mesh, specs, heads)
    return fn(*_place(mesh, (q, k, v, q_pos, q_seg, kv_pos, kv_seg), specs))


def sharded_paged_attention(kernel, q, k_pages, v_pages, page_table, lengths, k_scales,
                            v_scales, *, mesh=None):
    """kernel(q, k_pages, v_pages, page_table, lengths, k_scales, v_scales) -> o over the mesh:
    sequences split over the batch axes (each device reads its own rows of the page table against
    the whole page pool of its heads), kv heads of the pool as `cache_kv_heads`."""
    mesh = current_mesh(mesh)
    if mesh is None:
        return kernel(q, k_pages, v_pages, page_table, lengths, k_scales, v_scales)
    b = _axes(mesh, BATCH_AXES, q.shape[0])
    h = _axes(mesh, CACHE_HEAD_AXES, k_pages.shape[2])
    pages, scales = P(None, None, h, None), P(None, None, h)       # [P,ps,K,H], [P,ps,K]
    qs = P(b, None, h, None)                                         # [B,T,N,H]
    specs = (qs, pages, pages, P(b, None), P(b),
             None if k_scales is None else scales, None if v_scales is None else scales)
    fn = _shard_map(kernel, mesh, specs, qs)
    return fn(*_place(mesh, (q, k_pages, v_pages, page_table, lengths, k_scales, v_scales),
                      specs))
