"""Run directories and orbax checkpoints.

A Tessera checkpoint is a run directory:
  RUN_DIR/config.yaml            the resolved config (model architecture included)
  RUN_DIR/tokenizer.model        sentencepiece model (or Hugging Face tokenizer files)
  RUN_DIR/checkpoints/<step>/    orbax items: params, opt_state (training only), meta (JSON)
Orbax writes each step into a temporary directory and renames it when complete, so a save
interrupted by a crash is never listed; a finished step that fails to restore (truncated on
disk) is skipped with a warning and the previous one is used.
"""
from __future__ import annotations

import logging
import os

import jax
import orbax.checkpoint as ocp
import yaml
from flax import nnx

from configs import Config, ConfigError, from_dict, to_dict
from store.paths import run_path, write_atomic

log = logging.getLogger("tessera")


def write_config(run_dir, cfg: Config) -> None:
    """Write RUN_DIR/config.yaml atomically (process 0 only); RUN_DIR may be gs://."""
    if jax.process_index() != 0:
        return
    run_dir = run_path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())


def read_config(run_dir, overrides: list[str] = ()) -> Config:
    """The config saved in a run directory, with optional overrides (e.g. serve.* keys)."""
    path = run_path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a Tessera checkpoint: {path.name} not found")
    from configs.loader import _merge, parse_overrides
    return from_dict(_merge(yaml.safe_load(path.read_text()), parse_overrides(list(overrides))))


def to_pure(state) -> dict:
    """nnx.State -> nested dict of arrays (the on-disk layout of `params`)."""
    return nnx.to_pure_dict(state)


class Checkpointer:
    """Save and restore training state in RUN_DIR/checkpoints with orbax."""

    def __init__(self, run_dir, keep: int = 3, async_save: bool = True):
        self.directory = run_path(run_dir) / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, params, opt_state=None, meta: dict | None = None, force: bool = False) -> bool:
        """Start an (async) save of pure-dict params, optimizer state and JSON meta."""
        items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(meta or {})}
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, abstract_params, abstract_opt_state=None, step: int | None = None):
        """Restore the newest loadable step (or `step`): (step, params, opt_state, meta) or None.

        Abstract trees carry the target shardings, so a restore onto a different mesh reshards.
        """
        candidates = [step] if step is not None else self.steps()[::-1]
        for s in candidates:
            items = {"params": ocp.args.StandardRestore(abstract_params), "meta": ocp.args.JsonRestore()}
            if abstract_opt_state is not None:
                items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
            try:
                out = self.manager.restore(s, args=ocp.args.Composite(**items))
            except Exception as e:  # a truncated or corrupted step: fall back to the previous one
                log.warning("checkpoint step %d in %s is unreadable (%s); moved aside to %s, trying an "
                            "older one", s, self.directory, str(e).splitlines()[0][:200], f"unreadable-{s}")
                self._set_aside(s)
                continue
            return s, out["params"], out.get("opt_state"), out["meta"]
        return None

    def _set_aside(self, step: int) -> None:
        """Rename an unreadable step out of orbax's view (kept for inspection, never loaded), so a
        resumed run can save that step number again."""
        if jax.process_index() == 0:
            src = self.directory / str(step)
            if src.is_dir():
                dst = self.directory / f"unreadable-{step}"
                if dst.exists():
                    dst = self.directory / f"unreadable-{step}-{os.getpid()}"
                src.rename(dst)
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_pure(state, shardings) -> dict:
    """ShapeDtypeStructs with target shardings, in the pure-dict layout of `params`."""
    pure = nnx.to_pure_dict(state)
    shard = nnx.to_pure_dict(shardings) if not isinstance(shardings, dict) else shardings
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), pure, shard)


def load_params(run_dir, cfg: Config, mesh, rules: str | None = None):
    """Restore the newest params of a run directory onto `mesh` under `rules`: (graphdef, state)."""
    from model.init import param_shardings
    graphdef, abstract, shardings = param_shardings(cfg, mesh, rules)
    nnx.replace_by_pure_dict(abstract, restore_params(run_dir, abstract_pure(abstract, shardings)))
    return graphdef, abstract


def restore_params(run_dir, abstract: dict) -> dict:
    """The newest loadable params of a run directory, restored into `abstract` (ShapeDtypeStructs
    carrying their target shardings, pure-dict layout)."""
    if not (run_path(run_dir) / "checkpoints").is_dir():
        raise ConfigError(f"{run_dir} has no checkpoints/ directory")
    ckpt = Checkpointer(run_dir, async_save=False)
    try:
        found = ckpt.restore(abstract)
    finally:
        ckpt.close()
    if found is None:
        raise ConfigError(f"no loadable checkpoint in {run_dir}/checkpoints")
    return found[1]


def save_params(run_dir, cfg: Config, state, step: int = 0) -> None:
    """Write a params-only checkpoint (used by imports and offline quantization)."""
    write_config(run_dir, cfg)
    ckpt = Checkpointer(run_dir, async_save=False)
    ckpt.save(step, to_pure(state), meta={"step": step}, force=True)
    ckpt.close()
