"""Hugging Face interop: tiny random transformers models -> Tessera and back, with logits parity.

Each case builds a random model with transformers (never a hub download), saves it, imports it,
and checks fp32 logits (max abs diff <= 1e-4) and 32 greedy tokens against transformers (ids
equal wherever the top-2 margin is beyond rounding); then
exports it back, reloads it in transformers (identical logits) and re-imports it (bit-exact).
"""
from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)  # tiny models: threads only contend on the shared 2-core machines

from interop.convert import export_hf, import_hf  # noqa: E402
from interop.load import load_checkpoint  # noqa: E402
from sharding.mesh import make_mesh  # noqa: E402
from configs import load_config  # noqa: E402

TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
GEMMA3_ROPE = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
               "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
CONFIG_CLASSES = {"Gemma3": "Gemma3TextConfig"}
CASES = {  # name: (transformers class name, config extras, save_pretrained kwargs)
    "llama_gqa": ("Llama", {}, {}),
    "llama3_rope_scaling": ("Llama", dict(rope_scaling=LLAMA3_ROPE, rope_theta=500000.0), {}),
    "mistral_sliding_window": ("Mistral", dict(sliding_window=8), {}),
    "qwen2_bias_sharded": ("Qwen2", dict(rope_theta=1000000.0), dict(max_shard_size="200KB")),
    "llama_tied": ("Llama", dict(tie_word_embeddings=True, num_key_value_heads=4), {}),
    # Qwen3: q/k RMSNorm per head; head_dim set apart from hidden_size / heads (16 here), GQA 4:2;
    # the window case keeps Qwen3Config's default head_dim, 128.
    "qwen3_untied_head_dim32": ("Qwen3", dict(head_dim=32, rope_theta=1000000.0), {}),
    "qwen3_tied_head_dim8": ("Qwen3", dict(head_dim=8, tie_word_embeddings=True, rope_theta=1000000.0), {}),
    "qwen3_sliding_window": ("Qwen3", dict(use_sliding_window=True, max_window_layers=0, sliding_window=8), {}),
    # Gemma 2: GeGLU, (1 + w) norms, post norms, scaled embeddings, sliding layers 0 and 2 (window 8
    # < 56 tokens), soft caps low enough to bite, query_pre_attn_scalar apart from head_dim.
    "gemma2_softcaps_window": ("Gemma2", dict(num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=24,
                                              sliding_window=8, attn_logit_softcapping=3.0,
                                              final_logit_softcapping=5.0, tie_word_embeddings=True), {}),
    # Gemma 3: plus (1 + w) q/k norm; every 3rd of 5 layers global (two groups of 3 would need 6:
    # here one group and 2 local layers left), local RoPE base 1e4, global 1e6 with linear scaling.
    "gemma3_pattern3_linear_rope": ("Gemma3", dict(
        num_hidden_layers=5, head_dim=16, query_pre_attn_scalar=16, sliding_window=8, sliding_window_pattern=3,
        tie_word_embeddings=True, rope_parameters=GEMMA3_ROPE), {}),
}
FP32 = ["model.compute_dtype=float32", "model.param_dtype=float32", "model.remat=none", "model.attention_impl=xla"]
PROMPT_LEN, NEW_TOKENS = 24, 32
MEASURED: dict[str, float] = {}


def build_hf_model(path, family: str, extra: dict, save_kwargs: dict, seed: int = 0):
    """A random-weight transformers model saved to `path`; returns the torch model."""
    torch.manual_seed(seed)
    if family.startswith("Gemma"):  # soft caps: the eager path is transformers' reference
        extra = {**extra, "attn_implementation": "eager"}
    config = getattr(transformers, CONFIG_CLASSES.get(family, f"{family}Config"))(**{**TINY, **extra})
    model = getattr(transformers, f"{family}ForCausalLM")(config).eval()
    with torch.no_grad():  # random biases and norm scales too, so a mix-up cannot hide
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path, **save_kwargs)
    return model


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def hf_greedy(model, prompt: np.ndarray) -> list[list[int]]:
    ids = prompt.copy()
    for _ in range(NEW_TOKENS):
        nxt = hf_logits(model, ids)[:, -1].argmax(-1)
        ids = np.concatenate([ids, nxt[:, None]], axis=1)
    return ids[:, prompt.shape[1]:].tolist()


@functools.partial(jax.jit, static_argnums=0)
def forward(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


def pure(state) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(state))


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(load_config("tiny"))  # fsdp over the 8 fake CPU devices


