"""Load a YAML preset (with `base:` inheritance) plus `a.b=value` overrides into a typed Config."""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from pathlib import Path

import yaml

from configs.schema import CHOICES, Config

CONFIG_DIR = Path(__file__).resolve().parent


class ConfigError(ValueError):
    """A bad config: the message is one line naming the key, file or value."""


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _all_keys(cls=Config, prefix="") -> list[str]:
    keys = []
    for name, f in _fields(cls).items():
        sub = typing.get_type_hints(cls)[name]
        if dataclasses.is_dataclass(sub):
            keys += _all_keys(sub, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _unknown(key: str) -> ConfigError:
    near = difflib.get_close_matches(key, _all_keys(), n=1, cutoff=0.5)
    hint = f" (did you mean '{near[0]}'?)" if near else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value, hint):
    """Check `value` against the annotated type `hint`; YAML-parse strings from the command line."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        return tuple(_coerce(key, v, item) for v in value)
    if isinstance(value, str) and hint is not str:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            pass
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, str):  # YAML 1.1 reads '1e-3' as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    type_name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"config key '{key}' expects {type_name}, got {value!r}")


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    """Read a preset, merging it over its `base:` chain."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path in seen:
        raise ConfigError(f"config file {path} inherits from itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    base = data.pop("base", None)
    if base is None:
        return data
    base_path = (path.parent / base).resolve()
    if not base_path.suffix:
        base_path = base_path.with_suffix(".yaml")
    return _merge(_read_yaml(base_path, seen + (path,)), data)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in hints:
            raise _unknown(full)
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"config section '{full}' must be a mapping")
            kwargs[key] = _build(hint, value, f"{full}.")
        else:
            value = _coerce(full, value, hint)
            if full in CHOICES and value not in CHOICES[full]:
                raise ConfigError(f"config key '{full}' must be one of {', '.join(CHOICES[full])}; got {value!r}")
            kwargs[key] = value
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict:
    """Turn ['model.d_model=512', ...] into a nested dict (values still strings)."""
    nested: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = nested
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise _unknown(key)
        node[parts[-1]] = value
    return nested


def resolve_path(path: str | os.PathLike) -> Path:
    """A preset path as given, or a bare name looked up in configs/ ('tiny' -> configs/tiny.yaml)."""
    p = Path(path)
    if not p.exists() and p.suffix not in (".yaml", ".yml") and (CONFIG_DIR / f"{p}.yaml").exists():
        return CONFIG_DIR / f"{p}.yaml"
    return p


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Load a preset over configs/base.yaml, apply overrides, and validate the result."""
    data = _read_yaml(CONFIG_DIR / "base.yaml")
    if path is not None:
        resolved = resolve_path(path)
        if not resolved.is_file():
            raise ConfigError(f"config file not found: {path} (nor configs/{Path(path).stem}.yaml)")
        data = _merge(data, _read_yaml(resolved.resolve()))
    data = _merge(data, parse_overrides(list(overrides)))
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


def from_dict(data: dict) -> Config:
    """Rebuild a Config from `to_dict` output (e.g. saved with a checkpoint)."""
    cfg = _build(Config, _merge(_read_yaml(CONFIG_DIR / "base.yaml"), data))
    validate(cfg)
    return cfg


def check_uri(value: str, key: str) -> None:
    """A path a run reads or writes: local, or gs:// with gcsfs installed; else a ConfigError."""
    if "://" not in value:
        return
    if not value.startswith("gs://"):
        raise ConfigError(f"{key}={value}: the {value.split('://')[0]}:// scheme is not supported "
                          f"(local paths and gs:// are)")
    import importlib.util
    if importlib.util.find_spec("gcsfs") is None:
        raise ConfigError(f"{key}={value}: gs:// paths need gcsfs: pip install '.[gcs]'")


def validate(cfg: Config) -> None:
    """Checks that need more than one key; device-dependent checks live in sharding.mesh."""
    m = cfg.model
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_dim", "max_seq_len"):
        if getattr(m, key) <= 0:
            raise ConfigError(f"config key 'model.{key}' must be positive; got {getattr(m, key)}")
    for key in ("sliding_window", "global_every", "query_pre_attn_scalar", "final_logit_softcap", "attn_logit_softcap"):
        if getattr(m, key) < 0:
            raise ConfigError(f"config key 'model.{key}' must be >= 0 (0 = off); got {getattr(m, key)}")
    if m.logits_chunk < -1:
        raise ConfigError(f"config key 'model.logits_chunk' must be >= -1 (0 = auto, -1 = whole rows); got {m.logits_chunk}")
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(f"model.n_heads ({m.n_heads}) must be a multiple of model.n_kv_heads ({m.n_kv_heads})")
    if not m.head_dim and m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model ({m.d_model}) is not divisible by model.n_heads ({m.n_heads}); set model.head_dim")
    if cfg.data.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len ({cfg.data.seq_len}) exceeds model.max_seq_len ({m.max_seq_len})")
    for key in ("train.run_dir", "train.init_from", "train.compiled_step", "data.path", "data.val_path",
                "data.tokenizer", "data.cache_dir"):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        check_uri(value, key)
    for key in ("workers", "prepare_workers"):
        if getattr(cfg.data, key) < 0:
            raise ConfigError(f"config key 'data.{key}' must be >= 0; got {getattr(cfg.data, key)}")
    if cfg.data.prefetch < 1:
        raise ConfigError(f"config key 'data.prefetch' must be >= 1; got {cfg.data.prefetch}")
    if cfg.train.batch_size <= 0 or cfg.train.grad_accum <= 0:
        raise ConfigError("train.batch_size and train.grad_accum must be positive")
    if cfg.train.batch_size % cfg.train.grad_accum:
        raise ConfigError(f"train.batch_size ({cfg.train.batch_size}) must be divisible by train.grad_accum ({cfg.train.grad_accum})")
    if not 0.0 <= cfg.task.dropout < 1.0:
        raise ConfigError(f"config key 'task.dropout' must be in [0, 1); got {cfg.task.dropout}")
    if cfg.task.lm_loss_weight < 0:
        raise ConfigError(f"config key 'task.lm_loss_weight' must be >= 0; got {cfg.task.lm_loss_weight}")
    validate_serve(cfg)
    sizes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor]
    if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh sizes data/fsdp/tensor must be positive with at most one -1; got {sizes}")


def validate_serve(cfg: Config) -> None:
    """The serve section's ranges (the budget itself is checked at start-up, serving/budget.py)."""
    s = cfg.serve
    for key in ("page_size", "max_batch", "max_queue"):
        if getattr(s, key) <= 0:
            raise ConfigError(f"config key 'serve.{key}' must be positive; got {getattr(s, key)}")
    for key in ("num_pages", "kv_cache_memory", "max_model_len"):
        if getattr(s, key) < 0:
            raise ConfigError(f"config key 'serve.{key}' must be >= 0 (0 = automatic); got {getattr(s, key)}")
    if not 0 < s.memory_utilization <= 1:
        raise ConfigError(f"config key 'serve.memory_utilization' must be in (0, 1]; got {s.memory_utilization}")
    if not s.prefill_buckets or min(s.prefill_buckets) <= 0:
        raise ConfigError(f"config key 'serve.prefill_buckets' must be positive sizes; got {list(s.prefill_buckets)}")
    if s.max_model_len > cfg.model.max_seq_len:
        raise ConfigError(f"config key 'serve.max_model_len' ({s.max_model_len}) exceeds the model's context "
                          f"model.max_seq_len ({cfg.model.max_seq_len})")
