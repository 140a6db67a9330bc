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

    @jax.jit
    def init():
        return nnx.split(Transformer(cfg.model, rngs=nnx.Rngs(seed), rules=rules))[1]

    init = jax.jit(init.__wrapped__, out_shardings=shardings)
    return graphdef, init()


def count_params(state) -> int:
    """Exact number of parameters in an (abstract or concrete) state."""
    return sum(int(x.size) for x in jax.tree.leaves(state))
