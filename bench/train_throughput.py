"""Train-step throughput: Tessera (JAX) against the same Llama model in PyTorch eager and, with
--maxtext, in MaxText's own trainer, all in one run.

  python bench/train_throughput.py [--d-model 512 --layers 8 --seq 256 --batch 8 --rounds 5]
                                   [--remat none|full] [--maxtext]

The step functions run interleaved (a few steps of one, then the other, for several rounds) so
the shared machine's noise hits all alike; medians are compared. --remat full recomputes each
layer in the backward on both sides (Tessera's model.remat=full, torch.utils.checkpoint per
layer). --maxtext runs ../shared/peers/maxtext/train_cpu.sh (its venv from setup.sh there) once
per round between the rounds of the others, on the same shape (mlp dim, heads, vocab, batch,
fp32) with remat_policy minimal for none (it saves the most MaxText offers) and full for full, and
takes the median of its logged tokens/s. MFU is against a large fp32 matmul measured in the same
run (the machine's practical peak), since CPUs have no table.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.machine_load import load_report  # noqa: E402
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import load_config  # noqa: E402
from model.stats import flops_per_token  # noqa: E402
from sharding.mesh import make_mesh  # noqa: E402
from training.optimizer import learning_rate, make_optimizer  # noqa: E402
from training.state import init_train_state, state_layout  # noqa: E402
from training.step import batch_sharding, jit_train_step  # noqa: E402


def tessera_step(cfg):
    """A callable running one Tessera train step on a fixed random batch."""
    mesh = make_mesh(cfg, jax.devices()[:1])
    opt, schedule = make_optimizer(cfg.train), learning_rate(cfg.train)
    graphdef, _, shardings = state_layout(cfg, mesh, opt)
    state = init_train_state(cfg, mesh, opt, shardings)
    step = jit_train_step(cfg, graphdef, opt, schedule, mesh, shardings)
    B, T, V = cfg.train.batch_size, cfg.data.seq_len, cfg.model.vocab_size
    x = np.random.default_rng(0).integers(0, V, (B, T + 1)).astype(np.int32)
    batch = {"inputs": x[:, :-1], "targets": x[:, 1:], "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
             "segment_ids": np.ones((B, T), np.int32), "loss_mask": np.ones((B, T), np.float32)}
    batch = jax.device_put(batch, batch_sharding(mesh))
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])
    return run


def torch_step(cfg):
    """The same model, optimizer and batch in PyTorch eager (CPU); model.remat=full checkpoints
    each layer."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(0)
    m = cfg.model
    D, N, K, H, Fh, L, V = m.d_model, m.n_heads, m.n_kv_heads, m.resolved_head_dim, m.mlp_dim, m.n_layers, m.vocab_size
    B, T = cfg.train.batch_size, cfg.data.seq_len

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.norm_eps) * w

    inv = 1.0 / m.rope_theta ** (torch.arange(0, H, 2).float() / H)
    ang = torch.arange(T).float()[:, None] * inv
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]

    def rope(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    p = lambda *s: torch.nn.Parameter(torch.randn(*s) * 0.02)
    params = {"emb": p(V, D), "norm": torch.nn.Parameter(torch.ones(D))}
    for i in range(L):
        params.update({f"{i}.wq": p(D, N * H), f"{i}.wk": p(D, K * H), f"{i}.wv": p(D, K * H),
                       f"{i}.wo": p(N * H, D), f"{i}.g": p(D, Fh), f"{i}.u": p(D, Fh), f"{i}.d": p(Fh, D),
                       f"{i}.n1": torch.nn.Parameter(torch.ones(D)), f"{i}.n2": torch.nn.Parameter(torch.ones(D))})
    if not m.tie_embeddings:
        params["head"] = p(D, V)
    opt = torch.optim.AdamW(params.values(), lr=cfg.train.lr, betas=(cfg.train.b1, cfg.train.b2),
                            weight_decay=cfg.train.weight_decay)
    x = torch.randint(0, V, (B, T + 1))

    def layer(h, i):
        a = rms(h, params[f"{i}.n1"])
        q = rope((a @ params[f"{i}.wq"]).view(B, T, N, H))
        k = rope((a @ params[f"{i}.wk"]).view(B, T, K, H))
        v = (a @ params[f"{i}.wv"]).view(B, T, K, H)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=N != K)
        h = h + o.transpose(1, 2).reshape(B, T, N * H) @ params[f"{i}.wo"]
        a = rms(h, params[f"{i}.n2"])
        return h + (F.silu(a @ params[f"{i}.g"]) * (a @ params[f"{i}.u"])) @ params[f"{i}.d"]

    def forward():
        h = params["emb"][x[:, :-1]]
        for i in range(L):
            h = checkpoint(layer, h, i, use_reentrant=False) if m.remat == "full" else layer(h, i)
        h = rms(h, params["norm"])
        logits = h @ (params["emb"].T if m.tie_embeddings else params["head"])
        return F.cross_entropy(logits.reshape(-1, V), x[:, 1:].reshape(-1))

    def run():
        opt.zero_grad(set_to_none=True)
        loss = forward()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), cfg.train.clip_norm)
        opt.step()
    return run


