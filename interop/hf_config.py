"""Hugging Face config.json <-> Tessera ModelConfig for Llama 2/3/3.1, Mistral, Qwen2, Qwen3,
Gemma 2 and Gemma 3 (text).

Only architectures whose every detail the Tessera model reproduces are accepted; anything else
(another RoPE scaling type, an o_proj bias, another MLP activation, sliding/full layers in no
repeating pattern) is a one-line `HFError` naming the config field, never a silently different model.
"""
from __future__ import annotations

import json
from pathlib import Path

from configs import ARCHITECTURE_FIELDS, Config, ConfigError, ModelConfig, from_dict
from configs.loader import _merge, parse_overrides

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                 "Qwen3ForCausalLM": "qwen3", "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3_text"}
GEMMA = ("gemma2", "gemma3_text")
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
    """'llama' | 'mistral' | 'qwen2' | 'qwen3' | 'gemma2' | 'gemma3_text' from `architectures`
    (or `model_type`), else an HFError."""
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


def _rope(hf: dict, family: str) -> dict:
    """RoPE fields of ModelConfig. transformers 5 nests them in `rope_parameters` (Gemma 3: one
    dict per layer type); 4.x configs have top-level `rope_theta` and an optional `rope_scaling`
    dict (Gemma 3: and `rope_local_base_freq` for the sliding layers)."""
    params = hf.get("rope_parameters")
    field_name = "rope_parameters"
    if family == "gemma3_text":
        if params and "full_attention" in params:
            local = params.get("sliding_attention") or {}
            if local.get("rope_type", "default") != "default":
                raise HFError("unsupported RoPE scaling on sliding layers in config.json field "
                              "'rope_parameters.sliding_attention.rope_type'")
            hf = {**hf, "rope_parameters": params["full_attention"], "rope_theta": 1e6}
            local_theta = float(local.get("rope_theta", 10000.0))
        else:
            hf = {**hf, "rope_theta": hf.get("rope_theta", 1e6)}
            local_theta = float(hf.get("rope_local_base_freq", 10000.0))
        return {**_rope(hf, "gemma3_global"), "rope_local_theta": local_theta}
    if not params:
        params, field_name = hf.get("rope_scaling") or {}, "rope_scaling"
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if float(hf.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0))) != 1.0:
        raise HFError("unsupported config.json field 'partial_rotary_factor' != 1")
    out = {"rope_theta": float(theta), "rope_scaling_factor": 0.0}
    if kind == "default":
        return out
    if kind == "linear":
        if params.get("factor") is None:
            raise HFError(f"config.json field '{field_name}' is missing 'factor' for linear RoPE")
        return {**out, "rope_scaling_factor": float(params["factor"]), "rope_scaling_type": "linear"}
    if kind != "llama3":
        raise HFError(f"unsupported RoPE scaling {kind!r} in config.json field '{field_name}.rope_type' "
                      "(supported: default, linear, llama3)")
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


def _gemma_layers(hf: dict, family: str, n_layers: int) -> dict:
    """sliding_window and global_every from Gemma's `layer_types` (or its fixed pattern: every
    2nd layer full in Gemma 2, every `sliding_window_pattern`-th in Gemma 3). Only-sliding layers
    are global_every = n_layers + 1 (no layer global, all with the local RoPE)."""
    if hf.get("use_bidirectional_attention"):
        raise HFError("unsupported config.json field 'use_bidirectional_attention': true")
    kinds = hf.get("layer_types")
    if not kinds:
        g = 2 if family == "gemma2" else int(hf.get("sliding_window_pattern") or 6)
        kinds = ["full_attention" if (i + 1) % g == 0 else "sliding_attention" for i in range(n_layers)]
    if len(kinds) != n_layers or not set(kinds) <= {"full_attention", "sliding_attention"}:
        raise HFError("unsupported config.json field 'layer_types'")
    window = int(hf.get("sliding_window") or 0)
    if "sliding_attention" not in kinds or not window:
        return dict(sliding_window=0, global_every=1)
    for g in range(1, n_layers + 2):
        if kinds == ["full_attention" if (i + 1) % g == 0 else "sliding_attention" for i in range(n_layers)]:
            return dict(sliding_window=window, global_every=g)
    raise HFError("unsupported config.json field 'layer_types': full layers not every g-th layer")


