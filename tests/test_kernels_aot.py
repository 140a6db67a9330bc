"""Ahead-of-time checks that the kernels lower for real hardware from this CPU host:
every TPU kernel (flash forward, forward+backward, paged decode bf16/int8) compiles through
libtpu (Mosaic) for v5e and v6e topologies, with the FLOPs of its CostEstimate and the memory
figures its shapes imply, and the GPU kernels lower to Triton for CUDA."""
from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import pytest

from model.kernels.blocking import attention_flops
from model.kernels.gpu_flash import flash_attention_gpu
from model.kernels.gpu_paged import paged_attention_gpu
from model.kernels.tpu_flash import flash_attention
from model.kernels.tpu_paged import paged_attention_tpu

B, T, N, K, H = 1, 1024, 8, 2, 128
PAGES, PS, M = 256, 16, 32
BF16 = 2  # bytes


def _check_cost_and_memory(compiled, *, flops, extra_flops, arguments, outputs, slack_in, slack_out,
                           temp_budget):
    """The compiler's figures against the shapes: `flops` is what the kernels' CostEstimates say
    (XLA adds the wrapper's elementwise ops, at most `extra_flops`); argument and output bytes
    are the operand and result sizes (plus `slack_*` bytes of TPU tile padding or tuple tables);
    HBM temporaries stay within `temp_budget`."""
    got = compiled.cost_analysis()["flops"]
    assert flops <= got <= flops + extra_flops, (got, flops)
    mem = compiled.memory_analysis()
    assert arguments <= mem.argument_size_in_bytes <= arguments + slack_in, mem
    assert outputs <= mem.output_size_in_bytes <= outputs + slack_out, mem
    assert 0 <= mem.temp_size_in_bytes <= temp_budget, (mem.temp_size_in_bytes, temp_budget)


def _tpu_device(topology: str):
    try:
        import libtpu  # noqa: F401
    except ImportError:
        pytest.skip("libtpu is not installed: cannot compile for TPU topologies (pip install libtpu)")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # Several processes on one host may compile for TPU at once (pytest -n, other engineers).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies
    return topologies.get_topology_desc(topology, "tpu").devices[0]


def _abstract(device, *shapes):
    sharding = jax.sharding.SingleDeviceSharding(device)
    return [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in shapes]


def _flash_fns(kind):
    kw = dict(causal=True, sliding_window=512, logit_softcap=30.0, interpret=False,
              device_kind=kind)
    fwd = lambda q, k, v: flash_attention(q, k, v, **kw)                       # noqa: E731
    grad = jax.grad(lambda q, k, v: fwd(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))
    return fwd, grad


@pytest.mark.parametrize("topology", ["v5e:2x2", "v6e:2x2"])
def test_tpu_flash_compiles(topology):
    dev = _tpu_device(topology)
    args = _abstract(dev, ((B, T, N, H), jnp.bfloat16), ((B, T, K, H), jnp.bfloat16),
                     ((B, T, K, H), jnp.bfloat16))
    fwd, grad = _flash_fns(dev.device_kind)
    # CostEstimates (tpu_flash.py): forward attention_flops(B, Tp, Sp, N, H, frac), dq 1.5x, dk/dv
    # 2x; frac is the kernels' static guess, 0.5 when causal (min(0.5, W/S + block_kv/S) = 0.5
    # here with W = 512, S = 1024 and block_kv 512 or 1024). T = S = 1024 needs no padding.
    attn = attention_flops(B, T, T, N, H, 0.5)                      # 2^31
    q_bytes, kv_bytes = B * T * N * H * BF16, B * T * K * H * BF16  # 2 MiB, 0.5 MiB
    # One f32 statistic per query row ([B,N,Tp,1]: lse, and di in the backward) is laid out in
    # HBM with 128 lanes per row: 4 MiB each. Masks: 4 int32 position / segment vectors, padded
    # to whole (8,128) tiles (< 1 MiB). (memory_analysis counts HBM only: buffers the compiler
    # keeps in VMEM are not temporaries, which is why a dense [B,N,T,S] score matrix, 32 MiB in
    # f32, would not show here at these shapes; the flops check catches that.)
    stats = B * N * T * 128 * 4
    for fn, flops, outputs, n_stats in ((fwd, attn, q_bytes, 1),
                                        (grad, int(4.5 * attn), q_bytes + 2 * kv_bytes, 2)):
        compiled = jax.jit(fn).lower(*args).compile()
        # Budget: the wrapper's [B,N,T,H] layout copies of operands and results, the per-row
        # statistics and the mask vectors: 10.1 MiB forward, 15.1 MiB with the backward.
        budget = (q_bytes + 2 * kv_bytes) + outputs + n_stats * stats + 2 ** 20
        # XLA adds the wrapper's elementwise work: block ranges of the masks (O(B*(T+S))) and,
        # in the backward, di = sum_H(o * do) (2*B*N*T*H = 2 Mi): <= 0.1% of the kernels' flops.
        _check_cost_and_memory(compiled, flops=flops, extra_flops=2 * B * N * T * H + 64 * B * 2 * T,
                               arguments=q_bytes + 2 * kv_bytes, outputs=outputs, slack_in=0,
                               slack_out=512,  # the grad's 3-tuple of results: a pointer table
                               temp_budget=budget)


