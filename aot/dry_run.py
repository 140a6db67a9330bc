"""`train.py --dry-run`: what a config would build, computed from shapes alone."""
from __future__ import annotations

import jax
import yaml
from flax import nnx

from configs import Config, to_dict
from model.stats import flops_per_token, param_count
from model.init import abstract_model
from sharding.mesh import AXES, check_divisibility, mesh_shape
from sharding.rules import RULES, state_specs


def per_device_param_bytes(cfg: Config, state, shape: dict[str, int]) -> int:
    """Bytes of the (abstract) parameter `state` held by one device under the rules and mesh shape."""
    specs = jax.tree.leaves(state_specs(state, RULES[cfg.mesh.rules]),
                            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    total = 0
    for leaf, spec in zip(jax.tree.leaves(state), specs):
        n = leaf.size
        for entry in spec:
            for axis in (entry if isinstance(entry, tuple) else (entry,)):
                if axis:
                    n //= shape[axis]
        total += n * leaf.dtype.itemsize
    return total


def describe(cfg: Config, n_devices: int) -> str:
    """The resolved config, exact parameter count, mesh, bytes per device and FLOPs per token."""
    shape = mesh_shape(cfg.mesh, n_devices)
    check_divisibility(cfg, shape)
    state = nnx.state(abstract_model(cfg))
    n_params = sum(x.size for x in jax.tree.leaves(state))
    assert n_params == param_count(cfg.model), "model.stats.param_count disagrees with the model"
    per_dev = per_device_param_bytes(cfg, state, shape)
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    lines = [
        "# resolved config",
        yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None).rstrip(),
        "",
        f"params: {n_params}",
        f"params (human): {n_params / 1e9:.3f}B" if n_params >= 1e9 else f"params (human): {n_params / 1e6:.2f}M",
        "mesh: " + " x ".join(f"{a}={shape[a]}" for a in AXES) + f" ({n_devices} devices, rules {cfg.mesh.rules})",
        f"param bytes per device: {per_dev} ({per_dev / 2**30:.2f} GiB)",
        f"model FLOPs per token (train, seq {cfg.data.seq_len}): {fpt:.4g}",
        f"model FLOPs per step: {fpt * cfg.train.batch_size * cfg.data.seq_len:.4g}",
    ]
    return "\n".join(lines)
