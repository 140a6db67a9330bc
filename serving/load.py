"""Load a checkpoint for serving: config, params under serving rules (1 device or a tensor-parallel
mesh), optional int8 quantization, tokenizer. Also the int8 checkpoint format.

Sources: an int8 checkpoint, as `serve.py CKPT --int8 --save-int8 OUT` writes it with `save_int8`
(OUT/int8.json beside a params-only orbax checkpoint whose QArrays are {'int8', 'scale'} dicts);
otherwise a Tessera run directory or Hugging Face directory through `interop.load.load_checkpoint`.
Tokenizers are interop.tokenizers' (the directory's tokenizer.json or tokenizer.model, else the
config's data.tokenizer file).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from configs import Config, ConfigError, MeshConfig
from interop.load import checkpoint_config, load_checkpoint, load_tokenizer_for
from model.quant import CONTRACT_AXES, VOCAB_WEIGHTS, from_storable, quantize_params, to_storable
from sharding.mesh import make_mesh
from serving.budget import resolve_dtype
from store.checkpoint import Checkpointer, abstract_pure, read_config, write_config

INT8_MARKER = "int8.json"


def serving_mesh(tp: int = 1, devices=None) -> Mesh:
    """(data=1, fsdp=1, tensor=tp) mesh over the first tp of `devices` (default: this host's)."""
    devices = jax.devices() if devices is None else list(devices)
    if tp < 1 or tp > len(devices):
        raise ConfigError(f"--tp {tp} needs between 1 and {len(devices)} devices")
    return make_mesh(MeshConfig(data=1, fsdp=1, tensor=tp, rules="serve_tp"), devices[:tp])


def serving_config(cfg: Config, mesh: Mesh) -> Config:
    """The checkpoint's config with the serving mesh and rules; checks heads split over tensor."""
    tp = mesh.shape["tensor"]
    m = cfg.model
    for key in ("n_heads", "n_kv_heads", "mlp_dim"):
        if getattr(m, key) % tp:
            raise ConfigError(f"model.{key} ({getattr(m, key)}) is not divisible by --tp {tp}")
    mesh_cfg = dataclasses.replace(cfg.mesh, data=1, fsdp=1, tensor=tp, rules="serve_tp")
    return dataclasses.replace(cfg, mesh=mesh_cfg, model=dataclasses.replace(m, remat="none"))


def _scale_spec(spec: PartitionSpec, ndim: int, contracted) -> PartitionSpec:
    full = tuple(spec) + (None,) * (ndim - len(spec))
    return PartitionSpec(*(None if i in contracted else a for i, a in enumerate(full)))


def _abstract_int8(cfg: Config, mesh: Mesh, embedding: bool) -> dict:
    """ShapeDtypeStructs (with shardings) of an int8 checkpoint's storable params."""
    from model.init import param_shardings
    _, abstract, shardings = param_shardings(cfg, mesh, "serve_tp")
    pure = abstract_pure(abstract, shardings)

    def visit(tree):
        out = {}
        for name, x in tree.items():
            if isinstance(x, dict):
                out[name] = visit(x)
            elif name in CONTRACT_AXES and (embedding or name not in VOCAB_WEIGHTS):
                ax = CONTRACT_AXES[name]
                sshape = tuple(1 if i in ax else d for i, d in enumerate(x.shape))
                ssh = NamedSharding(mesh, _scale_spec(x.sharding.spec, x.ndim, ax))
                out[name] = {"int8": jax.ShapeDtypeStruct(x.shape, np.int8, sharding=x.sharding),
                             "scale": jax.ShapeDtypeStruct(sshape, np.float32, sharding=ssh)}
            else:
                out[name] = x
        return out
    return visit(pure)


def _require_tokenizer(tok, run_dir: Path):
    """`tok`, found by interop.load.load_tokenizer_for; a one-line error when there is none."""
    if tok is None:
        raise ConfigError(f"{run_dir} has no tokenizer (tokenizer.model or tokenizer.json)")
    return tok


def load_for_serving(path: str, overrides=(), tp: int = 1, int8: bool | None = None,
                     int8_embedding: bool = True):
    """-> (cfg, mesh, params pure dict (QArrays when int8), tokenizer). The weights load in
    serve.dtype (auto: serving/budget.py) unless model.param_dtype is among the overrides."""
    run = Path(path)
    if not run.is_dir():
        raise ConfigError(f"checkpoint directory {path} not found")
    mesh = serving_mesh(tp)
    marker = run / INT8_MARKER
    if marker.is_file():  # offline-quantized checkpoint
        info = json.loads(marker.read_text())
        cfg = serving_config(read_config(run, list(overrides)), mesh)
        ckpt = Checkpointer(run, async_save=False)
        try:
            found = ckpt.restore(_abstract_int8(cfg, mesh, info.get("embedding", True)))
        finally:
            ckpt.close()
        if found is None:
            raise ConfigError(f"no loadable checkpoint in {run}/checkpoints")
        params = from_storable(found[1], info.get("act_quant", True))
        return cfg, mesh, params, _require_tokenizer(load_tokenizer_for(run, cfg), run)
    overrides = list(overrides)
    if not any(o.startswith("model.param_dtype=") for o in overrides):  # an explicit override wins
        want = checkpoint_config(run, overrides)
        dtype = resolve_dtype(want.serve.dtype, want.model, jax.default_backend())
        overrides.append(f"model.param_dtype={dtype}")
    cfg, _, state, tok = load_checkpoint(str(run), mesh, rules="serve_tp", overrides=tuple(overrides))
    cfg = serving_config(cfg, mesh)
    tok = _require_tokenizer(tok, run)
    params = nnx.to_pure_dict(state)
    if int8 if int8 is not None else cfg.serve.int8_weights:
        params = jax.jit(lambda p: quantize_params(p, embedding=int8_embedding))(params)
        cfg = dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, int8_weights=True))
    return cfg, mesh, params, tok


def _copy_tokenizer(src: Path, out: Path) -> None:
    """The tokenizer file `src` into `out` under the name load_tokenizer_dir reads (tokenizer.json
    or tokenizer.model); from a Hugging Face layout (src named as one of its tokenizer files) also
    the files beside it that set specials, chat template and stop ids."""
    from interop.tokenizers import TOKENIZER_FILES
    shutil.copy(src, out / ("tokenizer.json" if src.suffix == ".json" else "tokenizer.model"))
    if src.name in TOKENIZER_FILES:
        for name in TOKENIZER_FILES + ("generation_config.json",):
            if name != src.name and (src.parent / name).is_file():
                shutil.copy(src.parent / name, out / name)


def save_int8(out_dir: str, cfg: Config, params: dict, tokenizer_path: str | None,
              embedding: bool = True) -> None:
    """Write an int8 checkpoint: config.yaml, the tokenizer, int8.json, params (orbax)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_config(out, dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, int8_weights=True)))
    if tokenizer_path and Path(tokenizer_path).is_file():
        _copy_tokenizer(Path(tokenizer_path), out)
    ckpt = Checkpointer(out, async_save=False)
    ckpt.save(0, to_storable(params), meta={"step": 0, "int8": True}, force=True)
    ckpt.close()
    (out / INT8_MARKER).write_text(json.dumps({"embedding": embedding, "act_quant": True}))