def _gemma(hf: dict, family: str, n_layers: int) -> dict:
    """The ModelConfig fields of Gemma 2 and Gemma 3's block."""
    act = hf.get("hidden_activation") or hf.get("hidden_act")
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise HFError(f"unsupported config.json field 'hidden_activation' {act!r} (only gelu_pytorch_tanh)")
    return dict(mlp_activation="gelu_tanh", norm_offset=1.0, embed_scale=True, post_norms=True,
                qk_norm=family == "gemma3_text",
                query_pre_attn_scalar=float(_require(hf, "query_pre_attn_scalar")),
                attn_logit_softcap=float(hf.get("attn_logit_softcapping") or 0.0),
                final_logit_softcap=float(hf.get("final_logit_softcapping") or 0.0),
                tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
                **_gemma_layers(hf, family, n_layers))


def model_config_from_hf(hf: dict) -> ModelConfig:
    """The Tessera ModelConfig of an HF config.json dict (raises HFError when unsupported)."""
    family = family_of(hf)
    act = hf.get("hidden_act", hf.get("hidden_activation", "silu"))
    if family not in GEMMA and act not in ("silu", "swish"):
        raise HFError(f"unsupported config.json field 'hidden_act' {act!r} (only silu)")
    if hf.get("mlp_bias"):
        raise HFError("unsupported config.json field 'mlp_bias': true")
    # Llama's and Qwen3's attention_bias also puts a bias on o_proj, which Tessera lacks; Qwen2's
    # q/k/v biases are unconditional and its o_proj never has one.
    if family != "qwen2" and hf.get("attention_bias"):
        raise HFError("unsupported config.json field 'attention_bias': true (o_proj bias)")
    d, n = int(_require(hf, "hidden_size")), int(_require(hf, "num_attention_heads"))
    n_layers = int(_require(hf, "num_hidden_layers"))
    if family in GEMMA:
        variant = _gemma(hf, family, n_layers)
    else:
        variant = dict(tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qk_norm=family == "qwen3",
                       sliding_window=_sliding_window(hf, family, n_layers))
    return ModelConfig(
        vocab_size=int(_require(hf, "vocab_size")), d_model=d, n_layers=n_layers, n_heads=n,
        n_kv_heads=int(hf.get("num_key_value_heads") or n), head_dim=int(hf.get("head_dim") or d // n),
        mlp_dim=int(_require(hf, "intermediate_size")),
        max_seq_len=int(_require(hf, "max_position_embeddings")),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), qkv_bias=family == "qwen2", **variant, **_rope(hf, family))


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


