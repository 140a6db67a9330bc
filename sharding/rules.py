"""Logical-axis rules: the one table that maps the model's axis names to mesh axes.

Parameters and activations name logical axes only (model/); the parallelism strategy is the
choice of table (`mesh.rules`). Parameter axes: vocab, embed, heads, kv_heads, head_dim, mlp,
layers, norm. Activation axes: batch, seq, act_embed, act_heads, act_kv_heads, act_mlp, act_vocab.
"""
from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH = ("data", "fsdp")  # the global batch is split over both data-parallel axes

RULES: dict[str, dict[str, str | tuple[str, ...] | None]] = {
    # ZeRO-3 style: every weight split over fsdp along its embed axis, gathered per layer.
    "fsdp": {
        "batch": BATCH, "embed": "fsdp",
    },
    # FSDP plus Megatron tensor parallelism: heads, mlp and vocab over tensor.
    "fsdp_tp": {
        "batch": BATCH, "embed": "fsdp",
        "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor",
        "act_heads": "tensor", "act_kv_heads": "tensor", "act_mlp": "tensor", "act_vocab": "tensor",
    },
    # Serving: weights replicated over data, split over tensor; no fsdp gathers per token.
    "serve_tp": {
        "batch": BATCH,
        "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor",
        "act_heads": "tensor", "act_kv_heads": "tensor", "act_mlp": "tensor", "act_vocab": "tensor",
        "cache_kv_heads": "tensor",
    },
}


def spec(axes: tuple[str | None, ...], rules: dict) -> PartitionSpec:
    """PartitionSpec of one array from its logical axes (unknown names stay replicated)."""
    return PartitionSpec(*(rules.get(a) if a else None for a in axes))


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
