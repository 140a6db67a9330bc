"""Language modelling as a task of the Trainer: packed token rows, the token loss, and validation
loss / perplexity / bits per byte (cheap periodic eval, and the whole split against xz).

The Trainer (training/loop.py) calls a task's members in this order: configure, setup,
save_files, build_model, batch_shardings, compile_eval; then batch, evaluate and eval_message while
it runs. ClassifyTask (tasks/classify/train.py) is the other task.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

import data
from configs import Config, ConfigError
from model.stats import flops_per_token
from store.paths import run_path, write_atomic
from training.state import lm_model
from training.step import BATCH_KEYS, batch_sharding, jit_eval_step, lm_loss, to_global


def eval_sums(eval_fn, params, loader, token_bytes, n_batches: int, shardings: dict, stop=None) -> dict | None:
    """Summed nll (nats), scored tokens and their UTF-8 bytes over batches 0..n-1 (None if `stop()`)."""
    totals = {"nll_sum": 0.0, "tokens": 0.0, "bytes": 0.0}
    for i in range(n_batches):
        if stop is not None and stop():
            return None
        out = eval_fn(params, to_global(loader.batch(i), shardings), token_bytes)
        for k in totals:
            totals[k] += float(out[k])
    return totals


def evaluate(eval_fn, params, loader, token_bytes, n_batches: int, shardings: dict) -> dict:
    """Validation loss, perplexity and bits per byte over the first n batches (the cheap periodic
    eval: rows stand alone, so 1 in T tokens is not scored; see LMTask.full_validation)."""
    totals = eval_sums(eval_fn, params, loader, token_bytes, n_batches, shardings)
    loss = totals["nll_sum"] / max(totals["tokens"], 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50)),
            "val_bpb": data.bits_per_byte(totals["nll_sum"], totals["bytes"])}


class LMTask:
    """Next-token prediction on the data pipeline's packed rows (the Trainer's default task)."""

    name = "lm"

    def configure(self, cfg: Config) -> Config:
        """The config is already the language model's."""
        return cfg

    def setup(self, cfg: Config) -> None:
        """Tokenizer and loaders; bad input raises a ConfigError before the run directory is touched."""
        self.cfg, self.run_dir = cfg, run_path(cfg.train.run_dir)
        pi, pc = jax.process_index(), jax.process_count()
        self.tokenizer = self._tokenizer()
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"tokenizer {self.tokenizer.path} has {self.tokenizer.vocab_size} tokens but "
                              f"model.vocab_size is {cfg.model.vocab_size}")
        prepared = data.prepared_dir(cfg, self.tokenizer, self.run_dir, pi)  # once: it hashes and stats the corpus
        self.train_data = data.make_loader(cfg, self.tokenizer, self.run_dir, "train", pi, pc, prepared)
        self.val_data = data.make_loader(cfg, self.tokenizer, self.run_dir, "val", pi, pc, prepared)
        self._stream, self._next_step = None, 0
        self.token_bytes = jnp.asarray(data.token_bytes(self.tokenizer), jnp.float32)
        self.loss = lm_loss(cfg.train.z_loss)
        self.tokens_per_batch = cfg.train.batch_size * cfg.data.seq_len
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        n_eval = min(cfg.train.eval_batches, self.val_data.num_batches)
        self.eval_label = f"val bpb (first {n_eval} batch{'es' if n_eval != 1 else ''})"

    def _tokenizer(self):
        """The starting checkpoint's tokenizer (copied into the run) when fine-tuning, else data's."""
        init_from = self.cfg.train.init_from
        from interop.tokenizers import TOKENIZER_FILES, has_tokenizer, load_tokenizer_dir
        if not init_from or not has_tokenizer(init_from):
            return data.load_tokenizer(self.cfg, str(self.run_dir))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            src, dst = Path(init_from) / name, self.run_dir / name
            if src.is_file() and not dst.exists() and jax.process_index() == 0:
                write_atomic(dst, src.read_bytes())
        return load_tokenizer_dir(init_from)

    def save_files(self, run_dir) -> None:
        """The run keeps the tokenizer it was trained with."""
        kept, src = run_dir / "tokenizer.model", run_path(self.tokenizer.path)
        if src.suffix == ".model" and not kept.exists() and jax.process_index() == 0:
            write_atomic(kept, src.read_bytes())

    def build_model(self):
        """The Transformer whose params are trained."""
        return lm_model(self.cfg)()

    def pretrained(self, params: dict) -> dict:
        """A language model's params are all of this task's params."""
        return params

    def checkpoint_meta(self) -> dict:
        return {}

    def batch_shardings(self, mesh: Mesh) -> dict:
        """Every batch key is [B,T]: rows over the data axes."""
        return {k: batch_sharding(mesh) for k in BATCH_KEYS}

    def batch(self, step: int) -> dict:
        """This process's rows of training batch `step`, computed ahead by the loader's stream."""
        if self._stream is None or self._next_step != step:  # first call, or a jump (resume, eval)
            self._stop_stream()
            self._stream = self.train_data.stream(step, self.cfg.data.workers, self.cfg.data.prefetch)
        self._next_step = step + 1
        return next(self._stream)

    def _stop_stream(self) -> None:
        stream, self._stream = getattr(self, "_stream", None), None
        if stream is not None:
            stream.close()

    def close(self) -> None:
        """Stop the loader's prefetching (and its worker processes) and close its shard files."""
        self._stop_stream()
        for loader in (getattr(self, "train_data", None), getattr(self, "val_data", None)):
            if loader is not None:
                loader.shards.close()

    def compile_eval(self, graphdef, mesh: Mesh, param_shardings) -> None:
        """Jit the eval step for these params."""
        self.graphdef, self.shardings = graphdef, self.batch_shardings(mesh)
        self.eval_fn = jit_eval_step(graphdef, mesh, param_shardings)

    def evaluate(self, params) -> dict:
        """val_loss, val_ppl, val_bpb over the first train.eval_batches validation batches."""
        return evaluate(self.eval_fn, params, self.val_data, self.token_bytes, self.cfg.train.eval_batches,
                        self.shardings)

    def eval_message(self, step: int, metrics: dict) -> str:
        if step == 0:
            return f"step 0: {self.eval_label} {metrics['val_bpb']:.3f}"
        return f"step {step}: val loss {metrics['val_loss']:.4f}, {self.eval_label} {metrics['val_bpb']:.3f}"

    def full_validation(self, params, stop) -> dict | None:
        """The model and xz -9e on the same bytes: the whole validation split, every token once.

        Overlapping rows (data.full_pass_loader) make every token of every validation document
        (and its eos) a target exactly once. Bits per byte = summed nll (nats) / ln 2 / the UTF-8
        length of the validation texts concatenated, which are exactly the bytes xz was given when
        the data was prepared (nan when the split was over data.prepare's XZ_MAX_BYTES).
        `full_val_token_bytes` is what the scored tokens' pieces spell: equal to `full_val_bytes`
        for a lossless tokenizer. None when `stop()` turns true meanwhile.
        """
        t0 = time.time()
        full = data.full_pass_loader(self.val_data, jax.process_index(), jax.process_count())
        totals = eval_sums(self.eval_fn, params, full, self.token_bytes, full.num_batches, self.shardings, stop)
        if totals is None:
            return None
        eval_seconds = time.time() - t0
        val = self.val_data.shards.info  # the prepared split's totals: the bytes xz was given
        xz = val.get("xz_bpb")
        return {"full_val_documents": val["documents"], "full_val_bytes": val["bytes"],
                "full_val_tokens": totals["tokens"], "full_val_token_bytes": totals["bytes"],
                "full_val_loss": totals["nll_sum"] / max(totals["tokens"], 1),
                "full_val_bpb": data.bits_per_byte(totals["nll_sum"], val["bytes"]),
                "xz_bpb": float("nan") if xz is None else xz,
                "full_val_seconds": eval_seconds}
