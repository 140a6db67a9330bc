"""The training loop: set up (or resume) a run, step, evaluate, log and checkpoint.

Side effects live here and in train.py; the step itself is the pure function in training/step.py.
"""
from __future__ import annotations

import math
import shutil
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx

import data
from configs import Config, ConfigError, to_dict
from configs.loader import validate
from model.stats import flops_per_token
from sharding.mesh import make_mesh
from store.checkpoint import Checkpointer, write_config
from training.metrics import MetricsLogger, peak_flops, throughput
from training.optimizer import learning_rate, make_optimizer
from training.state import abstract_with_shardings, init_train_state, state_layout
from training.step import batch_sharding, jit_eval_step, jit_train_step


class StopRequested:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint and exits at the next step."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name


def check_run_dir(cfg: Config) -> None:
    """Refuse to resume a run directory that holds a different model architecture."""
    saved = Path(cfg.train.run_dir) / "config.yaml"
    if not saved.is_file():
        return
    old = (yaml.safe_load(saved.read_text()) or {}).get("model", {})
    for key, value in to_dict(cfg)["model"].items():
        if key in ("remat", "attention_impl", "scan_layers", "compute_dtype"):
            continue  # execution choices, not architecture
        if key in old and old[key] != value and not (isinstance(value, tuple) and list(value) == old[key]):
            raise ConfigError(f"train.run_dir {cfg.train.run_dir} holds a run with model.{key}={old[key]!r}, "
                              f"not {value!r}; choose a new train.run_dir")


