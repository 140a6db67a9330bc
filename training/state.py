"""Create the train state {params, opt_state, step} directly in its shardings."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from configs import Config
from model.transformer import Transformer
from model.init import match_shardings, param_shardings, pure_shardings


def state_layout(cfg: Config, mesh: Mesh, optimizer: optax.GradientTransformation):
    """(graphdef, abstract state, state shardings) without allocating anything."""
    graphdef, abstract, shardings = param_shardings(cfg, mesh)
    params = nnx.to_pure_dict(abstract)
    param_sh = pure_shardings(shardings)
    opt_abstract = jax.eval_shape(optimizer.init, params)
    abstract_state = {"params": params, "opt_state": opt_abstract,
                      "step": jax.ShapeDtypeStruct((), jnp.int32)}
    state_sh = {"params": param_sh, "opt_state": match_shardings(opt_abstract, param_sh, mesh),
                "step": NamedSharding(mesh, PartitionSpec())}
    return graphdef, abstract_state, state_sh


def init_train_state(cfg: Config, mesh: Mesh, optimizer, state_sh, params: dict | None = None) -> dict:
    """Fresh state (or optimizer state around given params), created inside jit in its shardings."""
    def init(params):
        if params is None:
            model = Transformer(cfg.model, rngs=nnx.Rngs(cfg.train.seed), rules=cfg.mesh.rules)
            params = nnx.to_pure_dict(nnx.state(model))
        return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}

    if params is None:
        return jax.jit(lambda: init(None), out_shardings=state_sh)()
    return jax.jit(init, in_shardings=(state_sh["params"],), out_shardings=state_sh)(params)


def abstract_with_shardings(abstract, shardings):
    """ShapeDtypeStructs carrying target shardings (orbax restores straight into them)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
