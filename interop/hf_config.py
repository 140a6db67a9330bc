"""Hugging Face config.json <-> Tessera ModelConfig for Llama 2/3/3.1, Mistral, Qwen2 and Qwen3.

Only architectures whose every detail the Tessera model reproduces are accepted; anything else
(another RoPE scaling type, an o_proj bias, a non-SiLU MLP, mixed sliding/full layers) is a
one-line `HFError` naming the config field, never a silently different model.
"""
from __future__ import annotations

import json
from pathlib import Path

from configs import ARCHITECTURE_FIELDS, Config, ConfigError, ModelConfig, from_dict
from configs.loader import _merge, parse_overrides

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                 "Qwen3ForCausalLM": "qwen3"}
MODEL_TYPES = {family: arch for arch, family in ARCHITECTURES.items()}


class HFError(ConfigError):
    """A Hugging Face directory Tessera cannot convert: the message is one line naming the field,
    tensor or file (a ConfigError, so entry points print it and exit with code 2)."""


def read_json(path: Path) -> dict:
    """A JSON file as a dict, with a one-line error naming the file."""
    if not path.is_file():
        raise HFError(f"{path.name} not found in {path.parent}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise HFError(f"{path} must hold a JSON object")
    return data


def family_of(hf: dict) -> str:
    """'llama' | 'mistral' | 'qwen2' | 'qwen3' from `architectures` (or `model_type`), else an HFError."""
    archs = hf.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    if not archs and hf.get("model_type") in MODEL_TYPES:
        return hf["model_type"]
    name = archs[0] if archs else hf.get("model_type")
    raise HFError(f"unsupported architecture {name!r} in config.json field "
                  f"'{'architectures' if archs else 'model_type'}' (supported: {', '.join(ARCHITECTURES)})")


def _require(hf: dict, key: str):
    if hf.get(key) is None:
        raise HFError(f"config.json is missing field '{key}'")
    return hf[key]


def _rope(hf: dict) -> dict:
    """RoPE fields of ModelConfig. transformers 5 nests them in `rope_parameters`; 4.x configs
    have top-level `rope_theta` and an optional `rope_scaling` dict."""
    params = hf.get("rope_parameters")
    field_name = "rope_parameters"
    if not params:
        params, field_name = hf.get("rope_scaling") or {}, "rope_scaling"
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if float(hf.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0))) != 1.0:
        raise HFError("unsupported config.json field 'partial_rotary_factor' != 1")
    out = {"rope_theta": float(theta), "rope_scaling_factor": 0.0}
    if kind == "default":
        return out
    if kind != "llama3":
        raise HFError(f"unsupported RoPE scaling {kind!r} in config.json field '{field_name}.rope_type' "
                      "(supported: default, llama3)")
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
        if params.get(key) is None:
            raise HFError(f"config.json field '{field_name}' is missing '{key}' for llama3 RoPE")
    return {**out, "rope_scaling_factor": float(params["factor"]),
            "rope_low_freq_factor": float(params["low_freq_factor"]),
            "rope_high_freq_factor": float(params["high_freq_factor"]),
            "rope_original_max_len": int(params.get("original_max_position_embeddings")
                                         or _require(hf, "max_position_embeddings"))}


def _sliding_window(hf: dict, family: str, n_layers: int) -> int:
    """Tessera's window W (key visible iff pos_q - pos_k < W) equals transformers' `sliding_window`
    (its mask keeps kv_idx > q_idx - W), so the value carries over unchanged."""
    window = int(hf.get("sliding_window") or 0)
    if family == "mistral":
        return window
    if family == "llama":
        return 0
    # Qwen2 and Qwen3 apply the window only when use_sliding_window, and only to layers >= max_window_layers.
    kinds = hf.get("layer_types")
    if kinds:
        if set(kinds) == {"full_attention"} or not window:
            return 0
        if set(kinds) == {"sliding_attention"}:
            return window
        raise HFError("unsupported config.json field 'layer_types': mixed sliding and full attention layers")
    if not hf.get("use_sliding_window") or not window or hf.get("max_window_layers", n_layers) >= n_layers:
        return 0
    if hf.get("max_window_layers", 0) == 0:
        return window
    raise HFError("unsupported config.json field 'max_window_layers': sliding window on only some layers")


