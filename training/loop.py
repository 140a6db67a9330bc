"""The training loop: set up (or resume) a run of a task, step, evaluate, log and checkpoint.

Side effects live here and in train.py; the step itself is the pure function in training/step.py.
What is learnt comes from a task (default training.lm_task.LMTask; ClassifyTask in
tasks/classify/train.py is the other one), which gives:

  configure(cfg) -> cfg      settle the config (after the init_from architecture is adopted)
  setup(cfg)                 tokenizer and data; one-line ConfigErrors before anything is written
  save_files(run_dir)        what the run directory keeps besides config.yaml (tokenizer, labels)
  build_model()              the nnx.Module whose params are trained
  pretrained(lm_params)      where a language model's params go in it (train.init_from)
  loss                       its training.step.TaskLoss
  batch_shardings(mesh), batch(step)   the keys' shardings; this process's rows of batch `step`
  tokens_per_batch, flops_per_token    for throughput and MFU
  compile_eval(graphdef, mesh, param_shardings), evaluate(params) -> dict, eval_message(step, metrics)
  checkpoint_meta() -> dict  extra JSON saved with every checkpoint
  after_evaluation(step, metrics, params)   optional: called after each periodic evaluation
                             (the classifier keeps its best params there)
  tokenizer, eval_label      and, where the task has one, full_validation(params, stop)
"""
from __future__ import annotations

import math
import signal
import time

import jax
import jax.numpy as jnp
import yaml

from configs import ARCHITECTURE_FIELDS, Config, ConfigError, to_dict
from configs.loader import validate
from sharding.mesh import make_mesh
from store.checkpoint import Checkpointer, write_config
from store.paths import run_path
from training.lm_task import LMTask
from training.metrics import MetricsLogger, peak_flops, throughput
from training.optimizer import learning_rate, make_optimizer
from training.state import abstract_with_shardings, init_train_state, state_layout
from training.step import jit_train_step, to_global


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
    saved = run_path(cfg.train.run_dir) / "config.yaml"
    if not saved.is_file():
        return
    old = (yaml.safe_load(saved.read_text()) or {}).get("model", {})
    model = to_dict(cfg)["model"]
    for key in ARCHITECTURE_FIELDS:
        value = model[key]
        if key in old and old[key] != value and not (isinstance(value, tuple) and list(value) == old[key]):
            raise ConfigError(f"train.run_dir {cfg.train.run_dir} holds a run with model.{key}={old[key]!r}, "
                              f"not {value!r}; choose a new train.run_dir")


def pretrained_architecture(cfg: Config) -> Config:
    """`cfg` taking the architecture of its train.init_from checkpoint (fine-tuning), which must
    be a language model's; execution choices (dtypes, remat, scan, attention) stay cfg's."""
    from interop.load import adopt_architecture, checkpoint_config
    source = checkpoint_config(cfg.train.init_from)
    if source.task.kind != "lm":
        raise ConfigError(f"train.init_from {cfg.train.init_from} is not a language-model checkpoint")
    return adopt_architecture(cfg, source)


