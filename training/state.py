"""Create the train state {params, opt_state, step} directly in its shardings.

The model is whatever a task builds (`build() -> nnx.Module`; default the language model), so one
layout and one init serve every task.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from configs import Config
from model.init import match_shardings, pure_shardings
from model.transformer import Transformer
from sharding.rules import RULES, state_shardings


def lm_model(cfg: Config) -> Callable[[], nnx.Module]:
    """The language model's builder: the Transformer of cfg.model under cfg.mesh.rules."""
    return lambda: Transformer(cfg.model, rngs=nnx.Rngs(cfg.train.seed), rules=cfg.mesh.rules)


def param_layout(cfg: Config, mesh: Mesh, build: Callable[[], nnx.Module] | None = None):
    """(graphdef, abstract params, param shardings), both in the pure-dict layout; nothing allocated."""
    graphdef, abstract = nnx.split(nnx.eval_shape(build or lm_model(cfg)))
    shardings = pure_shardings(state_shardings(abstract, mesh, RULES[cfg.mesh.rules]))
    return graphdef, nnx.to_pure_dict(abstract), shardings


def state_layout(cfg: Config, mesh: Mesh, optimizer: optax.GradientTransformation,
                 build: Callable[[], nnx.Module] | None = None):
    """(graphdef, abstract state, state shardings) without allocating anything."""
    graphdef, params, param_sh = param_layout(cfg, mesh, build)
    opt_abstract = jax.eval_shape(optimizer.init, params)
    abstract_state = {"params": params, "opt_state": opt_abstract,
                      "step": jax.ShapeDtypeStruct((), jnp.int32)}
    state_sh = {"params": param_sh, "opt_state": match_shardings(opt_abstract, param_sh, mesh),
                "step": NamedSharding(mesh, PartitionSpec())}
    return graphdef, abstract_state, state_sh


def overlay(params: dict, given: dict) -> dict:
    """`params` with the entries of `given` (a nested sub-dict of it) put in their place."""
    return {k: (overlay(v, given[k]) if isinstance(v, dict) else given[k]) if k in given else v
            for k, v in params.items()}


def _covered(shardings: dict, given: dict) -> dict:
    """The part of a shardings tree that `given` covers (its in_shardings)."""
    return {k: _covered(shardings[k], v) if isinstance(v, dict) else shardings[k] for k, v in given.items()}


def init_train_state(cfg: Config, mesh: Mesh, optimizer, state_sh, params: dict | None = None,
                     build: Callable[[], nnx.Module] | None = None) -> dict:
    """Fresh state created inside jit in its shardings. `params` (all of them, or a sub-dict such
    as a classifier's "backbone") replace the fresh ones: fine-tuning from a checkpoint. The
    random init of what they replace is dead code that XLA drops."""
    build = build or lm_model(cfg)

    def init(given):
        fresh = nnx.to_pure_dict(nnx.state(build()))
        p = fresh if given is None else overlay(fresh, given)
        return {"params": p, "opt_state": optimizer.init(p), "step": jnp.zeros((), jnp.int32)}

    if params is None:
        return jax.jit(lambda: init(None), out_shardings=state_sh)()
    return jax.jit(init, in_shardings=(_covered(state_sh["params"], params),), out_shardings=state_sh)(params)


def abstract_with_shardings(abstract, shardings):
    """ShapeDtypeStructs carrying target shardings (orbax restores straight into them)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
