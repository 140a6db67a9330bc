"""The one typed config schema. Defaults live in configs/base.yaml; presets override only what differs.

Every section is a frozen dataclass, so a config is hashable data that can be passed into jitted
code as a static argument. Field comments use the dimension letters of the codebase.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 32000          # V
    d_model: int = 4096              # D
    n_layers: int = 32               # L
    n_heads: int = 32                # N query heads
    n_kv_heads: int = 32             # K kv heads (grouped-query when K < N)
    head_dim: int = 0                # H; 0 means d_model // n_heads
    mlp_dim: int = 11008             # F (gated MLP hidden)
    mlp_activation: str = "silu"     # silu (SwiGLU) | gelu_tanh (GeGLU, Gemma)
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama-3 RoPE frequency scaling; factor 0 disables it.
    rope_scaling_factor: float = 0.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    rope_scaling_type: str = "llama3"  # llama3 | linear (inv_freq / factor, Gemma 3)
    rope_local_theta: float = 0.0    # RoPE base of local (windowed) layers; 0 = rope_theta
    global_every: int = 0            # g: layer i global iff (i+1) % g == 0, else local; 0 = all alike
    qkv_bias: bool = False           # Qwen2
    qk_norm: bool = False            # Qwen3
    sliding_window: int = 0          # Mistral; 0 means full causal attention
    attn_logit_softcap: float = 0.0  # 0 disables the tanh soft cap
    final_logit_softcap: float = 0.0  # cap * tanh(logits / cap) on the output logits; 0 disables
    query_pre_attn_scalar: float = 0.0  # attention scale is this ** -0.5; 0 means head_dim
    norm_offset: float = 0.0         # RMSNorm scales by (offset + w); Gemma 1.0
    embed_scale: bool = False        # embeddings times sqrt(d_model) (Gemma)
    post_norms: bool = False         # RMSNorm on attention and MLP outputs before the residual add
    init_std: float = 0.02
    param_dtype: str = "float32"
    compute_dtype: str = "auto"      # auto: bfloat16 on TPU/GPU, float32 on CPU
    scan_layers: bool = True
    remat: str = "full"              # none | full | save_dots | minimal
    attention_impl: str = "auto"     # auto | xla | pallas | cudnn
    logits_chunk: int = 0            # the loss builds fp32 logits this many positions at a time
                                     #   (model/loss.py); 0 = when a row's pass 1 GiB; -1 = never
    attn_block_q: int = 0            # pallas flash query block; 0 = per-platform default
    attn_block_kv: int = 0           # pallas flash key block; 0 = per-platform default

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads


# The ModelConfig fields that make up the architecture (what the weights' shapes and meaning depend
# on). The others (dtypes, init_std, remat, scan, attention kernel and blocks) are choices of how
# to run it: fine-tuning from a checkpoint takes these fields from it, a resumed run must match
# them, and a Hugging Face config.json is translated into them.
ARCHITECTURE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "mlp_dim",
                       "max_seq_len", "tie_embeddings", "norm_eps", "rope_theta", "rope_scaling_factor",
                       "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_len", "qkv_bias",
                       "qk_norm", "sliding_window", "attn_logit_softcap", "mlp_activation",
                       "rope_scaling_type", "rope_local_theta", "global_every", "final_logit_softcap",
                       "query_pre_attn_scalar", "norm_offset", "embed_scale", "post_norms")


@dataclass(frozen=True)
class MeshConfig:
    # ICI sizes (within a slice / host). -1 on one axis fills the remaining devices.
    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    # DCN sizes (across slices / hosts); their product times the ICI product is the device count.
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1
    rules: str = "fsdp"              # logical-axis rules table: fsdp | fsdp_tp | serve_tp


@dataclass(frozen=True)
class DataConfig:
    path: str = ""                   # file, directory or .jsonl; empty means the stdlib corpus
    jsonl_field: str = "text"
    tokenizer: str = ""              # existing sentencepiece .model; empty trains one on the data
    seq_len: int = 256               # T of each packed training row
    val_path: str = ""               # optional separate validation data
    val_fraction: float = 0.05       # used when val_path is empty
    shuffle_seed: int = 0
    tokenizer_sample_bytes: int = 20_000_000  # text fed to the sentencepiece trainer
    workers: int = 0                 # loader processes computing batches ahead; 0 = threads of this one
    prefetch: int = 2                # batches computed ahead
    prepare_workers: int = 0         # processes tokenizing a raw data.path on first use; 0 = one per CPU
    cache_dir: str = ""              # where a raw data.path is prepared; "" = RUN_DIR/data_cache
    # Classification tasks (task.kind == classify)
    text_column: str = "text"
    label_column: str = "label"


@dataclass(frozen=True)
class TrainConfig:
    run_dir: str = "runs/default"
    steps: int = 1000
    batch_size: int = 8              # global batch B, in rows
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    schedule: str = "cosine"         # cosine | linear | constant
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    z_loss: float = 0.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8
    final_eval: bool = False         # at the end: the whole validation split, next to xz -9e
    profile_start: int = -1          # first step of a profiler trace window; -1 disables
    profile_steps: int = 5
    init_from: str = ""              # Tessera checkpoint or Hugging Face directory to start from
    compiled_step: str = ""          # compile.py --save DIR: load that compiled train step at launch


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 500
    keep: int = 3
    async_save: bool = True


@dataclass(frozen=True)
class ServeConfig:
    int8_weights: bool = False
    dtype: str = "auto"              # weights: auto | bfloat16 | float32 (auto: serving/budget.py)
    kv_dtype: str = "auto"           # auto (the weights' dtype) | bfloat16 | int8 | float32
    page_size: int = 16
    num_pages: int = 0               # KV pages; 0 = as many as the memory budget holds
    memory_utilization: float = 0.9  # fraction of device memory (CPU: of free RAM) for weights + KV
    kv_cache_memory: int = 0         # bytes of KV cache per device; 0 = from memory_utilization
    max_model_len: int = 0           # 0 = the model's context, capped by what the KV pages hold
    max_batch: int = 8               # concurrent sequences in the decode batch
    prefill_buckets: tuple[int, ...] = (64, 256, 1024)  # prefill chunk sizes; the largest is the chunk
    max_queue: int = 64
    host: str = "127.0.0.1"
    port: int = 8000
    chat_template: str = ""          # jinja template; empty uses the tokenizer's or a plain one


@dataclass(frozen=True)
class TaskConfig:
    kind: str = "lm"                 # lm | classify
    num_classes: int = 0             # 0 means infer from the training labels
    pooling: str = "last"            # last | mean
    class_weights: bool = False
    max_len: int = 128
    dropout: float = 0.0             # classifier training: embeddings, attention outputs, pooled vector
    best_by: str = "last"            # last | val_accuracy | val_loss: the params kept as the result
    lm_loss_weight: float = 0.0      # classifier training: + weight * next-token NLL of each text


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    task: TaskConfig = field(default_factory=TaskConfig)


# Allowed values of the enum keys, one tuple each: the loader validates against CHOICES, and code
# that lists them (argparse choices, dispatch checks, the rules tables) imports them from here.
REMATS = ("none", "full", "save_dots", "minimal")
ATTENTION_IMPLS = ("auto", "xla", "pallas", "cudnn")
PARAM_DTYPES = ("float32", "bfloat16")
COMPUTE_DTYPES = ("auto",) + PARAM_DTYPES
RULE_TABLES = ("fsdp", "fsdp_tp", "serve_tp")
SCHEDULES = ("cosine", "linear", "constant")
KV_CACHE_DTYPES = ("auto", "bfloat16", "int8", "float32")
SERVE_DTYPES = ("auto",) + PARAM_DTYPES
TASK_KINDS = ("lm", "classify")
POOLINGS = ("last", "mean")
BEST_BY = ("last", "val_accuracy", "val_loss")
MLP_ACTIVATIONS = ("silu", "gelu_tanh")
ROPE_SCALING_TYPES = ("llama3", "linear")

CHOICES = {
    "model.remat": REMATS,
    "model.mlp_activation": MLP_ACTIVATIONS,
    "model.rope_scaling_type": ROPE_SCALING_TYPES,
    "model.attention_impl": ATTENTION_IMPLS,
    "model.param_dtype": PARAM_DTYPES,
    "model.compute_dtype": COMPUTE_DTYPES,
    "mesh.rules": RULE_TABLES,
    "train.schedule": SCHEDULES,
    "serve.kv_dtype": KV_CACHE_DTYPES,
    "serve.dtype": SERVE_DTYPES,
    "task.kind": TASK_KINDS,
    "task.pooling": POOLINGS,
    "task.best_by": BEST_BY,
}


def to_dict(cfg: Config) -> dict:
    """Plain nested dict of a config (for YAML/JSON output and checkpoints)."""
    return dataclasses.asdict(cfg)
