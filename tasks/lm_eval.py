"""Language-model evaluation of a checkpoint: perplexity and bits per byte on text, and
multiple-choice accuracy by log-likelihood.

Perplexity uses the training pipeline's own pieces (data.corpus, pack_documents, Loader,
token_bytes, bits_per_byte and training.step's eval step), so its numbers are the same quantity
as the validation bits per byte that training logs: documents packed as BOS + text + EOS into
rows of T tokens, every next-token prediction inside a document chunk scored once.

Multiple choice (JSONL, one question per line):
  {"context": "The capital of France is", "choices": [" Paris", " Rome"], "answer": 0}
(`question`/`prompt` for context, `endings` for choices, `label`/`gold` for the answer, which
may also be the text of the right choice). Each choice is scored by the summed log-likelihood of
its tokens after the context; `accuracy_norm` divides by the choice's UTF-8 length (as
lm-evaluation-harness's acc_norm), which removes the bias towards short answers.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

import data
from configs import Config, ConfigError
from sharding.mesh import data_parallel_size
from sharding.rules import BATCH


@dataclass
class LoadedLM:
    cfg: Config
    graphdef: object
    params: dict          # pure-dict params, sharded on `mesh`
    tokenizer: object
    mesh: object
    path: str

    @property
    def rows_multiple(self) -> int:
        """Batch rows must split evenly over the data-parallel mesh axes."""
        return data_parallel_size(self.mesh)

    def batch_size(self, requested: int) -> int:
        b = requested or self.cfg.train.batch_size
        return -(-b // self.rows_multiple) * self.rows_multiple


def load_lm(path: str | Path, mesh, overrides: list[str] | tuple = ()) -> LoadedLM:
    """A Tessera LM run directory or a Hugging Face directory, with its tokenizer; `overrides`
    (key=value) apply to its config."""
    from flax import nnx
    from interop.load import load_checkpoint
    if (Path(path) / "config.yaml").is_file():  # check before restoring: a classifier's params differ
        from store.checkpoint import read_config
        if read_config(path).task.kind != "lm":
            raise ConfigError(f"{path} is a {read_config(path).task.kind} checkpoint, not a language model; "
                              "use `evaluate.py classify`")
    cfg, graphdef, params, tok = load_checkpoint(path, mesh, "fsdp", overrides=tuple(overrides))
    if tok is None:
        raise ConfigError(f"{path} has no tokenizer (tokenizer.model or tokenizer.json)")
    return LoadedLM(cfg, graphdef, nnx.to_pure_dict(params), tok, mesh, str(path))


def _separator_ids(tok) -> tuple[int, int]:
    """(document start, document end) ids; tokenizers without BOS (Qwen) start with EOS instead."""
    bos = tok.bos_id if tok.bos_id >= 0 else tok.eos_id
    if bos < 0 or tok.eos_id < 0:
        raise ConfigError(f"tokenizer {tok.path} defines neither BOS nor EOS to separate documents")
    return bos, tok.eos_id


def perplexity(lm: LoadedLM, path: str, seq_len: int = 0, batch_size: int = 0, max_tokens: int = 0) -> dict:
    """Perplexity and bits per byte of the model on a text file, directory or JSONL file."""
    import tempfile

    from data.corpus import split_units, unit_documents
    from data.loader import Loader
    from training.step import jit_eval_step
    cfg = lm.cfg
    T = seq_len or min(cfg.data.seq_len, cfg.model.max_seq_len)
    if T > cfg.model.max_seq_len:
        raise ConfigError(f"--seq-len {T} exceeds the model's max_seq_len ({cfg.model.max_seq_len})")
    docs = [text for unit in split_units(str(path)) for _, text in unit_documents(unit, 0.0, cfg.data.jsonl_field)]
    if not docs:
        raise data.DataError(f"no text to evaluate in {path}")
    encode = getattr(lm.tokenizer, "encode_batch", None)
    ids = encode(docs) if encode else [lm.tokenizer.encode(d) for d in docs]
    stream = data.pack_documents(ids, *_separator_ids(lm.tokenizer))
    if max_tokens:
        stream = stream[:max_tokens]
    B = lm.batch_size(batch_size)
    scratch = tempfile.TemporaryDirectory(prefix="tessera-eval-")
    shards = data.ShardSet(data.write_streams(scratch.name, {"eval": [stream]}), "eval", T)
    loader = Loader(shards, B, shuffle=False, seed=0, pad_id=max(lm.tokenizer.pad_id, 0))
    param_sh = jax.tree.map(lambda x: x.sharding, lm.params)
    eval_fn = jit_eval_step(lm.graphdef, lm.mesh, param_sh)
    token_bytes = jnp.asarray(data.token_bytes(lm.tokenizer), jnp.float32)
    sharding = NamedSharding(lm.mesh, PartitionSpec(BATCH, None))
    totals = {"nll_sum": 0.0, "tokens": 0.0, "bytes": 0.0}
    for step in range(loader.num_batches):
        batch = {k: jax.device_put(v, sharding) for k, v in loader.batch(step).items()}
        out = eval_fn(lm.params, batch, token_bytes)
        for k in totals:
            totals[k] += float(out[k])
    shards.close()
    scratch.cleanup()
    nll = totals["nll_sum"] / max(totals["tokens"], 1.0)
    return {"checkpoint": lm.path, "data": str(path), "documents": len(docs), "seq_len": T,
            "tokens": int(totals["tokens"]), "bytes": int(totals["bytes"]), "nll_per_token": nll,
            "perplexity": math.exp(min(nll, 700)),
            "bits_per_byte": data.bits_per_byte(totals["nll_sum"], totals["bytes"])}


def read_choices(path: str | Path) -> list[dict]:
    """Questions {context, choices, answer} from JSONL; one-line errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise data.DataError(f"multiple-choice file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise data.DataError(f"{path}: not valid UTF-8 (byte offset {e.start})") from None
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise data.DataError(f"{path} line {i}: not valid JSON ({e.msg})") from None
        pick = lambda *keys: next((rec[k] for k in keys if isinstance(rec, dict) and k in rec), None)
        context, choices, answer = pick("context", "question", "prompt"), pick("choices", "endings"), \
            pick("answer", "label", "gold")
        if not isinstance(context, str):
            raise data.DataError(f"{path} line {i}: needs a string 'context' (or 'question'/'prompt')")
        if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)):
            raise data.DataError(f"{path} line {i}: needs 'choices', a list of two or more non-empty strings")
        if isinstance(answer, str) and answer in choices:
            answer = choices.index(answer)
        elif isinstance(answer, str) and answer.isdigit():
            answer = int(answer)
        if not (isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices)):
            raise data.DataError(f"{path} line {i}: 'answer' must be a choice index 0..{len(choices) - 1} "
                                 f"or the text of a choice; got {answer!r}")
        out.append({"line": i, "context": context, "choices": choices, "answer": answer})
    if not out:
        raise data.DataError(f"{path} has no questions")
    return out


