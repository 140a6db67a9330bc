"""A compiled train step saved by `compile.py --save DIR` and loaded at launch (train.compiled_step).

The file is the XLA executable itself (jax.experimental.serialize_executable, the mechanism
MaxText's train_compile uses), not StableHLO: loading it skips tracing and compilation. It only
runs where it was compiled for, so next to it lies a JSON fingerprint: the config keys compiled
into the step, the device kind and count, and the jax and libtpu versions. A launch whose config
or machine differs is told which key differs and compiles as usual.
"""
from __future__ import annotations

import json
import pickle
import jax

from configs import Config, to_dict
from store.paths import run_path, write_atomic

EXE_FILE, META_FILE = "train_step.jaxexe", "train_step.json"
# Train keys that do not change the compiled step (logging, evaluation, paths, init).
NOT_COMPILED = {"run_dir", "log_every", "eval_every", "eval_batches", "profile_start", "profile_steps",
                "init_from", "seed", "compiled_step"}


def _versions() -> dict:
    from importlib import metadata
    out = {"jax": jax.__version__}
    for pkg in ("jaxlib", "libtpu"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def resolved(cfg: Config, platform: str | None = None) -> Config:
    """cfg with model.compute_dtype / attention_impl 'auto' resolved for `platform` (default: here)."""
    import dataclasses
    from model.attention import resolve_impl
    from model.layers import resolve_compute_dtype
    platform = platform or jax.default_backend()
    m = cfg.model
    dtype = resolve_compute_dtype(m.compute_dtype, platform)
    impl = resolve_impl(m.attention_impl, logit_softcap=m.attn_logit_softcap, platform=platform)
    return dataclasses.replace(cfg, model=dataclasses.replace(m, compute_dtype=dtype, attention_impl=impl))


def fingerprint(cfg: Config) -> dict:
    """Flat {key: value} of everything in the config that is compiled into the train step."""
    d = to_dict(cfg)
    flat = {f"model.{k}": v for k, v in d["model"].items()}
    flat.update({f"mesh.{k}": v for k, v in d["mesh"].items()})
    flat.update({f"train.{k}": v for k, v in d["train"].items() if k not in NOT_COMPILED})
    flat["data.seq_len"] = d["data"]["seq_len"]
    return {k: list(v) if isinstance(v, tuple) else v for k, v in flat.items()}


def save_executable(directory, compiled, cfg: Config, target: str, devices):
    """Write the executable and its fingerprint into `directory`; returns the executable's path.

    `devices` are those it was compiled for; `target` names them for people (e.g. v5p-8)."""
    from jax.experimental.serialize_executable import serialize
    directory = run_path(directory)  # local or gs://
    directory.mkdir(parents=True, exist_ok=True)
    payload, in_tree, out_tree = serialize(compiled)
    write_atomic(directory / EXE_FILE, pickle.dumps((payload, in_tree, out_tree)))
    meta = {"target": target, "device_kind": devices[0].device_kind, "n_devices": len(devices),
            "versions": _versions(), "config": fingerprint(cfg)}
    write_atomic(directory / META_FILE, json.dumps(meta, indent=2).encode())
    return directory / EXE_FILE


def check_compatible(directory, cfg: Config, devices=None) -> str | None:
    """None when the saved step fits this run and machine, else the one-line reason it does not."""
    directory = run_path(directory)
    if not (directory / EXE_FILE).is_file() or not (directory / META_FILE).is_file():
        return f"{directory} holds no saved train step ({EXE_FILE} and {META_FILE})"
    meta = json.loads((directory / META_FILE).read_text())
    devices = jax.devices() if devices is None else devices
    if meta["device_kind"] != devices[0].device_kind or meta["n_devices"] != len(devices):
        return (f"it was compiled for {meta['n_devices']} x {meta['device_kind']}, this run has "
                f"{len(devices)} x {devices[0].device_kind}")
    now = _versions()
    for pkg, version in meta["versions"].items():
        if pkg != "libtpu" or devices[0].platform == "tpu":
            if now.get(pkg) != version:
                return f"it was compiled with {pkg} {version}, this run has {now.get(pkg)}"
    mine = fingerprint(resolved(cfg, devices[0].platform))
    for key, value in meta["config"].items():
        if mine.get(key) != value:
            return f"it was compiled with {key}={value!r}, this run has {mine.get(key)!r}"
    extra = sorted(set(mine) - set(meta["config"]))
    return f"it predates config key {extra[0]}" if extra else None


def load_executable(directory, cfg: Config, devices=None):
    """(jax.stages.Compiled, None) when the saved step can run here, else (None, reason)."""
    reason = check_compatible(directory, cfg, devices)
    if reason:
        return None, reason
    from jax.experimental.serialize_executable import deserialize_and_load
    payload, in_tree, out_tree = pickle.loads((run_path(directory) / EXE_FILE).read_bytes())
    try:
        return deserialize_and_load(payload, in_tree, out_tree), None
    except Exception as e:  # a runtime that cannot load it: compile as usual instead
        return None, f"loading it failed: {(str(e).strip().splitlines() or [type(e).__name__])[0][:200]}"


def use_saved_step(trainer) -> bool:
    """Swap a Trainer's jitted step for the one saved in cfg.train.compiled_step, if it fits.

    Says on stderr which one runs; a mismatch is not an error: the step compiles as usual."""
    import sys
    directory = trainer.cfg.train.compiled_step
    compiled, reason = load_executable(directory, trainer.cfg)
    if compiled is None:
        print(f"train.compiled_step: not using {directory}: {reason}; compiling the train step",
              file=sys.stderr, flush=True)
        return False
    trainer.train_fn = compiled
    print(f"train.compiled_step: running the train step compiled in {directory}", file=sys.stderr, flush=True)
    return True