@pytest.mark.parametrize("case", list(CASES))
def test_import_logits_greedy_export_roundtrip(case, tmp_path, mesh):
    family, extra, save_kwargs = CASES[case]
    hf_dir, run_dir, out_dir = tmp_path / "hf", tmp_path / "run", tmp_path / "export"
    model = build_hf_model(hf_dir, family, extra, save_kwargs)
    if save_kwargs:
        assert (hf_dir / "model.safetensors.index.json").is_file()

    cfg = import_hf(hf_dir, run_dir, mesh=mesh, progress=False)
    assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints" / "0").is_dir()
    assert cfg.model.sliding_window == extra.get("sliding_window", 0)
    assert cfg.model.qkv_bias == (family == "Qwen2") and cfg.model.qk_norm == (family in ("Qwen3", "Gemma3"))
    assert cfg.model.post_norms == cfg.model.embed_scale == (cfg.model.norm_offset == 1) == family.startswith("Gemma")
    assert cfg.model.global_every == {"Gemma2": 2, "Gemma3": 3}.get(family, 0)
    # Qwen3Config's own default head_dim is 128, whatever hidden_size is.
    assert cfg.model.resolved_head_dim == (getattr(model.config, "head_dim", None) or 16)
    assert cfg.model.tie_embeddings == extra.get("tie_word_embeddings", False)
    cfg, graphdef, state, _ = load_checkpoint(run_dir, mesh, overrides=FP32)

    rng = np.random.default_rng(0)
    ids = rng.integers(0, TINY["vocab_size"], (2, PROMPT_LEN + NEW_TOKENS), dtype=np.int64)
    ref = hf_logits(model, ids)
    got = np.asarray(forward(graphdef, state, jnp.asarray(ids, jnp.int32)))
    diff = float(np.abs(got - ref).max())
    MEASURED[case] = diff
    print(f"{case}: max abs logits diff {diff:.2e}")
    assert diff <= 1e-4, diff

    # Greedy continuation: transformers' greedy tokens, and ours teacher-forced on them. Ids must
    # agree wherever transformers' top-2 margin exceeds twice the logits bound (a near-tie may
    # go either way with the host CPU's rounding).
    prompt = ids[:, :PROMPT_LEN]
    seq = np.concatenate([prompt, np.array(hf_greedy(model, prompt))], axis=1)      # [2,P+N]
    theirs = hf_logits(model, seq)[:, PROMPT_LEN - 1:-1]                             # [2,N,V]
    ours = np.asarray(forward(graphdef, state, jnp.asarray(seq, jnp.int32)))[:, PROMPT_LEN - 1:-1]
    assert float(np.abs(ours - theirs).max()) <= 1e-4
    top2 = np.sort(theirs, axis=-1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 2e-4
    assert clear.mean() >= 0.9 and (ours.argmax(-1)[clear] == theirs.argmax(-1)[clear]).all()

    # Direct use: the HF directory itself, on a tensor-parallel mesh, gives the same params.
    tp_mesh = make_mesh(load_config("tiny", ["mesh.rules=fsdp_tp", "mesh.tensor=2"]))
    _, _, direct, _ = load_checkpoint(hf_dir, tp_mesh, overrides=FP32 + ["mesh.rules=fsdp_tp"], progress=False)
    assert direct["layers"]["wq"][...].sharding.spec[2] == "tensor"
    jax.tree.map(np.testing.assert_array_equal, pure(direct), pure(state))

    shard = dict(max_shard_bytes=150_000) if save_kwargs else {}
    export_hf(run_dir, out_dir, mesh=mesh, progress=False, **shard)
    assert (out_dir / "model.safetensors.index.json").is_file() == bool(save_kwargs)
    eager = dict(attn_implementation="eager") if family.startswith("Gemma") else {}
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out_dir, **eager).eval()
    assert type(reloaded) is type(model)
    np.testing.assert_array_equal(hf_logits(reloaded, ids), ref)
    _, _, again, _ = load_checkpoint(out_dir, mesh, overrides=FP32, progress=False)
    jax.tree.map(np.testing.assert_array_equal, pure(again), pure(state))
    assert json.loads((out_dir / "config.json").read_text())["tie_word_embeddings"] == cfg.model.tie_embeddings


