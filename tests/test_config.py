"""Config loading: presets, inheritance, typed overrides, and one-line errors."""
import dataclasses
import subprocess
import sys

import pytest
import yaml

from configs import Config, ConfigError, load_config, to_dict
from configs.loader import CONFIG_DIR
from conftest import ROOT

PUBLISHED = {"llama2-7b": 6.74e9, "llama3-8b": 8.03e9, "mistral-7b": 7.24e9,
             "llama2-70b": 68.98e9, "llama3-70b": 70.55e9, "125m": 124e6, "1b": 1.24e9}


def test_base_yaml_lists_every_default():
    base = yaml.safe_load((CONFIG_DIR / "base.yaml").read_text())
    defaults = to_dict(Config())
    assert set(base) == set(defaults)
    for section, values in defaults.items():
        assert set(base[section]) == set(values), section
        for key, value in values.items():
            assert base[section][key] == (list(value) if isinstance(value, tuple) else value), f"{section}.{key}"


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_preset_param_counts_match_published(preset):
    from model.stats import param_count
    n = param_count(load_config(preset).model)
    assert abs(n - PUBLISHED[preset]) / PUBLISHED[preset] < 0.005, n


# Qwen3's published config.json values (besides vocab 151936, head_dim 128, 8 kv heads, rope_theta
# 1e6, max_position_embeddings 40960, rms_norm_eps 1e-6, which both share).
QWEN3 = {"qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                            tie_word_embeddings=True),
         "qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                          tie_word_embeddings=False)}


@pytest.mark.parametrize("preset", sorted(QWEN3))
def test_qwen3_presets_match_transformers(preset):
    """The preset is Qwen3's architecture, and counts exactly transformers' parameters (a tied
    embedding once), built on the meta device so nothing is allocated."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import jax
    from flax import nnx
    from configs import ARCHITECTURE_FIELDS
    from interop.hf_config import model_config_from_hf
    from model.init import abstract_model
    from model.stats import param_count
    hf = transformers.Qwen3Config(vocab_size=151936, head_dim=128, num_key_value_heads=8, rope_theta=1e6,
                                  max_position_embeddings=40960, rms_norm_eps=1e-6, **QWEN3[preset])
    with torch.device("meta"):
        expected = sum(p.numel() for p in transformers.Qwen3ForCausalLM(hf).parameters())  # shared once
    cfg = load_config(preset)  # by bare name: "qwen3-0.6b" has a dot but is no file suffix
    ours = model_config_from_hf(hf.to_dict())
    arch = lambda m: {k: getattr(m, k) for k in ARCHITECTURE_FIELDS}
    assert arch(cfg.model) == arch(ours)
    assert param_count(cfg.model) == expected == {"qwen3-0.6b": 596049920, "qwen3-8b": 8190735360}[preset]
    assert sum(x.size for x in jax.tree.leaves(nnx.state(abstract_model(cfg)))) == expected


# Gemma's published config.json values (text part of Gemma 3 4B/12B); transformers' config
# defaults supply the rest (Gemma 2: soft caps 50/30, window 4096, every 2nd layer global;
# Gemma 3: local RoPE base 1e4, global 1e6, every 6th layer global).
GEMMA = {
    "gemma2-2b": ("Gemma2", 2614341888, dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                                             num_attention_heads=8, num_key_value_heads=4, vocab_size=256000)),
    "gemma2-9b": ("Gemma2", 9241705984, dict(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                                             num_attention_heads=16, num_key_value_heads=8, vocab_size=256000)),
    "gemma3-1b": ("Gemma3", 999885952, dict(hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                                            num_attention_heads=4, num_key_value_heads=1, vocab_size=262144,
                                            sliding_window=512, max_position_embeddings=32768)),
    "gemma3-4b": ("Gemma3", 3880263168, dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                                             num_attention_heads=8, num_key_value_heads=4, sliding_window=1024,
                                             rope_scaling={"rope_type": "linear", "factor": 8.0})),
    "gemma3-12b": ("Gemma3", 11766034176, dict(hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
                                               num_attention_heads=16, num_key_value_heads=8, sliding_window=1024,
                                               rope_scaling={"rope_type": "linear", "factor": 8.0})),
}


@pytest.mark.parametrize("preset", sorted(GEMMA))
def test_gemma_presets_match_transformers(preset):
    """As for Qwen3: the architecture of transformers' config, and exactly its parameter count."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from configs import ARCHITECTURE_FIELDS
    from interop.hf_config import model_config_from_hf
    from model.stats import param_count
    family, count, values = GEMMA[preset]
    config_cls = transformers.Gemma2Config if family == "Gemma2" else transformers.Gemma3TextConfig
    hf = config_cls(head_dim=256, query_pre_attn_scalar=256, **values)
    with torch.device("meta"):
        expected = sum(p.numel() for p in getattr(transformers, f"{family}ForCausalLM")(hf).parameters())
    cfg = load_config(preset)
    arch = lambda m: {k: getattr(m, k) for k in ARCHITECTURE_FIELDS}
    assert arch(cfg.model) == arch(model_config_from_hf(hf.to_dict()))
    assert param_count(cfg.model) == expected == count
    # FLOPs: global layers attend causally over T, local ones over their window W only.
    from model.stats import flops_per_token
    m, T = cfg.model, 8192
    W, n_global = m.sliding_window, m.n_layers // m.global_every
    keys = n_global * (T + 1) / 2 + (m.n_layers - n_global) * (W * (W + 1) / 2 + (T - W) * W) / T
    dense = flops_per_token(dataclasses.replace(m, sliding_window=0, global_every=0), T, training=False)
    want = dense - 4 * m.n_heads * 256 * (m.n_layers * (T + 1) / 2 - keys)
    assert flops_per_token(m, T, training=False) == pytest.approx(want, rel=1e-12)


def test_presets_inherit_and_override():
    cfg = load_config("llama3-70b")
    assert cfg.model.d_model == 8192 and cfg.model.vocab_size == 128256  # from llama2-70b and itself
    assert cfg.train.lr == 3e-4                                           # from base
    cfg = load_config("tiny", ["model.d_model=128", "train.lr=1e-3", "serve.prefill_buckets=[8,16]",
                               "model.tie_embeddings=false"])
    assert (cfg.model.d_model, cfg.train.lr, cfg.serve.prefill_buckets) == (128, 1e-3, (8, 16))
    assert cfg.model.tie_embeddings is False
    assert dataclasses.is_dataclass(cfg) and hash(cfg)


@pytest.mark.parametrize("overrides,message", [
    (["model.d_modle=3"], "unknown config key 'model.d_modle' (did you mean 'model.d_model'?)"),
    (["model.d_model=abc"], "config key 'model.d_model' expects int, got 'abc'"),
    (["model.tie_embeddings=maybe"], "config key 'model.tie_embeddings' expects bool"),
    (["mesh.rules=zero"], "config key 'mesh.rules' must be one of fsdp, fsdp_tp, serve_tp"),
    (["model.n_kv_heads=3"], "model.n_heads (4) must be a multiple of model.n_kv_heads (3)"),
    (["model.global_every=-2"], "config key 'model.global_every' must be >= 0 (0 = off); got -2"),
    (["data.seq_len=4096"], "data.seq_len (4096) exceeds model.max_seq_len (512)"),
    (["train"], "override 'train' must look like section.key=value"),
    (["serve.memory_utilization=1.5"], "config key 'serve.memory_utilization' must be in (0, 1]; got 1.5"),
    (["serve.max_model_len=100000"], "config key 'serve.max_model_len' (100000) exceeds the model's context"),
    (["serve.dtype=fp16"], "config key 'serve.dtype' must be one of auto, float32, bfloat16"),
])
def test_bad_overrides(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_enum_sets_are_defined_once():
    """The schema's allowed values are the ones the code dispatches on and the CLIs offer."""
    import serve
    from configs import schema
    from model.attention import IMPLS
    from serving.kv_cache import KV_DTYPES
    assert IMPLS is schema.ATTENTION_IMPLS and ("auto",) + tuple(KV_DTYPES) == schema.KV_CACHE_DTYPES
    assert schema.CHOICES["serve.kv_dtype"] is schema.KV_CACHE_DTYPES
    assert serve.parse_args(["ckpt", "--kv-dtype", "int8"]).kv_dtype == "int8"
    with pytest.raises(SystemExit):
        serve.parse_args(["ckpt", "--kv-dtype", "fp8"])


def test_missing_preset():
    with pytest.raises(ConfigError, match="config file not found: nope"):
        load_config("nope")


def run_train(*args):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})


