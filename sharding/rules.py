"""Logical-axis rules: the mesh axis names, and the one table that maps logical names to them.

Parameters, activations, the KV cache and the kernels' shard_maps name logical axes only; the
parallelism strategy is the choice of table (`mesh.rules`). The mesh axis names live here and
nowhere else (sharding/mesh.py builds the mesh from AXES). Logical names are the three tuples
below; `spec` rejects any other name rather than silently replicating it.
"""
from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA, FSDP, TENSOR = AXES = ("data", "fsdp", "tensor")  # mesh axes, outermost first
BATCH = (DATA, FSDP)  # the global batch is split over both data-parallel axes

PARAM_AXES = ("vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "layers", "norm")
ACTIVATION_AXES = ("batch", "seq", "act_embed", "act_heads", "act_kv_heads", "act_mlp", "act_vocab")
# Paged KV cache k/v [L, pages, page_size, K, H] and scales [L, pages, page_size, K]
# (serving/kv_cache.py); the kernels' page pools are the same without L.
CACHE_AXES = ("cache_pages", "cache_page_tokens", "cache_kv_heads")
LOGICAL_AXES = frozenset(PARAM_AXES + ACTIVATION_AXES + CACHE_AXES)

RULES: dict[str, dict[str, str | tuple[str, ...] | None]] = {
    # ZeRO-3 style: every weight split over fsdp along its embed axis, gathered per layer.
    "fsdp": {
        "batch": BATCH, "embed": FSDP,
    },
    # FSDP plus Megatron tensor parallelism: heads, mlp and vocab over tensor.
    "fsdp_tp": {
        "batch": BATCH, "embed": FSDP,
        "heads": TENSOR, "kv_heads": TENSOR, "mlp": TENSOR, "vocab": TENSOR,
        "act_heads": TENSOR, "act_kv_heads": TENSOR, "act_mlp": TENSOR, "act_vocab": TENSOR,
    },
    # Serving: weights replicated over data, split over tensor; no fsdp gathers per token.
    "serve_tp": {
        "batch": BATCH,
        "heads": TENSOR, "kv_heads": TENSOR, "mlp": TENSOR, "vocab": TENSOR,
        "act_heads": TENSOR, "act_kv_heads": TENSOR, "act_mlp": TENSOR, "act_vocab": TENSOR,
        "cache_kv_heads": TENSOR,
    },
}


def spec(axes: tuple[str | None, ...], rules: dict) -> PartitionSpec:
    """PartitionSpec of one array from its logical axes (None, or a name the table leaves out,
    is replicated); a name outside LOGICAL_AXES is a ValueError, so a typo cannot replicate."""
    unknown = [a for a in axes if a is not None and a not in LOGICAL_AXES]
    if unknown:
        raise ValueError(f"unknown logical axis {unknown[0]!r} in {tuple(axes)}; known: "
                         f"{', '.join(sorted(LOGICAL_AXES))} (sharding/rules.py)")
    return PartitionSpec(*(rules.get(a) if a else None for a in axes))


def mesh_axes(name: str, rules: dict) -> tuple[str, ...]:
    """The mesh axes one logical axis maps to under `rules`, as a tuple (empty: replicated)."""
    axis = spec((name,), rules)[0]
    return () if axis is None else (axis,) if isinstance(axis, str) else tuple(axis)


def is_param(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_specs(state, rules: dict):
    """PartitionSpecs for an nnx.State (abstract or concrete), from each Variable's `axes`."""
    return jax.tree.map(lambda v: spec(v.get_metadata().get("axes", ()), rules) if v.ndim else
                        PartitionSpec(), state, is_leaf=is_param)


def state_shardings(state, mesh: Mesh, rules: dict):
    """NamedShardings for an nnx.State, as a tree prefix usable as jit in/out_shardings."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), state_specs(state, rules),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def constrain(x: jax.Array, axes: tuple[str | None, ...], rules_name: str) -> jax.Array:
    """Pin an activation's sharding under the mesh in context; a no-op without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, spec(axes, RULES[rules_name]))
