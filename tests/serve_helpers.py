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
from model.init import create_sharded_model
from store.checkpoint import save_params

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
    from model.init import abstract_model
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


def _cache_rounding(kv_dtype: str):
    """k or v [B,S,K,H] -> the values a paged cache of kv_dtype hands back to decode."""
    from serving.kv_cache import quantize_kv
    if kv_dtype == "int8":
        def rounded(x):
            q, s = quantize_kv(x)
            return (q.astype(jnp.float32) * s[..., None]).astype(x.dtype)
        return rounded
    return lambda x: x.astype(kv_dtype).astype(x.dtype)


def reference_logprobs(cfg, params: dict, tokens: list[int], decode_from: int | None = None,
                       kv_dtype: str = "float32") -> np.ndarray:
    """Cache-free log-softmax [T,V] of the NNX model over `tokens`.

    With decode_from, queries at positions >= decode_from attend over keys and values rounded
    the way a `kv_dtype` cache stores them (what paged decode reads), and earlier queries over
    exact ones (what prefill attends over): the cache's own rounding and nothing else.
    """
    import model.transformer as transformer
    from model.init import abstract_model
    graphdef, state = nnx.split(abstract_model(cfg))
    nnx.replace_by_pure_dict(state, params)
    exact_attention = transformer.attention
    rnd = _cache_rounding(kv_dtype)

    def attention(q, k, v, **kw):
        out = exact_attention(q, k, v, **kw)
        if decode_from is None:
            return out
        decoded = exact_attention(q, rnd(k), rnd(v), **kw)
        return jnp.where((kw["q_positions"] >= decode_from)[..., None, None], decoded, out)

    transformer.attention = attention  # traced once below, then restored
    try:
        logits = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0])(state, jnp.array([tokens], jnp.int32))
    finally:
        transformer.attention = exact_attention
    return np.asarray(jax.nn.log_softmax(logits, axis=-1))


def teacher_forced_top_logprobs(eng, tokens: list[int], n_prompt: int):
    """Top ids and logprobs [T-n_prompt+1, TOP_N] of the engine's jitted paged prefill and decode.

    Prefill of tokens[:n_prompt], then one decode step per later token, fed the given tokens
    (not the sampled ones): row i scores the token at position n_prompt + i. Calls the engine's own
    compiled steps on a cache and page table of its own, beside the engine's.
    """
    from serving.kv_cache import PageAllocator, init_cache
    cfg = eng.cfg
    prefill, decode = eng._prefill, eng._decode
    cache = init_cache(cfg, eng.mesh)
    alloc = PageAllocator(cfg.serve.num_pages, cfg.serve.page_size, 1, eng.max_len)
    assert alloc.grow(0, len(tokens))
    table = alloc.page_table[:1]
    greedy = (np.zeros(1, np.float32), np.zeros(1, np.int32), np.ones(1, np.float32))
    for start in range(0, n_prompt, eng.chunk):  # the prompt in the engine's chunks
        end = min(n_prompt, start + eng.chunk)
        bucket = next(b for b in eng.buckets if b >= end - start)
        padded = np.zeros((1, bucket), np.int32)
        padded[0, :end - start] = tokens[start:end]
        cache, out, _ = prefill(eng.params, cache, padded, np.int32(start), np.int32(end), table, *greedy,
                                np.zeros((1, 2), np.uint32), np.int32(0), np.zeros((1, bucket), np.int32))
    rows = [jax.device_get(out[2:])]
    for t in range(n_prompt, len(tokens) - 1):
        cache, out = decode(eng.params, cache, np.array([tokens[t]], np.int32), np.array([t], np.int32),
                            table, *greedy, np.zeros((1, 2), np.uint32), np.zeros(1, np.int32))
        rows.append(jax.device_get(out[2:]))
    ids = np.concatenate([r[0] for r in rows])      # [n,TOP_N]
    lps = np.concatenate([r[1] for r in rows])      # [n,TOP_N]
    return ids, lps