def test_dry_run_70b_prints_exact_count():
    out = run_train("configs/llama3-70b.yaml", "--dry-run", "--devices", "64")
    assert out.returncode == 0, out.stderr
    assert "params: 70553706496" in out.stdout
    assert "mesh: data=1 x fsdp=64 x tensor=1 (64 devices, rules fsdp)" in out.stdout
    norms = 80 * 2 * 8192 + 8192  # replicated; every other weight splits 64 ways over fsdp
    assert f"param bytes per device: {(70553706496 - norms) * 4 // 64 + norms * 4}" in out.stdout
    assert "model FLOPs per token" in out.stdout


@pytest.mark.parametrize("args,message", [
    (["tiny", "model.d_modle=5"], "error: unknown config key 'model.d_modle' (did you mean 'model.d_model'?)"),
    (["tiny", "mesh.fsdp=4"], "error: mesh {'data': 1, 'fsdp': 4, 'tensor': 1} has 4 devices but 8 are available"),
    (["tiny", "mesh.tensor=8", "mesh.rules=fsdp_tp"], "error: model.n_heads (4) is not divisible by the tensor axis (8)"),
    (["tiny", "mesh.tensor=16", "mesh.fsdp=1", "mesh.rules=fsdp_tp", "model.n_heads=16", "model.n_kv_heads=12"],
     "error: model.n_heads (16) must be a multiple of model.n_kv_heads (12)"),
    (["missing.yaml"], "error: config file not found: missing.yaml"),
])
def test_train_cli_bad_input(args, message):
    out = run_train(*args, "--dry-run", "--devices", "8")
    assert out.returncode == 2
    assert out.stderr.strip() == message or out.stderr.startswith(message), out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