def test_config_mapping_of_published_layouts():
    """transformers 4.x layouts as published on the hub (Llama 3.1, Qwen2 window flags)."""
    from configs import ConfigError
    from interop.hf_config import hf_config_from_model, model_config_from_hf
    llama31 = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
               "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
               "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
               "rope_theta": 500000.0, "tie_word_embeddings": False, "hidden_act": "silu",
               "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
    m = model_config_from_hf(llama31)
    assert (m.n_kv_heads, m.resolved_head_dim, m.rope_scaling_factor, m.rope_original_max_len) == (8, 128, 8.0, 8192)
    assert model_config_from_hf(hf_config_from_model(m)) == m
    qwen = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 896, "intermediate_size": 4864,
            "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "vocab_size": 151936,
            "max_position_embeddings": 32768, "tie_word_embeddings": True, "sliding_window": 32768,
            "use_sliding_window": False, "max_window_layers": 21}
    m = model_config_from_hf(qwen)
    assert m.qkv_bias and m.tie_embeddings and m.sliding_window == 0 and m.resolved_head_dim == 64
    assert model_config_from_hf({**qwen, "use_sliding_window": True, "max_window_layers": 0}).sliding_window == 32768
    with pytest.raises(ConfigError, match="max_window_layers"):
        model_config_from_hf({**qwen, "use_sliding_window": True})
    with pytest.raises(ConfigError, match="'attention_bias'"):
        model_config_from_hf({**llama31, "attention_bias": True})
    # Qwen3-8B's config.json as published (transformers 4.51 layout).
    qwen3 = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False,
             "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 12288,
             "max_position_embeddings": 40960, "max_window_layers": 36, "num_attention_heads": 32,
             "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None,
             "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": False,
             "use_sliding_window": False, "vocab_size": 151936}
    m = model_config_from_hf(qwen3)
    assert m.qk_norm and not m.qkv_bias and m.sliding_window == 0 and (m.head_dim, m.rope_theta) == (128, 1e6)
    out = hf_config_from_model(m)
    assert out["architectures"] == ["Qwen3ForCausalLM"] and not out["attention_bias"] and not out["use_sliding_window"]
    assert model_config_from_hf(out) == m
    with pytest.raises(ConfigError, match="'attention_bias'"):
        model_config_from_hf({**qwen3, "attention_bias": True})
    with pytest.raises(ConfigError, match="model.qkv_bias"):
        hf_config_from_model(dataclasses.replace(m, qkv_bias=True))


def test_gemma_config_mapping_of_published_layouts():
    """Gemma 2 2B's and Gemma 3 1B's config.json as published (transformers 4.x layouts) are the
    presets' architectures, round-trip through export, and what Tessera cannot run is refused."""
    from configs import ARCHITECTURE_FIELDS, ConfigError
    from interop.hf_config import hf_config_from_model, model_config_from_hf
    gemma2 = {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "attn_logit_softcapping": 50.0,
              "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
              "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304, "intermediate_size": 9216,
              "max_position_embeddings": 8192, "num_attention_heads": 8, "num_hidden_layers": 26,
              "num_key_value_heads": 4, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
              "rope_theta": 10000.0, "sliding_window": 4096, "vocab_size": 256000}
    gemma3 = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "attention_bias": False,
              "attn_logit_softcapping": None, "final_logit_softcapping": None, "head_dim": 256,
              "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152, "intermediate_size": 6912,
              "max_position_embeddings": 32768, "num_attention_heads": 4, "num_hidden_layers": 26,
              "num_key_value_heads": 1, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
              "rope_local_base_freq": 10000, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512,
              "sliding_window_pattern": 6, "vocab_size": 262144}
    arch = lambda m: {k: getattr(m, k) for k in ARCHITECTURE_FIELDS}
    for hf, preset in ((gemma2, "gemma2-2b"), (gemma3, "gemma3-1b")):
        m = model_config_from_hf(hf)
        assert arch(m) == arch(load_config(preset).model), preset
        assert model_config_from_hf(hf_config_from_model(m)) == m
    scaled = model_config_from_hf({**gemma3, "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
    assert (scaled.rope_scaling_type, scaled.rope_scaling_factor, scaled.rope_local_theta) == ("linear", 8.0, 1e4)
    with pytest.raises(ConfigError, match="'hidden_activation'"):
        model_config_from_hf({**gemma2, "hidden_activation": "gelu", "hidden_act": None})
    with pytest.raises(ConfigError, match="'layer_types'"):
        model_config_from_hf({**gemma2, "num_hidden_layers": 3,
                              "layer_types": ["full_attention", "sliding_attention", "sliding_attention"]})
    with pytest.raises(ConfigError, match="use_bidirectional_attention"):
        model_config_from_hf({**gemma3, "use_bidirectional_attention": True})
    with pytest.raises(ConfigError, match="partial Gemma block"):
        hf_config_from_model(dataclasses.replace(m, post_norms=False))
    with pytest.raises(ConfigError, match="global_every"):
        hf_config_from_model(dataclasses.replace(load_config("tiny").model, global_every=2))