def continuation_ids(tok, context: str, choice: str) -> tuple[list[int], list[int]]:
    """(context ids, choice ids). The context starts with BOS when the tokenizer's config adds one
    (tok.add_bos, as transformers' `tokenizer(text)`); an empty context is the document-start
    token alone, so the first choice token has something to be predicted from. The pair is
    encoded together and split where the context's own encoding ends, so merges across the
    boundary match what the model saw in training; when they disagree the choice is encoded alone."""
    start, _ = _separator_ids(tok)
    ctx = tok.encode(context)
    whole = tok.encode(context + choice)
    cont = whole[len(ctx):] if whole[:len(ctx)] == ctx and len(whole) > len(ctx) else tok.encode(choice)
    ctx = ([tok.bos_id] if tok.add_bos else []) + ctx
    return ctx or [start], cont


def _score_fn(lm: LoadedLM):
    """Jitted (params, inputs, targets, mask [B,T]) -> summed log-likelihood per row [B]."""
    from training.step import token_nll
    rows = NamedSharding(lm.mesh, PartitionSpec(BATCH, None))

    def score(params, inputs, targets, mask):
        batch = {"inputs": inputs, "targets": targets, "segment_ids": jnp.where(mask >= 0, 1, 0),
                 "positions": jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)}
        nll, _ = token_nll(lm.graphdef, params, batch)              # [B,T]
        return -jnp.sum(nll * jnp.maximum(mask, 0.0), axis=1)

    param_sh = jax.tree.map(lambda x: x.sharding, lm.params)
    return jax.jit(score, in_shardings=(param_sh, rows, rows, rows),
                   out_shardings=NamedSharding(lm.mesh, PartitionSpec()))


def multiple_choice(lm: LoadedLM, path: str, batch_size: int = 0, out_dir: str | Path | None = None) -> dict:
    """Accuracy of picking the highest-likelihood choice; writes predictions.jsonl to out_dir."""
    questions = read_choices(path)
    tok, max_len = lm.tokenizer, lm.cfg.model.max_seq_len
    pairs = []                                  # (question index, inputs, targets, scored-from)
    for qi, q in enumerate(questions):
        for choice in q["choices"]:
            ctx, cont = continuation_ids(tok, q["context"], choice)
            seq = (ctx + cont)[-(max_len + 1):]  # keep the choice; drop the oldest context
            pairs.append((qi, seq[:-1], seq[1:], len(seq) - 1 - len(cont)))
    T = min(max_len, 1 << max(4, math.ceil(math.log2(max(len(p[1]) for p in pairs)))))  # one compiled shape
    inputs = np.zeros((len(pairs), T), np.int32)
    targets = np.zeros((len(pairs), T), np.int32)
    mask = np.full((len(pairs), T), -1.0, np.float32)  # -1 padding, 0 context, 1 choice token
    for r, (_, x, y, first) in enumerate(pairs):
        inputs[r, :len(x)], targets[r, :len(y)] = x, y
        mask[r, :len(x)] = 0.0
        mask[r, max(first, 0):len(x)] = 1.0
    B, fn = lm.batch_size(batch_size), _score_fn(lm)
    scores = []
    for s in range(0, len(pairs), B):
        chunk = [a[s:s + B] for a in (inputs, targets, mask)]
        n = len(chunk[0])
        chunk = [np.concatenate([a, np.repeat(a[:1], B - n, 0)]) if n < B else a for a in chunk]
        scores.append(np.asarray(fn(lm.params, *chunk))[:n])
    scores = np.concatenate(scores)
    correct = correct_norm = 0
    preds, k = [], 0
    for q in questions:
        s = scores[k:k + len(q["choices"])]
        k += len(q["choices"])
        norm = s / np.array([max(len(c.encode("utf-8")), 1) for c in q["choices"]])
        pred, pred_norm = int(np.argmax(s)), int(np.argmax(norm))
        correct += pred == q["answer"]
        correct_norm += pred_norm == q["answer"]
        preds.append({"line": q["line"], "answer": q["answer"], "predicted": pred, "predicted_norm": pred_norm,
                      "loglik": [float(v) for v in s]})
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(out_dir) / "predictions.jsonl", "w") as f:
            f.writelines(json.dumps(p) + "\n" for p in preds)
    n = len(questions)
    return {"checkpoint": lm.path, "data": str(path), "n": n, "accuracy": correct / n,
            "accuracy_norm": correct_norm / n, "chance": float(np.mean([1 / len(q["choices"]) for q in questions]))}
