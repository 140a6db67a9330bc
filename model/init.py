"""Create a model's parameters already sharded: abstract init, shardings from rules, jitted init."""
from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh

from configs import Config
from model.transformer import Transformer
from sharding.rules import RULES, state_shardings


def abstract_model(cfg: Config, rules: str | None = None) -> Transformer:
    """The model with ShapeDtypeStruct leaves: nothing allocated."""
    rules = rules or cfg.mesh.rules
    return nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(cfg.train.seed), rules=rules))


def param_shardings(cfg: Config, mesh: Mesh, rules: str | None = None):
    """(graphdef, abstract params state, NamedSharding tree) for the model under `rules`."""
    rules = rules or cfg.mesh.rules
    graphdef, abstract = nnx.split(abstract_model(cfg, rules))
    return graphdef, abstract, state_shardings(abstract, mesh, RULES[rules])


def create_sharded_model(cfg: Config, mesh: Mesh, rules: str | None = None, seed: int | None = None):
    """Initialise parameters directly into their shardings; returns (graphdef, params state)."""
    rules = rules or cfg.mesh.rules
    seed = cfg.train.seed if seed is None else seed
    graphdef, _, shardings = param_shardings(cfg, mesh, rules)

    def init():
        return nnx.split(Transformer(cfg.model, rngs=nnx.Rngs(seed), rules=rules))[1]

    return graphdef, jax.jit(init, out_shardings=shardings)()


def pure_shardings(state_shardings_tree) -> dict:
    """The NamedSharding tree of an nnx.State in nnx's pure-dict layout (as train state uses)."""
    return nnx.to_pure_dict(state_shardings_tree)


def match_shardings(tree, param_shardings_pure: dict, mesh: Mesh):
    """Shardings for a tree that embeds copies of the params (optimizer moments): each leaf whose
    key path ends with a parameter's path takes that parameter's sharding; others replicate."""
    from jax.sharding import NamedSharding, PartitionSpec
    by_path = {}
    for path, s in jax.tree_util.tree_flatten_with_path(param_shardings_pure)[0]:
        by_path[tuple(getattr(k, "key", k) for k in path)] = s

    def pick(path, leaf):
        keys = tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
        for i in range(len(keys)):
            if keys[i:] in by_path and getattr(leaf, "ndim", 0):
                return by_path[keys[i:]]
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(pick, tree)
