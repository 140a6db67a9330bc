"""One loader for fine-tuning and serving: a Tessera run directory or a Hugging Face directory.

    cfg, graphdef, params, tokenizer = load_checkpoint(path, mesh, rules=None, overrides=())

- Tessera run directory (has config.yaml): the saved config plus `overrides`, the newest params
  restored by orbax onto `mesh` (resharded if the mesh differs from the one that saved them).
- Hugging Face directory (config.json + safetensors): the architecture read from config.json,
  base.yaml defaults for everything else (params fp32 unless model.param_dtype is overridden),
  then `overrides`; every device shard is built straight from the memory-mapped safetensors, so
  nothing is written and no host copy of the model is made.
Either way `params` is an nnx.State for `nnx.merge(graphdef, params)`, sharded by the logical-axis
rules `rules` (default cfg.mesh.rules); the tokenizer is None when the directory has none.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from flax import nnx

from configs import ARCHITECTURE_FIELDS, Config, ConfigError
from interop.hf_config import HFError, model_config_from_hf, read_json, tessera_config
from interop.hf_weights import load_params_from_hf
from interop.tokenizers import has_tokenizer, load_tokenizer_dir


def hf_config(hf_dir: str | Path, overrides: list[str] | tuple = ()) -> Config:
    """The Tessera Config of an HF directory's config.json, with `overrides` applied."""
    return tessera_config(model_config_from_hf(read_json(Path(hf_dir) / "config.json")), overrides)


def _kind(p: Path) -> str:
    if (p / "config.yaml").is_file():
        return "tessera"
    if (p / "config.json").is_file():
        return "hf"
    if not p.is_dir():
        raise ConfigError(f"checkpoint directory not found: {p}")
    raise HFError(f"{p} is neither a Tessera run directory (config.yaml) nor a Hugging Face "
                  "model directory (config.json + *.safetensors)")


def checkpoint_config(path: str | Path, overrides: list[str] | tuple = ()) -> Config:
    """The Config of either kind of directory, without reading any weights."""
    p = Path(path)
    if _kind(p) == "tessera":
        from store.checkpoint import read_config
        return read_config(p, list(overrides))
    return hf_config(p, overrides)


def adopt_architecture(cfg: Config, source: Config) -> Config:
    """`cfg` with the model architecture of `source` (e.g. a fine-tuning config taking the shape
    of its train.init_from checkpoint); runtime choices (dtypes, remat, scan, attention) stay."""
    arch = {k: getattr(source.model, k) for k in ARCHITECTURE_FIELDS}
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **arch))


def load_hf_params(hf_dir: str | Path, cfg: Config, mesh, rules: str | None = None, progress: bool = True):
    """(graphdef, params state) of an HF directory, sharded on `mesh` under `rules`."""
    from model.init import param_shardings
    from store.checkpoint import abstract_pure
    graphdef, abstract, shardings = param_shardings(cfg, mesh, rules)
    params = load_params_from_hf(hf_dir, cfg.model, abstract_pure(abstract, shardings), progress)
    nnx.replace_by_pure_dict(abstract, params)
    return graphdef, abstract


def load_tokenizer_for(path: Path, cfg: Config | None = None):
    """The directory's tokenizer, else the config's data.tokenizer file, else None."""
    if has_tokenizer(path):
        return load_tokenizer_dir(path)
    if cfg is not None and cfg.data.tokenizer and Path(cfg.data.tokenizer).is_file():
        from interop.tokenizers import SentencePieceTokenizer
        return SentencePieceTokenizer(cfg.data.tokenizer)
    return None


def load_checkpoint(path: str | Path, mesh, rules: str | None = None, overrides: list[str] | tuple = (),
                    progress: bool = True):
    """(cfg, graphdef, params state, tokenizer or None) of a Tessera run dir or an HF dir."""
    p = Path(path)
    cfg = checkpoint_config(p, overrides)
    if _kind(p) == "tessera":
        from store.checkpoint import load_params
        graphdef, params = load_params(p, cfg, mesh, rules)
    else:
        graphdef, params = load_hf_params(p, cfg, mesh, rules, progress)
    return cfg, graphdef, params, load_tokenizer_for(p, cfg)