def to_global(batch: dict, sharding) -> dict:
    """This process's rows -> global arrays sharded over the data axes."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def eval_sums(eval_fn, params, loader, token_bytes, n_batches: int, sharding, stop=None) -> dict | None:
    """Summed nll (nats), scored tokens and their UTF-8 bytes over batches 0..n-1 (None if `stop()`)."""
    totals = {"nll_sum": 0.0, "tokens": 0.0, "bytes": 0.0}
    for i in range(n_batches):
        if stop is not None and stop():
            return None
        out = eval_fn(params, to_global(loader.batch(i), sharding), token_bytes)
        for k in totals:
            totals[k] += float(out[k])
    return totals


def evaluate(eval_fn, params, loader, token_bytes, n_batches: int, sharding) -> dict:
    """Validation loss, perplexity and bits per byte over the first n batches (the cheap periodic
    eval: rows stand alone, so 1 in T tokens is not scored; see Trainer.full_validation)."""
    totals = eval_sums(eval_fn, params, loader, token_bytes, n_batches, sharding)
    loss = totals["nll_sum"] / max(totals["tokens"], 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50)),
            "val_bpb": data.bits_per_byte(totals["nll_sum"], totals["bytes"])}


class Trainer:
    """Owns the mesh, data, state and sinks of one run; `run()` trains to cfg.train.steps."""

    def __init__(self, cfg: Config, log_enabled: bool = True):
        if cfg.train.init_from:  # fine-tuning takes the architecture of its starting checkpoint
            from interop.load import adopt_architecture, checkpoint_config
            cfg = adopt_architecture(cfg, checkpoint_config(cfg.train.init_from))
            validate(cfg)
        self.cfg = cfg
        check_run_dir(cfg)
        self.run_dir = Path(cfg.train.run_dir)
        self.mesh = make_mesh(cfg)
        pi, pc = jax.process_index(), jax.process_count()
        if cfg.train.batch_size % (pc * cfg.train.grad_accum):
            raise ConfigError(f"train.batch_size ({cfg.train.batch_size}) must divide over "
                              f"{pc} processes x {cfg.train.grad_accum} micro-batches")
        self.tokenizer = self._tokenizer()
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"tokenizer {self.tokenizer.path} has {self.tokenizer.vocab_size} tokens but "
                              f"model.vocab_size is {cfg.model.vocab_size}")
        self.train_data = data.make_loader(cfg, self.tokenizer, str(self.run_dir), "train", pi, pc)
        self.val_data = data.make_loader(cfg, self.tokenizer, str(self.run_dir), "val", pi, pc)
        write_config(self.run_dir, cfg)
        kept = self.run_dir / "tokenizer.model"  # the run keeps the tokenizer it was trained with
        if Path(self.tokenizer.path).suffix == ".model" and not kept.exists() and pi == 0:
            shutil.copyfile(self.tokenizer.path, kept)

        self.optimizer, self.schedule = make_optimizer(cfg.train), learning_rate(cfg.train)
        self.graphdef, self.abstract, self.shardings = state_layout(cfg, self.mesh, self.optimizer)
        self.data_sharding = batch_sharding(self.mesh)
        self.checkpointer = Checkpointer(self.run_dir, cfg.checkpoint.keep, cfg.checkpoint.async_save)
        self.state, self.start_step = self._restore_or_init()
        self.train_fn = jit_train_step(cfg, self.graphdef, self.optimizer, self.schedule, self.mesh,
                                       self.shardings)
        self.eval_fn = jit_eval_step(self.graphdef, self.mesh, self.shardings["params"])
        self.token_bytes = jnp.asarray(data.token_bytes(self.tokenizer), jnp.float32)
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        self.logger = MetricsLogger(self.run_dir, cfg.train.steps, self.start_step, log_enabled)
        n_eval = min(cfg.train.eval_batches, self.val_data.num_batches)
        self.eval_label = f"val bpb (first {n_eval} batch{'es' if n_eval != 1 else ''})"
        self.stop: StopRequested | None = None

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
                shutil.copyfile(src, dst)
        return load_tokenizer_dir(init_from)

    def _restore_or_init(self):
        cfg = self.cfg
        target = abstract_with_shardings(self.abstract, self.shardings)
        found = self.checkpointer.restore(target["params"], target["opt_state"])
        if found is not None:
            step, params, opt_state, meta = found
            state = {"params": params, "opt_state": opt_state,
                     "step": jax.device_put(jnp.asarray(step, jnp.int32), self.shardings["step"])}
            return state, int(meta.get("step", step))
        if cfg.train.init_from:
            from interop.load import load_checkpoint
            _, _, params, _ = load_checkpoint(cfg.train.init_from, self.mesh, cfg.mesh.rules)
            return init_train_state(cfg, self.mesh, self.optimizer, self.shardings,
                                    nnx.to_pure_dict(params)), 0
        return init_train_state(cfg, self.mesh, self.optimizer, self.shardings), 0

    def save(self, step: int, force: bool = False) -> None:
        meta = {"step": step, "data_step": step, "seed": self.cfg.train.seed}
        self.checkpointer.save(step, self.state["params"], self.state["opt_state"], meta, force=force)

    def evaluate(self) -> dict:
        return evaluate(self.eval_fn, self.state["params"], self.val_data, self.token_bytes,
                        self.cfg.train.eval_batches, self.data_sharding)

    def full_validation(self, step: int) -> dict | None:
        """The model and xz -9e on the same bytes: the whole validation split, every token once.

        Overlapping rows (data.full_pass_loader) make every token of every validation document
        (and its eos) a target exactly once. Bits per byte = summed nll (nats) / ln 2 / the UTF-8
        length of the validation texts concatenated, which are exactly the bytes given to xz.
        `full_val_token_bytes` is what the scored tokens' pieces spell: equal to `full_val_bytes`
        for a lossless tokenizer. None when a signal arrives meanwhile.
        """
        t0 = time.time()
        full = data.full_pass_loader(self.val_data, jax.process_index(), jax.process_count())

        def stop() -> bool:  # one process alone must not leave the collective eval steps
            return jax.process_count() == 1 and self.stop is not None and self.stop.signal is not None

        totals = eval_sums(self.eval_fn, self.state["params"], full, self.token_bytes, full.num_batches,
                           self.data_sharding, stop)
        if totals is None:
            return None
        eval_seconds = time.time() - t0
        texts = data.validation_texts(self.cfg)
        n_bytes = data.utf8_bytes(texts)
        t1 = time.time()
        xz = data.xz_bits_per_byte(texts) if jax.process_index() == 0 else float("nan")
        out = {"full_val_documents": len(texts), "full_val_bytes": n_bytes,
               "full_val_tokens": totals["tokens"], "full_val_token_bytes": totals["bytes"],
               "full_val_loss": totals["nll_sum"] / max(totals["tokens"], 1),
               "full_val_bpb": data.bits_per_byte(totals["nll_sum"], n_bytes), "xz_bpb": xz,
               "full_val_seconds": eval_seconds, "xz_seconds": time.time() - t1}
        self.logger.log(step, out)
        return out

    def run(self) -> dict:
        """Train from the current step to cfg.train.steps; returns the last metrics seen."""
        cfg, tc = self.cfg, self.cfg.train
        self.stop = stop = StopRequested()
        summary = {"start_step": self.start_step}
        if self.start_step == 0 and tc.eval_every > 0:
            summary["initial"] = self.evaluate()
            self.logger.log(0, summary["initial"])
            self.logger.message(f"step 0: {self.eval_label} {summary['initial']['val_bpb']:.3f}")
        peak, n_dev = peak_flops(), jax.device_count()
        window_start, window_tokens, last = time.time(), 0.0, {}
        step = self.start_step
        profiling = False
        while step < tc.steps:
            if step == tc.profile_start:
                jax.profiler.start_trace(str(self.run_dir / "profile"))
                profiling = True
            batch = to_global(self.train_data.batch(step), self.data_sharding)
            self.state, metrics = self.train_fn(self.state, batch)
            step += 1
            if profiling and step >= tc.profile_start + tc.profile_steps:
                jax.block_until_ready(self.state)
                jax.profiler.stop_trace()
                profiling = False
            first = step == self.start_step + 1  # includes compilation: no throughput figures
            if not first:
                window_tokens += tc.batch_size * cfg.data.seq_len
            if first or step % tc.log_every == 0 or step == tc.steps or stop.signal:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not math.isfinite(metrics["loss"]):
                    raise FloatingPointError(f"loss is {metrics['loss']} at step {step}; lower train.lr")
                if not first and window_tokens:
                    elapsed = time.time() - window_start
                    metrics.update(throughput(window_tokens, elapsed, self.flops_per_token, n_dev, peak))
                    metrics["step_time"] = elapsed * tc.batch_size * cfg.data.seq_len / window_tokens
                    self.logger.progress(step, metrics)
                else:
                    self.logger.message(f"step {step}: loss {metrics['loss']:.4f} (compiled and ran the first step)")
                self.logger.log(step, metrics)
                last, window_start, window_tokens = metrics, time.time(), 0.0
            if tc.eval_every > 0 and (step % tc.eval_every == 0 or step == tc.steps):
                last.update(self.evaluate())
                self.logger.log(step, {k: last[k] for k in ("val_loss", "val_ppl", "val_bpb")})
                self.logger.message(f"step {step}: val loss {last['val_loss']:.4f}, "
                                    f"{self.eval_label} {last['val_bpb']:.3f}")
            if stop.signal:
                self.logger.message(f"{stop.signal} received: saving step {step} and exiting")
                self.save(step, force=True)
                summary["stopped_by"] = stop.signal
                break
            if step % self.cfg.checkpoint.every == 0 or step == tc.steps:
                self.save(step, force=step == tc.steps)
        if profiling:
            jax.profiler.stop_trace()
        self.checkpointer.wait()
        summary.update(final=last, step=step)
        return summary

    def close(self) -> None:
        self.checkpointer.close()
        self.logger.close()