MAXTEXT_PEER = Path(__file__).resolve().parent.parent.parent / "shared" / "peers" / "maxtext"


def maxtext_tokens_per_s(args) -> float:
    """One run of MaxText's CPU trainer on this shape (peer script); its median logged tokens/s."""
    policy = "full" if args.remat == "full" else "minimal"
    cmd = ["bash", str(MAXTEXT_PEER / "train_cpu.sh"), f"base_emb_dim={args.d_model}",
           f"base_num_decoder_layers={args.layers}", f"base_num_query_heads={args.heads}",
           f"base_num_kv_heads={args.kv_heads}", f"head_dim={args.d_model // args.heads}",
           f"base_mlp_dim={mlp_dim(args.d_model)}", f"vocab_size={args.vocab}",
           f"per_device_batch_size={args.batch}", f"max_target_length={args.seq}"]
    out = subprocess.run(cmd, env={**os.environ, "REMAT_POLICY": policy}, capture_output=True, text=True)
    found = re.findall(r"^tokens_per_s=([\d.]+)$", out.stdout, re.M)
    if out.returncode or not found:
        sys.exit(f"error: MaxText run failed (rc {out.returncode}): {out.stderr.strip()[-500:]}")
    return float(found[-1])


def mlp_dim(d_model: int) -> int:
    """The Llama-style MLP width for d_model: 8/3 d rounded down to a multiple of 64."""
    return d_model * 8 // 3 // 64 * 64


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a large fp32 XLA matmul: the practical peak of this CPU."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps-per-round", type=int, default=3)
    ap.add_argument("--remat", choices=("none", "full"), default="none")
    ap.add_argument("--maxtext", action="store_true", help="also run MaxText's trainer each round")
    args = ap.parse_args()
    if args.maxtext and not (MAXTEXT_PEER / "train_cpu.sh").exists():
        sys.exit(f"error: --maxtext needs the peer scripts at {MAXTEXT_PEER}")
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = load_config("tiny", [f"model.d_model={args.d_model}", f"model.n_layers={args.layers}",
                               f"model.n_heads={args.heads}", f"model.n_kv_heads={args.kv_heads}",
                               f"model.mlp_dim={mlp_dim(args.d_model)}", f"model.vocab_size={args.vocab}",
                               f"data.seq_len={args.seq}", f"model.max_seq_len={max(args.seq, 512)}",
                               f"train.batch_size={args.batch}", "model.compute_dtype=float32", "mesh.fsdp=1",
                               f"model.remat={args.remat}", "model.attention_impl=xla"])
    runners = {"tessera": tessera_step(cfg), "torch": torch_step(cfg)}
    for run in runners.values():  # compile / warm up
        run(), run()
    times = {k: [] for k in runners}
    maxtext = []
    for r in range(args.rounds):
        if args.maxtext:
            maxtext.append(maxtext_tokens_per_s(args))
            print(f"round {r + 1}: MaxText {maxtext[-1]:.0f} tokens/s", flush=True)
        for name, run in runners.items():
            for _ in range(args.steps_per_round):
                t = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t)
    peak = matmul_peak()
    tokens = args.batch * args.seq
    fpt = flops_per_token(cfg.model, args.seq)
    print(f"model: d={args.d_model} L={args.layers} heads={args.heads}/{args.kv_heads} V={args.vocab} "
          f"seq={args.seq} batch={args.batch}; {jax.device_count()} JAX device(s), torch threads "
          f"{torch.get_num_threads()}; remat {args.remat}")
    print(f"matmul peak (fp32 2048^3, same run): {peak / 1e9:.1f} GFLOP/s")
    med = {k: statistics.median(v) for k, v in times.items()}
    for name in runners:
        mfu = tokens * fpt / med[name] / peak
        print(f"{name:8s} median step {med[name] * 1e3:8.1f} ms  {tokens / med[name]:9.0f} tokens/s  "
              f"MFU vs matmul peak {100 * mfu:5.1f}%")
    print(f"ratio tessera/torch tokens/s: {med['torch'] / med['tessera']:.2f}x")
    if maxtext:
        mt = statistics.median(maxtext)
        print(f"maxtext  median {mt:9.0f} tokens/s over {len(maxtext)} runs (remat_policy "
              f"{'full' if args.remat == 'full' else 'minimal'})")
        print(f"ratio tessera/maxtext tokens/s: {tokens / med['tessera'] / mt:.2f}x")
    assert math.isfinite(med["tessera"])


if __name__ == "__main__":
    with load_report():
        main()
