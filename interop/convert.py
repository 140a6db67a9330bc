"""Import an HF directory as a Tessera run directory, and export a run directory back to HF.

Both write into a temporary directory beside OUT_DIR and rename it into place at the end, so a
failure (bad input, full disk, Ctrl-C) never leaves a half-written OUT_DIR. All input checks
(architecture, tensor names and shapes, shards) run before anything is written.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from flax import nnx

from configs import Config
from interop.hf_config import HFError, hf_config_from_model, read_json
from interop.hf_weights import export_params
from interop.load import hf_config, load_hf_params, load_tokenizer_for
from interop.tokenizers import TOKENIZER_FILES

HF_CONFIG_COPY = "hf_config.json"  # the imported config.json, kept for provenance and export


@contextmanager
def staged_output(out_dir: str | Path):
    """Yield a temp dir beside `out_dir`; rename it to `out_dir` on success, delete it on error."""
    out = Path(out_dir).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HFError(f"output directory {out} already exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _copy_files(src: Path, dst: Path, names) -> None:
    for name in names:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def _default_mesh(cfg: Config):
    from sharding.mesh import make_mesh
    return make_mesh(cfg)


def import_hf(hf_dir: str | Path, out_dir: str | Path, mesh=None, overrides: list[str] | tuple = (),
              progress: bool = True) -> Config:
    """Convert an HF directory into a Tessera run directory: config.yaml, checkpoints/0/params,
    the tokenizer files and generation_config.json. Params are sharded on `mesh` (default: the
    config's mesh over all devices) while in memory. Returns the written Config."""
    from store.checkpoint import save_params
    hf_dir = Path(hf_dir)
    cfg = hf_config(hf_dir, overrides)
    mesh = _default_mesh(cfg) if mesh is None else mesh
    graphdef, params = load_hf_params(hf_dir, cfg, mesh, progress=progress)
    with staged_output(out_dir) as tmp:
        save_params(tmp, cfg, params, step=0)
        _copy_files(hf_dir, tmp, TOKENIZER_FILES + ("generation_config.json",))
        shutil.copy2(hf_dir / "config.json", tmp / HF_CONFIG_COPY)
    return cfg


def _special_ids(run_dir: Path, tokenizer) -> tuple:
    """(bos, eos) for config.json: the imported config's when present, else the tokenizer's."""
    if (run_dir / HF_CONFIG_COPY).is_file():
        src = read_json(run_dir / HF_CONFIG_COPY)
        return src.get("bos_token_id"), src.get("eos_token_id")
    if tokenizer is None:
        return None, None
    valid = lambda i: i if i is not None and i >= 0 else None
    return valid(tokenizer.bos_id), valid(tokenizer.eos_id)


def export_hf(run_dir: str | Path, out_dir: str | Path, mesh=None, dtype: str | None = None,
              max_shard_bytes: int = 5 << 30, overrides: list[str] | tuple = (),
              progress: bool = True) -> list[str]:
    """Write a Tessera run directory as an HF directory that transformers loads: config.json,
    generation_config.json, model.safetensors (or shards + index) and the tokenizer files.
    `dtype` (float32 | bfloat16 | float16) defaults to model.param_dtype. Returns weight files."""
    from store.checkpoint import load_params, read_config
    run_dir = Path(run_dir)
    cfg = read_config(run_dir, list(overrides))
    dtype = dtype or cfg.model.param_dtype
    if dtype not in ("float32", "bfloat16", "float16"):
        raise HFError(f"unsupported export dtype {dtype!r} (float32, bfloat16 or float16)")
    tokenizer = load_tokenizer_for(run_dir, cfg)
    bos, eos = _special_ids(run_dir, tokenizer)
    config = hf_config_from_model(cfg.model, bos, eos, dtype)  # fails on unexportable models first
    mesh = _default_mesh(cfg) if mesh is None else mesh
    _, params = load_params(run_dir, cfg, mesh)
    with staged_output(out_dir) as tmp:
        files = export_params(tmp, cfg.model, nnx.to_pure_dict(params), dtype, max_shard_bytes, progress)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if (run_dir / "generation_config.json").is_file():
            shutil.copy2(run_dir / "generation_config.json", tmp / "generation_config.json")
        else:
            gen = {k: v for k, v in (("bos_token_id", bos), ("eos_token_id", eos)) if v is not None}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        _copy_files(run_dir, tmp, TOKENIZER_FILES)
        if tokenizer is not None and not (tmp / Path(tokenizer.path).name).is_file():
            shutil.copy2(tokenizer.path, tmp / Path(tokenizer.path).name)  # data.tokenizer elsewhere
        if tokenizer is not None and not (run_dir / "tokenizer_config.json").is_file():
            # A Tessera-trained sentencepiece model: tell transformers which class reads it.
            tok_cfg = {"tokenizer_class": "LlamaTokenizer", "bos_token": tokenizer.bos_token,
                       "eos_token": tokenizer.eos_token, "add_bos_token": tokenizer.add_bos, "add_eos_token": False}
            (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    return files