def _gemma_config(m: ModelConfig) -> dict:
    """The Gemma 2 / Gemma 3 fields of config.json (layer_types spells out the local/global layers)."""
    if m.qkv_bias:
        raise HFError("cannot export model.qkv_bias=true as Gemma: Gemma has no q/k/v-only bias")
    g = m.global_every
    local = [bool(g) and (i + 1) % g != 0 for i in range(m.n_layers)]
    if any(local) and not m.sliding_window:
        raise HFError("cannot export model.global_every with model.sliding_window=0 as Gemma")
    if any(local) and m.qk_norm is False and (m.rope_scaling_factor > 0 or m.rope_local_theta not in (0, m.rope_theta)):
        raise HFError("cannot export RoPE scaling or model.rope_local_theta with local layers as Gemma 2 (one RoPE)")
    if not g and m.sliding_window and m.qk_norm and m.rope_scaling_factor > 0:
        raise HFError("cannot export RoPE scaling on sliding layers as Gemma 3 (set model.global_every)")
    if m.rope_scaling_factor > 0 and m.rope_scaling_type != "linear":
        raise HFError("cannot export model.rope_scaling_type=llama3 as Gemma (linear only)")
    types = ["sliding_attention" if is_local or (not g and m.sliding_window) else "full_attention"
             for is_local in local]
    qpas = m.query_pre_attn_scalar or m.resolved_head_dim
    hf = {"hidden_activation": "gelu_pytorch_tanh", "layer_types": types, "sliding_window": m.sliding_window or 4096,
          "query_pre_attn_scalar": int(qpas) if qpas == int(qpas) else qpas,
          "attn_logit_softcapping": m.attn_logit_softcap or None,
          "final_logit_softcapping": m.final_logit_softcap or None, "attention_bias": False}
    if m.qk_norm:  # Gemma 3: sliding layers use rope_local_base_freq, unscaled
        hf.update(rope_local_base_freq=(m.rope_local_theta or m.rope_theta) if g else m.rope_theta)
    return hf


def hf_config_from_model(m: ModelConfig, bos_id: int | None = None, eos_id: int | None = None,
                         dtype: str | None = None) -> dict:
    """config.json for a Tessera ModelConfig: Gemma 3 (text) or Gemma 2 for a Gemma block (with or
    without q/k norm), else Qwen3 when it has q/k norm, Qwen2 when it has q/k/v bias, Mistral when
    it has a sliding window, Llama otherwise. RoPE is written in the 4.x layout (`rope_theta`,
    `rope_scaling`, Gemma 3's `rope_local_base_freq`), which transformers 4.x and 5.x both read."""
    gemma = (m.mlp_activation == "gelu_tanh", m.norm_offset == 1.0, m.embed_scale, m.post_norms)
    if any(gemma) and not all(gemma):
        raise HFError("cannot export a partial Gemma block: model.mlp_activation=gelu_tanh, norm_offset=1, "
                      "embed_scale and post_norms go together")
    if all(gemma):
        family = "gemma3_text" if m.qk_norm else "gemma2"
    else:
        if m.norm_offset or m.final_logit_softcap or m.global_every or (
                m.query_pre_attn_scalar and m.query_pre_attn_scalar != m.resolved_head_dim):
            raise HFError("cannot export model.norm_offset, final_logit_softcap, global_every or "
                          "query_pre_attn_scalar: Llama, Mistral, Qwen2 and Qwen3 have none")
        if m.attn_logit_softcap:
            raise HFError("cannot export model.attn_logit_softcap: Llama, Mistral, Qwen2 and Qwen3 have no soft cap")
        if m.qk_norm and m.qkv_bias:
            # Qwen3's only bias switch, attention_bias, also adds an o_proj bias Tessera does not have.
            raise HFError("cannot export model.qkv_bias=true with model.qk_norm=true: Qwen3 has no q/k/v-only bias")
        family = "qwen3" if m.qk_norm else "qwen2" if m.qkv_bias else "mistral" if m.sliding_window else "llama"
    rope_scaling = None
    if m.rope_scaling_factor > 0 and m.rope_scaling_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": m.rope_scaling_factor}
    elif m.rope_scaling_factor > 0:
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
    if family in GEMMA:
        del hf["hidden_act"]
        hf.update(_gemma_config(m))
    elif family == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    elif family == "mistral":
        hf.update(sliding_window=m.sliding_window)
    else:  # Qwen2, Qwen3: the window covers layers >= max_window_layers, so 0 means every layer
        hf.update(use_sliding_window=bool(m.sliding_window), sliding_window=m.sliding_window or None,
                  max_window_layers=0 if m.sliding_window else m.n_layers)
    if family == "qwen3":
        hf.update(attention_bias=False)
    return hf