def model_config_from_hf(hf: dict) -> ModelConfig:
    """The Tessera ModelConfig of an HF config.json dict (raises HFError when unsupported)."""
    family = family_of(hf)
    act = hf.get("hidden_act", hf.get("hidden_activation", "silu"))
    if act not in ("silu", "swish"):
        raise HFError(f"unsupported config.json field 'hidden_act' {act!r} (only silu)")
    if hf.get("mlp_bias"):
        raise HFError("unsupported config.json field 'mlp_bias': true")
    # Llama's and Qwen3's attention_bias also puts a bias on o_proj, which Tessera lacks; Qwen2's
    # q/k/v biases are unconditional and its o_proj never has one.
    if family != "qwen2" and hf.get("attention_bias"):
        raise HFError("unsupported config.json field 'attention_bias': true (o_proj bias)")
    d, n = int(_require(hf, "hidden_size")), int(_require(hf, "num_attention_heads"))
    n_layers = int(_require(hf, "num_hidden_layers"))
    return ModelConfig(
        vocab_size=int(_require(hf, "vocab_size")), d_model=d, n_layers=n_layers, n_heads=n,
        n_kv_heads=int(hf.get("num_key_value_heads") or n), head_dim=int(hf.get("head_dim") or d // n),
        mlp_dim=int(_require(hf, "intermediate_size")),
        max_seq_len=int(_require(hf, "max_position_embeddings")),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), qkv_bias=family == "qwen2", qk_norm=family == "qwen3",
        sliding_window=_sliding_window(hf, family, n_layers), **_rope(hf))


def tessera_config(model: ModelConfig, overrides: list[str] | tuple = ()) -> Config:
    """A full Config around an imported architecture: base.yaml defaults (so params are fp32
    whatever the checkpoint's dtype, as training expects), then `overrides`."""
    arch = {k: getattr(model, k) for k in ARCHITECTURE_FIELDS}
    # base.yaml's data.seq_len may exceed a small model's context; validation would reject it.
    data = {"model": arch, "data": {"seq_len": min(256, model.max_seq_len)}}
    try:
        return from_dict(_merge(data, parse_overrides(list(overrides))))
    except HFError:
        raise
    except ConfigError as e:
        raise HFError(str(e)) from None


def hf_config_from_model(m: ModelConfig, bos_id: int | None = None, eos_id: int | None = None,
                         dtype: str | None = None) -> dict:
    """config.json for a Tessera ModelConfig: Qwen3 when it has q/k norm, Qwen2 when it has q/k/v
    bias, Mistral when it has a sliding window, Llama otherwise. RoPE is written in the 4.x layout
    (`rope_theta`, `rope_scaling`), which transformers 4.x and 5.x both read."""
    if m.attn_logit_softcap:
        raise HFError("cannot export model.attn_logit_softcap: Llama, Mistral, Qwen2 and Qwen3 have no soft cap")
    if m.qk_norm and m.qkv_bias:
        # Qwen3's only bias switch, attention_bias, also adds an o_proj bias Tessera does not have.
        raise HFError("cannot export model.qkv_bias=true with model.qk_norm=true: Qwen3 has no q/k/v-only bias")
    family = "qwen3" if m.qk_norm else "qwen2" if m.qkv_bias else "mistral" if m.sliding_window else "llama"
    rope_scaling = None
    if m.rope_scaling_factor > 0:
        rope_scaling = {"rope_type": "llama3", "factor": m.rope_scaling_factor,
                        "low_freq_factor": m.rope_low_freq_factor, "high_freq_factor": m.rope_high_freq_factor,
                        "original_max_position_embeddings": m.rope_original_max_len}
    hf = {"architectures": [MODEL_TYPES[family]], "model_type": family,
          "vocab_size": m.vocab_size, "hidden_size": m.d_model, "intermediate_size": m.mlp_dim,
          "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
          "num_key_value_heads": m.n_kv_heads, "head_dim": m.resolved_head_dim, "hidden_act": "silu",
          "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps,
          "tie_word_embeddings": m.tie_embeddings, "rope_theta": m.rope_theta,
          "rope_scaling": rope_scaling, "bos_token_id": bos_id, "eos_token_id": eos_id,
          "torch_dtype": dtype or m.param_dtype, "use_cache": True}
    if family == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    elif family == "mistral":
        hf.update(sliding_window=m.sliding_window)
    else:  # Qwen2, Qwen3: the window covers layers >= max_window_layers, so 0 means every layer
        hf.update(use_sliding_window=bool(m.sliding_window), sliding_window=m.sliding_window or None,
                  max_window_layers=0 if m.sliding_window else m.n_layers)
    if family == "qwen3":
        hf.update(attention_bias=False)
    return hf