def _kernel_bytes_accessed(lowered) -> dict:
    """{kernel name: bytes_accessed of its CostEstimate} from the tpu_custom_calls of a lowering."""
    out = {}
    for call in re.finditer(r'@tpu_custom_call\(.*?backend_config = "([^"]*)".*?kernel_name = "(\w+)"',
                            lowered.as_text()):
        out[call.group(2)] = int(re.search(r"\\22bytes_accessed\\22:(\d+)", call.group(1)).group(1))
    return out


def test_tpu_flash_cost_estimate_bytes_gqa():
    """The flash kernels' CostEstimate bytes follow their grids and index maps for GQA (G = 4):
    each query head re-reads the visible K/V blocks of its kv head, once per query block."""
    dev = _tpu_device("v5e:2x2")
    bq = bk = 256
    nq, nk, G, frac = T // bq, T // bk, N // K, 0.5   # causal, no window: the static guess 1/2
    args = _abstract(dev, ((B, T, N, H), jnp.bfloat16), ((B, T, K, H), jnp.bfloat16),
                     ((B, T, K, H), jnp.bfloat16))
    fwd = lambda q, k, v: flash_attention(q, k, v, causal=True, block_q=bq, block_kv=bk,  # noqa: E731
                                          interpret=False, device_kind=dev.device_kind)
    grad = jax.grad(lambda q, k, v: fwd(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))
    got = _kernel_bytes_accessed(jax.jit(grad).lower(*args))
    # Operands (T = S = 1024 needs no padding): q (and o, do, dq) 2 MiB, k and v 0.5 MiB each,
    # the f32 row statistics lse / di [B,N,T,1] 32 KiB each, the 4 int32 masks 4 KiB each.
    q_b, kv_b, stat, mask = B * T * N * H * BF16, B * T * K * H * BF16, B * N * T * 4, B * T * 4
    kv_reads = 2 * kv_b * G * nq * frac          # K and V: every query head, every query block
    masks = 2 * mask * N + 2 * mask * N * nq * frac  # query rows per (b, n, i); key rows per block
    assert kv_reads == 8 * 2 ** 20                # G = 4 times one pass per query block over K/V
    assert got == {
        "tessera_flash_fwd": 2 * q_b + stat + kv_reads + masks,                      # 12.22 MiB
        "tessera_flash_dq": 3 * q_b + 2 * stat + kv_reads + masks,                   # 14.25 MiB
        # (B, K, nk, G, nq): k, v read and dk, dv written once; q, do, lse, di once per visible
        # (key block, query block) pair of each query head; masks likewise, key rows per kv head.
        "tessera_flash_dkv": 4 * kv_b + (2 * q_b + 2 * stat) * nk * frac
                             + 2 * mask * N * nk * frac + 2 * mask * K,              # 10.27 MiB
    }, got
    # One key block (block_kv = S): its index changes only with the kv head, so K, V and the key
    # rows are read once, whatever the query heads and blocks.
    one = lambda q, k, v: flash_attention(q, k, v, causal=True, block_q=bq, block_kv=T,  # noqa: E731
                                          interpret=False, device_kind=dev.device_kind)
    got = _kernel_bytes_accessed(jax.jit(one).lower(*args))
    assert got == {"tessera_flash_fwd": 2 * q_b + stat + 2 * kv_b + 2 * mask * N + 2 * mask}, got


