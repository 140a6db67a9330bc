"""Decode throughput: Tessera (bf16 and int8 weights, paged cache, continuous batching engine)
against Hugging Face transformers `generate` (torch, CPU) on the same architecture and weights,
interleaved in one run. Prints decode tokens/s and the ratios.

  python bench/decode.py [--preset tiny] [--batches 1,16] [--new-tokens 64] [--prompt-len 32]
                         [--repeats 3] [--kv-dtype float32] [key=value ...]

Decode tokens/s excludes prefill: Tessera counts from the moment every request has its first
token to the last token; transformers is timed for N and for 1 new tokens and differenced.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.machine_load import load_report  # noqa: E402
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from configs import load_config, parse_cli  # noqa: E402
from model.quant import quantize_params, tree_nbytes  # noqa: E402
from serving.engine import Engine, Request  # noqa: E402
from serving.load import serving_config, serving_mesh  # noqa: E402
from serving.sampling import SamplingParams  # noqa: E402
from model.init import create_sharded_model  # noqa: E402


class NoTokenizer:
    """Ids only: the benchmark never needs text."""
    eos_id = -1

    def decode(self, ids):
        return ""


def hf_model(cfg, params):
    """LlamaForCausalLM with Tessera's weights (rotate-half RoPE: no permutation needed)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    m = cfg.model
    hc = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.mlp_dim,
                     num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
                     num_key_value_heads=m.n_kv_heads, head_dim=m.resolved_head_dim,
                     max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta,
                     tie_word_embeddings=m.tie_embeddings, attention_bias=False, mlp_bias=False,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0)
    t = lambda a: torch.from_numpy(np.asarray(a, np.float32).copy())
    L, sd = params["layers"], {"model.embed_tokens.weight": t(params["embedding"]),
                               "model.norm.weight": t(params["final_norm"])}
    D = m.d_model
    for i in range(m.n_layers):
        pre = f"model.layers.{i}."
        sd[pre + "self_attn.q_proj.weight"] = t(L["wq"][i].reshape(D, -1).T)      # [N*H,D]
        sd[pre + "self_attn.k_proj.weight"] = t(L["wk"][i].reshape(D, -1).T)
        sd[pre + "self_attn.v_proj.weight"] = t(L["wv"][i].reshape(D, -1).T)
        sd[pre + "self_attn.o_proj.weight"] = t(L["wo"][i].reshape(-1, D).T)      # [D,N*H]
        sd[pre + "mlp.gate_proj.weight"] = t(L["w_gate"][i].T)                    # [F,D]
        sd[pre + "mlp.up_proj.weight"] = t(L["w_up"][i].T)
        sd[pre + "mlp.down_proj.weight"] = t(L["w_down"][i].T)                    # [D,F]
        sd[pre + "input_layernorm.weight"] = t(L["attn_norm"][i])
        sd[pre + "post_attention_layernorm.weight"] = t(L["mlp_norm"][i])
    if m.tie_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    else:
        sd["lm_head.weight"] = t(params["lm_head"].T)
    model = LlamaForCausalLM(hc).eval()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return model


def hf_decode(model, prompts: np.ndarray, n: int) -> tuple[float, list]:
    """Decode tokens/s of greedy generate (N minus 1 new tokens, differenced) and the tokens."""
    import torch
    ids = torch.from_numpy(prompts.astype(np.int64))
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        t1 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        t2 = time.perf_counter()
    return prompts.shape[0] * (n - 1) / ((t2 - t1) - (t1 - t0)), out[:, prompts.shape[1]:].tolist()


def tessera_decode(engine: Engine, prompts: np.ndarray, n: int) -> tuple[float, list]:
    """Decode tokens/s of B concurrent greedy requests through the engine, and the tokens."""
    B = prompts.shape[0]
    first, last, toks = [0.0] * B, [0.0] * B, [[] for _ in range(B)]
    done, left = threading.Event(), [B]  # sinks run on the engine thread: never block there

    def sink(i):
        def f(ev):
            now = time.perf_counter()
            if ev.token_ids and not toks[i]:
                first[i] = now
            toks[i] += ev.token_ids
            if ev.finish_reason:
                last[i] = now
                left[0] -= 1
                if not left[0]:
                    done.set()
        return f

    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    for i in range(B):
        engine.submit(Request(prompts[i].tolist(), params, sink(i)))
    done.wait()
    return B * (n - 1) / (max(last) - max(first)), toks


