"""Build the device mesh (data, fsdp, tensor) from config, with ICI and DCN sizes: the one mesh
builder for training, serving, AOT compiles and evaluation."""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from configs import ConfigError, Config, MeshConfig
from sharding.rules import AXES, BATCH, FSDP, TENSOR


def resolve_sizes(sizes: list[int], total: int, what: str) -> list[int]:
    """Fill a single -1 so the product equals `total`; error if it cannot."""
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if total % known:
            raise ConfigError(f"{what} sizes {sizes} cannot fill {total} devices")
        sizes = [total // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != total:
        raise ConfigError(f"mesh {dict(zip(AXES, sizes))} has {math.prod(sizes)} devices but "
                          f"{total} are available; set mesh.data/fsdp/tensor (one may be -1)")
    return sizes


def mesh_shape(cfg: MeshConfig, n_devices: int) -> dict[str, int]:
    """Total size of each mesh axis (ICI x DCN)."""
    dcn = [cfg.dcn_data, cfg.dcn_fsdp, cfg.dcn_tensor]
    if any(d <= 0 for d in dcn) or n_devices % math.prod(dcn):
        raise ConfigError(f"mesh DCN sizes {dcn} do not divide the {n_devices} devices")
    ici = resolve_sizes([cfg.data, cfg.fsdp, cfg.tensor], n_devices // math.prod(dcn), "mesh ICI")
    return {a: i * d for a, i, d in zip(AXES, ici, dcn)}


def check_divisibility(cfg: Config, shape: dict[str, int]) -> None:
    """Heads, kv heads and mlp must split evenly over the tensor axis when it is used."""
    tp, m = shape[TENSOR], cfg.model
    if tp > 1 and cfg.mesh.rules != "fsdp":
        for key in ("n_heads", "n_kv_heads", "mlp_dim"):
            if getattr(m, key) % tp:
                raise ConfigError(f"model.{key} ({getattr(m, key)}) is not divisible by the tensor axis ({tp})")
    elif tp > 1:
        raise ConfigError(f"mesh.tensor is {tp} but mesh.rules 'fsdp' shards nothing over it; "
                          "use mesh.rules=fsdp_tp")
    fsdp = shape[FSDP]
    if cfg.mesh.rules != "serve_tp" and m.d_model % fsdp:
        raise ConfigError(f"model.d_model ({m.d_model}) is not divisible by the fsdp axis ({fsdp})")


def data_parallel_size(mesh) -> int:
    """Devices the batch is split over: the product of the batch mesh axes (rules.BATCH)."""
    return math.prod(mesh.shape[a] for a in BATCH)


def make_mesh(cfg: Config | MeshConfig, devices=None) -> Mesh:
    """The (data, fsdp, tensor) mesh over `devices` (default: all), axis types set explicitly.

    A full Config also checks that the model splits over the mesh; a MeshConfig alone builds the
    mesh only (serving checks heads against --tp itself, evaluation replicates the weights)."""
    mesh_cfg = cfg.mesh if isinstance(cfg, Config) else cfg
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    if isinstance(cfg, Config):
        check_divisibility(cfg, shape)
    dcn = (mesh_cfg.dcn_data, mesh_cfg.dcn_fsdp, mesh_cfg.dcn_tensor)
    ici = tuple(shape[a] // d for a, d in zip(AXES, dcn))
    grid = None
    if math.prod(dcn) > 1 and hasattr(devices[0], "slice_index"):
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    elif devices[0].platform in ("tpu", "gpu"):
        from jax.experimental import mesh_utils
        try:
            grid = mesh_utils.create_device_mesh(tuple(shape.values()), devices)
        except (AssertionError, ValueError, NotImplementedError):
            pass  # a device subset that is no whole sub-slice (serve --tp 2 of 8): keep their order
    if grid is None:  # CPU or a single host: process-major order keeps DCN axes outermost
        grid = np.array(devices).reshape(tuple(shape.values()))
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))