@pytest.mark.parametrize("topology", ["v5e:2x2", "v6e:2x2"])
@pytest.mark.parametrize("kv_dtype", ["bfloat16", "int8"])
def test_tpu_paged_compiles(topology, kv_dtype):
    dev = _tpu_device(topology)
    dt = jnp.dtype(kv_dtype)
    shapes = [((8, 4, 4 * K, H), jnp.bfloat16), ((PAGES, PS, K, H), dt), ((PAGES, PS, K, H), dt),
              ((8, M), jnp.int32), ((8,), jnp.int32)]
    if kv_dtype == "int8":
        shapes += [((PAGES, PS, K), jnp.float32)] * 2

    def fn(q, kp, vp, table, lengths, *scales):
        return paged_attention_tpu(q, kp, vp, table, lengths, sliding_window=300,
                                   k_scales=scales[0] if scales else None,
                                   v_scales=scales[1] if scales else None, interpret=False)
    compiled = jax.jit(fn).lower(*_abstract(dev, *shapes)).compile()
    Bq, Tq, Nq = 8, 4, 4 * K
    q_bytes = Bq * Tq * Nq * H * BF16                               # 64 KiB
    pages = 2 * PAGES * PS * K * H * dt.itemsize                    # 4 MiB bf16, 2 MiB int8
    scales = 2 * PAGES * PS * K * 4 if kv_dtype == "int8" else 0    # f32
    ints = Bq * M * 4 + Bq * 4                                      # page table and lengths
    # The CostEstimate (tpu_paged.py) counts every table slot: 4*B*N*T*M*page_size*H.
    flops = 4 * Bq * Nq * Tq * M * PS * H
    # HBM temporaries: the wrapper's [B,K,G*T,H] copy of q and of the result (q-sized each), the
    # query positions [B,G*T,1] int32 (128 lanes per row) and the clipped table: 200 KiB. Pages
    # copied in HBM (gathered into a contiguous cache, dequantized) would not fit in it.
    budget = 2 * q_bytes + Bq * (Nq // K) * Tq * 128 * 4 + 2 * 4096
    _check_cost_and_memory(compiled, flops=flops, extra_flops=4096,  # q positions, clipping
                           arguments=q_bytes + pages + scales + ints, outputs=q_bytes,
                           slack_in=4096,  # int32 table [8,32] and lengths [8] fill (8,128) tiles
                           slack_out=0, temp_budget=budget)


def _cuda_export(fn, *shapes):
    from jax import export
    args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    # Triton needs a GPU generation to target: with no GPU here, name one (jax >= 0.12 requires it)
    gpu = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="gpu")
    try:
        with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=gpu)):
            exp = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*args)
    except (ImportError, NotImplementedError) as e:  # a jaxlib built without Triton bindings
        pytest.skip(f"cannot lower Pallas Triton kernels on this host: {e}")
    assert "xla.gpu.triton" in exp.mlir_module()


def test_gpu_kernels_lower_to_triton():
    """Forward, backward and paged decode lower to Triton IR for CUDA (no GPU needed)."""
    shapes = [((1, 256, 8, 128), jnp.bfloat16), ((1, 256, 2, 128), jnp.bfloat16),
              ((1, 256, 2, 128), jnp.bfloat16)]
    kw = dict(causal=True, sliding_window=100, logit_softcap=20.0, interpret=False)
    fwd = lambda q, k, v: flash_attention_gpu(q, k, v, **kw)                   # noqa: E731
    _cuda_export(fwd, *shapes)
    _cuda_export(jax.grad(lambda q, k, v: fwd(q, k, v).astype(jnp.float32).sum(),
                          argnums=(0, 1, 2)), *shapes)
    paged = [((4, 2, 8, 128), jnp.bfloat16), ((64, 16, 2, 128), jnp.int8),
             ((64, 16, 2, 128), jnp.int8), ((4, 8), jnp.int32), ((4,), jnp.int32),
             ((64, 16, 2), jnp.float32), ((64, 16, 2), jnp.float32)]
    _cuda_export(lambda q, kp, vp, t, ln, ks, vs: paged_attention_gpu(
        q, kp, vp, t, ln, k_scales=ks, v_scales=vs, interpret=False), *paged)