def pick_torch_threads(model, vocab: int, prompt_len: int) -> int:
    """1 or all cores, whichever decodes faster here: on an oversubscribed host torch's
    multi-threaded kernels can be 10x slower than one thread (measured on the 2-core dev box)."""
    import torch
    prompts = np.random.default_rng(1).integers(3, vocab, (4, prompt_len))
    best = None
    for n in sorted({1, os.cpu_count()}):
        torch.set_num_threads(n)
        hf_decode(model, prompts, 4)
        tps = max(hf_decode(model, prompts, 16)[0] for _ in range(2))
        best = max(best or (tps, n), (tps, n))
    torch.set_num_threads(best[1])
    return best[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kv-dtype", default="float32")
    ap.add_argument("--float-embedding", action="store_true",
                    help="keep the embedding (and a tied output head) in float, as serve.py "
                         "--no-int8-embedding")
    ap.add_argument("--torch-threads", type=int, default=0, help="0: the faster of 1 and all cores")
    args = parse_cli(ap)
    import torch
    batches = [int(b) for b in args.batches.split(",")]
    ctx = args.prompt_len + args.new_tokens
    page = 16
    ov = [f"model.max_seq_len={max(ctx, 64)}", "data.seq_len=64", "mesh.fsdp=1", f"serve.kv_dtype={args.kv_dtype}",
          f"serve.max_batch={max(batches)}", f"serve.page_size={page}",
          f"serve.num_pages={max(batches) * -(-ctx // page) + 1}", f"serve.prefill_buckets=[{args.prompt_len}]",
          f"serve.max_queue={max(batches)}", *args.overrides]
    mesh = serving_mesh(1)
    cfg = serving_config(load_config(args.preset, ov), mesh)
    _, state = create_sharded_model(cfg, mesh)
    params = nnx.to_pure_dict(state)
    variants = {"bf16": jax.tree.map(lambda a: a.astype(jnp.bfloat16), params),
                "int8": jax.jit(lambda p: quantize_params(p, embedding=not args.float_embedding))(params)}
    engines = {k: Engine(cfg, p, NoTokenizer()) for k, p in variants.items()}
    for eng in engines.values():
        eng.warmup()
        eng.start()
    # transformers gets the bf16-rounded weights in fp32 (its fast CPU dtype): the same model
    hf = hf_model(cfg, jax.device_get(jax.tree.map(lambda a: a.astype(jnp.float32), variants["bf16"])))
    rng = np.random.default_rng(0)
    torch_threads = args.torch_threads or pick_torch_threads(hf, cfg.model.vocab_size, args.prompt_len)
    print(f"model {args.preset}: D={cfg.model.d_model} L={cfg.model.n_layers} V={cfg.model.vocab_size}, "
          f"{sum(x.size for x in jax.tree.leaves(params)) / 1e6:.1f}M params; weights bf16 "
          f"{tree_nbytes(variants['bf16']) / 1e6:.1f} MB, int8 {tree_nbytes(variants['int8']) / 1e6:.1f} MB; "
          f"kv {args.kv_dtype}; prompt {args.prompt_len}, {args.new_tokens} new tokens; "
          f"jax {jax.__version__}, torch {torch.__version__} ({torch_threads} threads), {os.cpu_count()} cpus")
    rows = []
    for B in batches:
        prompts = rng.integers(3, cfg.model.vocab_size, (B, args.prompt_len))
        for name, eng in engines.items():  # compile every shape once before timing
            tessera_decode(eng, prompts, 4)
        hf_decode(hf, prompts, 4)
        res = {k: [] for k in ("hf", *engines)}
        for _ in range(args.repeats):  # interleaved: the machine is shared and noisy
            tps, hf_toks = hf_decode(hf, prompts, args.new_tokens)
            res["hf"].append(tps)
            for name, eng in engines.items():
                tps, toks = tessera_decode(eng, prompts, args.new_tokens)
                res[name].append(tps)
        med = {k: statistics.median(v) for k, v in res.items()}
        _, bf_toks = tessera_decode(engines["bf16"], prompts, 8)
        agree = np.mean(np.array(bf_toks)[:, :8] == np.array(hf_toks)[:, :8])
        rows.append((B, med, agree))
        print(f"batch {B:3d}: transformers {med['hf']:8.1f} tok/s | tessera bf16 {med['bf16']:8.1f} tok/s "
              f"({med['bf16'] / med['hf']:.2f}x) | tessera int8 {med['int8']:8.1f} tok/s "
              f"({med['int8'] / med['hf']:.2f}x) | first-8 greedy token agreement bf16 vs hf {agree:.2f}",
              flush=True)
    for eng in engines.values():
        eng.stop()
    print("\n| batch | transformers tok/s | Tessera bf16 tok/s | Tessera int8 tok/s | int8 / transformers |")
    print("|---|---|---|---|---|")
    for B, med, _ in rows:
        print(f"| {B} | {med['hf']:.1f} | {med['bf16']:.1f} | {med['int8']:.1f} | {med['int8'] / med['hf']:.2f}x |")


if __name__ == "__main__":
    with load_report():
        main()
