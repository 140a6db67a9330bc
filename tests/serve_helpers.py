"""Tiny checkpoints for the serving tests: a sentencepiece tokenizer trained on stdlib text and a
model either randomly initialised or briefly trained with Adam (cached once per test session)."""
from __future__ import annotations

import atexit
import functools
import inspect
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from configs import load_config
from sharding.init import create_sharded_model
from training.checkpoint import save_params

ROOT = Path(__file__).resolve().parent.parent

TRAIN_STEPS = 200  # Adam steps of the shared trained checkpoint (clear top-1 margins)
TINY = ["model.vocab_size=512", "model.d_model=64", "model.n_layers=2", "model.n_heads=4",
        "model.n_kv_heads=2", "model.mlp_dim=192", "model.max_seq_len=128", "model.remat=none",
        "mesh.fsdp=1", "data.seq_len=64", "serve.page_size=8", "serve.num_pages=96", "serve.max_batch=4",
        "serve.prefill_buckets=[16,32,64]", "serve.max_queue=8"]


def corpus() -> tuple[str, str]:
    """(train, held-out) text: the source of a few stdlib modules (ships with Python)."""
    import argparse, textwrap, string, shlex, glob  # noqa: E401
    train = "".join(inspect.getsource(m) for m in (textwrap, string, shlex, glob))
    return train, inspect.getsource(argparse)[:6000]


def _tmpdir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="tessera_serve_"))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return d


def train_tokenizer(out: Path, text: str, vocab: int = 512) -> Path:
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()), model_prefix=str(out / "tokenizer"), vocab_size=vocab,
        model_type="bpe", pad_id=0, bos_id=1, eos_id=2, unk_id=3, byte_fallback=True,
        character_coverage=1.0, minloglevel=2, num_threads=1)
    return out / "tokenizer.model"


def _train(cfg, graphdef, state, tokens: np.ndarray, steps: int, seq: int = 64, batch: int = 16):
    """Adam on next-token loss over random windows of `tokens`."""
    opt = optax.adam(3e-3)
    params = nnx.to_pure_dict(state)
    opt_state = opt.init(params)

    def loss_fn(p, x):
        s = jax.tree.map(lambda a: a, state)
        nnx.replace_by_pure_dict(s, p)
        logits = nnx.merge(graphdef, s)(x[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]).mean()

    @jax.jit
    def step(p, o, x):
        loss, g = jax.value_and_grad(loss_fn)(p, x)
        upd, o = opt.update(g, o, p)
        return optax.apply_updates(p, upd), o, loss

    rng = np.random.default_rng(0)
    for _ in range(steps):
        idx = rng.integers(0, len(tokens) - seq - 1, batch)
        x = np.stack([tokens[i:i + seq + 1] for i in idx]).astype(np.int32)
        params, opt_state, loss = step(params, opt_state, x)
    nnx.replace_by_pure_dict(state, params)
    return state, float(loss)


@functools.lru_cache(maxsize=None)
def checkpoint(train_steps: int = 0, extra: tuple[str, ...] = ()) -> Path:
    """A run dir (config.yaml, tokenizer.model, checkpoints/0) of the tiny model."""
    run = _tmpdir()
    text, _ = corpus()
    train_tokenizer(run, text)
    cfg = load_config("tiny", TINY + [f"train.run_dir={run}", *extra])
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:1],
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    graphdef, state = create_sharded_model(cfg, mesh)
    if train_steps:
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_file=str(run / "tokenizer.model"))
        state, _ = _train(cfg, graphdef, state, np.array(sp.encode(text)), train_steps)
    save_params(run, cfg, state)
    return run


def reference_greedy(cfg, params: dict, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation by full-sequence forwards of the NNX model, no cache.

    Each forward runs on the sequence right-padded to max_seq_len (one compile); causal
    attention makes the logits at real positions independent of the padding.
    """
    from sharding.init import abstract_model
    graphdef, abstract = nnx.split(abstract_model(cfg))
    nnx.replace_by_pure_dict(abstract, params)
    T = cfg.model.max_seq_len

    @jax.jit
    def forward(state, tokens):
        return nnx.merge(graphdef, state)(tokens)[0]  # [T,V]

    seq = list(prompt)
    for _ in range(n):
        logits = forward(abstract, jnp.array([seq + [0] * (T - len(seq))], jnp.int32))
        seq.append(int(jnp.argmax(logits[len(seq) - 1])))
    return seq[len(prompt):]