class Trainer:
    """Owns the mesh, task, state and sinks of one run; `run()` trains to cfg.train.steps."""

    def __init__(self, cfg: Config, log_enabled: bool = True, task=None):
        self.task = task = task if task is not None else LMTask()
        if cfg.train.init_from:
            cfg = pretrained_architecture(cfg)
        cfg = task.configure(cfg)
        validate(cfg)
        self.cfg = cfg
        check_run_dir(cfg)
        self.run_dir = run_path(cfg.train.run_dir)  # a local folder or gs://
        self.mesh = make_mesh(cfg)
        pc = jax.process_count()
        if cfg.train.batch_size % (pc * cfg.train.grad_accum):
            raise ConfigError(f"train.batch_size ({cfg.train.batch_size}) must divide over "
                              f"{pc} processes x {cfg.train.grad_accum} micro-batches")
        task.setup(cfg)
        self.tokenizer = task.tokenizer
        write_config(self.run_dir, cfg)
        task.save_files(self.run_dir)

        self.optimizer, self.schedule = make_optimizer(cfg.train), learning_rate(cfg.train)
        self.graphdef, self.abstract, self.shardings = state_layout(cfg, self.mesh, self.optimizer,
                                                                    task.build_model)
        self.data_shardings = task.batch_shardings(self.mesh)
        self.checkpointer = Checkpointer(self.run_dir, cfg.checkpoint.keep, cfg.checkpoint.async_save)
        self.state, self.start_step = self._restore_or_init()
        self.train_fn = jit_train_step(cfg, self.graphdef, self.optimizer, self.schedule, self.mesh,
                                       self.shardings, task.loss, self.data_shardings)
        task.compile_eval(self.graphdef, self.mesh, self.shardings["params"])
        self.logger = MetricsLogger(self.run_dir, cfg.train.steps, self.start_step, log_enabled)
        self.stop: StopRequested | None = None

    @property
    def eval_label(self) -> str:
        """How the task names its periodic evaluation (train.py's report)."""
        return self.task.eval_label

    def _restore_or_init(self):
        cfg = self.cfg
        target = abstract_with_shardings(self.abstract, self.shardings)
        found = self.checkpointer.restore(target["params"], target["opt_state"])
        if found is not None:
            step, params, opt_state, meta = found
            state = {"params": params, "opt_state": opt_state,
                     "step": jax.device_put(jnp.asarray(step, jnp.int32), self.shardings["step"])}
            return state, int(meta.get("step", step))
        given = None
        if cfg.train.init_from:
            from flax import nnx
            from interop.load import load_checkpoint
            _, _, params, _ = load_checkpoint(cfg.train.init_from, self.mesh, cfg.mesh.rules)
            given = self.task.pretrained(nnx.to_pure_dict(params))
        return init_train_state(cfg, self.mesh, self.optimizer, self.shardings, given, self.task.build_model), 0

    def save(self, step: int, force: bool = False) -> None:
        meta = {"step": step, "data_step": step, "seed": self.cfg.train.seed, **self.task.checkpoint_meta()}
        self.checkpointer.save(step, self.state["params"], self.state["opt_state"], meta, force=force)
        self.logger.flush()  # metrics up to a checkpoint are as durable as it (on GCS they are rewritten)

    def evaluate(self) -> dict:
        """The task's periodic evaluation of the current params."""
        return self.task.evaluate(self.state["params"])

    def full_validation(self, step: int) -> dict | None:
        """The task's whole-split evaluation (the LM's: every validation token once, beside xz on the
        same bytes), logged at `step`; None when a signal arrives meanwhile."""
        def stop() -> bool:  # one process alone must not leave the collective eval steps
            return jax.process_count() == 1 and self.stop is not None and self.stop.signal is not None

        out = self.task.full_validation(self.state["params"], stop)
        if out is not None:
            self.logger.log(step, out)
        return out

    def _after_evaluation(self, step: int, metrics: dict) -> None:
        hook = getattr(self.task, "after_evaluation", None)  # optional member of a task
        if hook is not None:
            hook(step, metrics, self.state["params"])

    def run(self) -> dict:
        """Train from the current step to cfg.train.steps; returns the last metrics seen."""
        tc, task = self.cfg.train, self.task
        self.stop = stop = StopRequested()
        summary = {"start_step": self.start_step}
        if self.start_step:
            self.logger.message(f"resumed from step {self.start_step} ({self.checkpointer.directory})")
        if self.start_step == 0 and tc.eval_every > 0:
            summary["initial"] = self.evaluate()
            self.logger.log(0, summary["initial"])
            self.logger.message(task.eval_message(0, summary["initial"]))
            self._after_evaluation(0, summary["initial"])
        peak, n_dev = peak_flops(), jax.device_count()
        window_start, window_tokens, last = time.time(), 0.0, {}
        step = self.start_step
        profiling = False
        while step < tc.steps:
            if step == tc.profile_start:
                jax.profiler.start_trace(str(self.run_dir / "profile"))
                profiling = True
            batch = to_global(task.batch(step), self.data_shardings)
            self.state, metrics = self.train_fn(self.state, batch)
            step += 1
            if profiling and step >= tc.profile_start + tc.profile_steps:
                jax.block_until_ready(self.state)
                jax.profiler.stop_trace()
                profiling = False
            first = step == self.start_step + 1  # includes compilation: no throughput figures
            if not first:
                window_tokens += task.tokens_per_batch
            if first or step % tc.log_every == 0 or step == tc.steps or stop.signal:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not math.isfinite(metrics["loss"]):
                    raise FloatingPointError(f"loss is {metrics['loss']} at step {step}; lower train.lr")
                if not first and window_tokens:
                    elapsed = time.time() - window_start
                    metrics.update(throughput(window_tokens, elapsed, task.flops_per_token, n_dev, peak))
                    metrics["step_time"] = elapsed * task.tokens_per_batch / window_tokens
                    self.logger.progress(step, metrics)
                else:
                    self.logger.message(f"step {step}: loss {metrics['loss']:.4f} (compiled and ran the first step)")
                self.logger.log(step, metrics)
                last, window_start, window_tokens = metrics, time.time(), 0.0
            if tc.eval_every > 0 and (step % tc.eval_every == 0 or step == tc.steps):
                evaluated = self.evaluate()
                last.update(evaluated)
                self.logger.log(step, evaluated)
                self.logger.message(task.eval_message(step, evaluated))
                self._after_evaluation(step, evaluated)
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
        self.task.close()
        self.checkpointer.close()
        self.logger.close()
