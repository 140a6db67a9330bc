"""Tensor names and layouts between HF safetensors and Tessera params, streamed tensor by tensor.

HF stores one [out, in] matrix per layer (`model.layers.{i}.self_attn.q_proj.weight` [N*H, D]);
Tessera stacks layers and splits heads (`layers.wq` [L, D, N, H]). Both use the rotate-half RoPE
layout, so q/k need only a transpose and reshape, no permutation of rows.

Reading memory-maps the safetensors files (a small reader of the documented format: 8-byte
little-endian header length, JSON header, raw row-major data) and builds each device shard of
each parameter straight from the mapped bytes with `jax.make_array_from_callback`: no full host
copy of the model is ever made. Writing computes the header from shapes first, then streams one
tensor at a time into shards of at most `max_shard_bytes`.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from tqdm import tqdm

from configs import ModelConfig
from interop.hf_config import HFError, read_json

DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
          "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
          "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
          "BOOL": np.dtype(np.bool_)}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class Spec:
    """One Tessera parameter and the HF tensor(s) it comes from."""
    path: tuple[str, ...]   # pure-dict path in the params, e.g. ("layers", "wq")
    hf: str                 # HF tensor name; "{i}" is the layer index of stacked params
    transpose: bool = False  # HF Linear weights are [out, in]; Tessera's are [in..., out...]
    n_in: int = 1           # leading Tessera axes that form HF's `in` (2 for wo [N,H,D])
    flat: bool = True       # HF keeps non-transposed tensors 1-D (biases [N*H], norms [D])

    @property
    def stacked(self) -> bool:
        return self.path[0] == "layers"

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """HF shape of one (per-layer) Tessera array of `shape`."""
        if self.transpose:
            return (math.prod(shape[self.n_in:]), math.prod(shape[:self.n_in]))
        return (math.prod(shape),) if self.flat else tuple(shape)

    def to_tessera(self, a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """HF array -> Tessera layout (a view when numpy can make one, so slicing reads little)."""
        return (a.T if self.transpose else a).reshape(shape)

    def to_hf(self, t: np.ndarray) -> np.ndarray:
        """Tessera array (one layer) -> HF layout, contiguous."""
        if self.transpose:
            return np.ascontiguousarray(t.reshape(math.prod(t.shape[:self.n_in]), -1).T)
        return np.ascontiguousarray(t.reshape(self.hf_shape(t.shape)))


def param_specs(m: ModelConfig) -> list[Spec]:
    """Every Tessera parameter of `m` with its HF source, in HF file order."""
    p = "model.layers.{i}."
    specs = [Spec(("embedding",), "model.embed_tokens.weight", flat=False),
             Spec(("layers", "attn_norm"), p + "input_layernorm.weight"),
             Spec(("layers", "wq"), p + "self_attn.q_proj.weight", True),
             Spec(("layers", "wk"), p + "self_attn.k_proj.weight", True),
             Spec(("layers", "wv"), p + "self_attn.v_proj.weight", True),
             Spec(("layers", "wo"), p + "self_attn.o_proj.weight", True, n_in=2)]
    if m.qkv_bias:  # Qwen2
        specs += [Spec(("layers", f"b{x}"), p + f"self_attn.{x}_proj.bias") for x in "qkv"]
    if m.qk_norm:  # Qwen3: one [H] scale per layer, shared by every head
        specs += [Spec(("layers", f"{x}_norm"), p + f"self_attn.{x}_norm.weight") for x in "qk"]
    if m.post_norms:  # Gemma 2/3: the norm before the MLP is pre_feedforward_layernorm
        specs += [Spec(("layers", "post_attn_norm"), p + "post_attention_layernorm.weight"),
                  Spec(("layers", "mlp_norm"), p + "pre_feedforward_layernorm.weight"),
                  Spec(("layers", "post_mlp_norm"), p + "post_feedforward_layernorm.weight")]
    else:
        specs.append(Spec(("layers", "mlp_norm"), p + "post_attention_layernorm.weight"))
    specs += [Spec(("layers", "w_gate"), p + "mlp.gate_proj.weight", True),
              Spec(("layers", "w_up"), p + "mlp.up_proj.weight", True),
              Spec(("layers", "w_down"), p + "mlp.down_proj.weight", True),
              Spec(("final_norm",), "model.norm.weight")]
    if not m.tie_embeddings:
        specs.append(Spec(("lm_head",), "lm_head.weight", True))
    return specs


def get_path(tree: dict, path: tuple[str, ...]):
    for k in path:
        tree = tree[k]
    return tree


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def hf_tensors(specs: list[Spec], shapes: dict, n_layers: int) -> list[tuple[str, Spec, int, tuple]]:
    """(HF name, spec, layer index or -1, HF shape) for every HF tensor, in file order."""
    out = []
    for s in specs:
        shape = get_path(shapes, s.path)
        if s.stacked:
            out += [(s.hf.format(i=i), s, i, s.hf_shape(shape[1:])) for i in range(n_layers)]
        else:
            out.append((s.hf, s, -1, s.hf_shape(shape)))
    # HF file order: embedding, then layer by layer, then the final norm and lm_head.
    rank = lambda t: (0, 0) if t[1].path == ("embedding",) else (1, t[2]) if t[2] >= 0 else (2, 0)
    return sorted(out, key=rank)


def _read_header(path: Path) -> tuple[dict, int]:
    """(header dict, offset of the data area) of a safetensors file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if n < 0 or 8 + n > size:
            raise HFError(f"{path.name} is not a safetensors file (truncated header)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise HFError(f"{path.name} has a corrupt safetensors header") from None
    header.pop("__metadata__", None)
    for name, info in header.items():
        if info.get("dtype") not in DTYPES:
            raise HFError(f"tensor '{name}' in {path.name} has unsupported dtype {info.get('dtype')!r}")
        if 8 + n + info["data_offsets"][1] > size:
            raise HFError(f"tensor '{name}' in {path.name} is truncated (file too short)")
    return header, 8 + n


class SafetensorsDir:
    """Memory-mapped tensors of an HF directory: model.safetensors, or shards with an index."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        index = self.dir / INDEX_FILE
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise HFError(f"{INDEX_FILE} has no 'weight_map'")
            for name, file in weight_map.items():
                if not (self.dir / file).is_file():
                    raise HFError(f"missing shard '{file}' (holds tensor '{name}', listed in {INDEX_FILE})")
            files = sorted(set(weight_map.values()))
        elif (self.dir / "model.safetensors").is_file():
            # Mistral repos also ship consolidated.safetensors (Mistral's own layout): ignore it.
            files, weight_map = ["model.safetensors"], None
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
            if not files:
                raise HFError(f"no *.safetensors weights in {self.dir}")
            weight_map = None
        self.info: dict[str, tuple[str, dict, int]] = {}  # name -> (file, header entry, data offset)
        for file in files:
            header, start = _read_header(self.dir / file)
            for name, entry in header.items():
                self.info[name] = (file, entry, start)
        for name, file in (weight_map or {}).items():
            if name not in self.info or self.info[name][0] != file:
                raise HFError(f"tensor '{name}' is listed in {INDEX_FILE} but missing from shard '{file}'")
        self._maps: dict[str, np.memmap] = {}

    def names(self) -> list[str]:
        return list(self.info)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.info[name][1]["shape"])

    def dtype_name(self, name: str) -> str:
        return self.info[name][1]["dtype"]

    def array(self, name: str) -> np.ndarray:
        """A read-only view of the tensor's bytes in the mapped file (nothing read until used)."""
        file, entry, start = self.info[name]
        if file not in self._maps:
            self._maps[file] = np.memmap(self.dir / file, dtype=np.uint8, mode="r")
        begin, end = entry["data_offsets"]
        return self._maps[file][start + begin:start + end].view(DTYPES[entry["dtype"]]).reshape(entry["shape"])


def check_tensors(src: SafetensorsDir, plan: list, tied: bool) -> None:
    """Every expected tensor present with the expected shape, and no tensor left unexplained."""
    for name, _, _, shape in plan:
        if name not in src.info:
            raise HFError(f"tensor '{name}' is missing from the safetensors files in {src.dir}")
        if src.shape(name) != tuple(shape):
            raise HFError(f"tensor '{name}' has shape {list(src.shape(name))} but config.json implies {list(shape)}")
        if src.dtype_name(name) not in FLOAT_DTYPES:
            raise HFError(f"tensor '{name}' has non-float dtype {src.dtype_name(name)}")
    expected = {name for name, *_ in plan}
    # Rotary inverse frequencies are a recomputed buffer; a tied model's lm_head is the embedding.
    extra = sorted(n for n in src.names() if n not in expected and not n.endswith("rotary_emb.inv_freq")
                   and not (tied and n == "lm_head.weight"))
    if extra:
        raise HFError(f"unexpected tensor '{extra[0]}' ({len(extra)} in all) for this config.json")


def load_params_from_hf(hf_dir: str | Path, m: ModelConfig, abstract: dict, progress: bool = True) -> dict:
    """Pure dict of jax arrays, laid out like `abstract` (ShapeDtypeStructs with shardings), each
    device shard built directly from the memory-mapped HF tensors."""
    src = SafetensorsDir(hf_dir)
    plan = hf_tensors(param_specs(m), jax.tree.map(lambda x: x.shape, abstract), m.n_layers)
    check_tensors(src, plan, m.tie_embeddings)
    out: dict = {}
    with tqdm(total=len(plan), desc="import weights", unit="tensor", disable=not progress) as bar:
        for spec in param_specs(m):
            target = get_path(abstract, spec.path)
            dtype = np.dtype(target.dtype)
            layer_shape = target.shape[1:] if spec.stacked else target.shape

            def view(i, spec=spec, layer_shape=layer_shape):
                return spec.to_tessera(src.array(spec.hf.format(i=i)), layer_shape)

            def shard(index, spec=spec, dtype=dtype, view=view):
                if not spec.stacked:  # np.array copies: jax must not alias the memory map
                    return np.array(view(0)[index], dtype=dtype)
                layers = range(*index[0].indices(m.n_layers))
                return np.stack([np.asarray(view(i)[index[1:]], dtype=dtype) for i in layers])

            arr = jax.make_array_from_callback(target.shape, target.sharding, shard)
            set_path(out, spec.path, arr)
            bar.update(m.n_layers if spec.stacked else 1)
    return out


def write_safetensors(out_dir: Path, tensors: list[tuple[str, tuple, str]], produce,
                      max_shard_bytes: int = 5 << 30, progress: bool = True) -> list[str]:
    """Write [(name, shape, dtype name)] as model.safetensors, or as numbered shards plus
    model.safetensors.index.json when larger than `max_shard_bytes`. `produce(name)` returns each
    tensor's array when its turn comes, so only one tensor is in host memory at a time."""
    sizes = [math.prod(shape) * DTYPES[dt].itemsize for _, shape, dt in tensors]
    shards: list[list[int]] = [[]]
    total = 0
    for i, size in enumerate(sizes):
        if shards[-1] and total + size > max_shard_bytes:
            shards.append([])
            total = 0
        shards[-1].append(i)
        total += size
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    weight_map = {}
    with tqdm(total=len(tensors), desc="export weights", unit="tensor", disable=not progress) as bar:
        for file, members in zip(files, shards):
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for i in members:
                name, shape, dt = tensors[i]
                header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [offset, offset + sizes[i]]}
                offset += sizes[i]
                weight_map[name] = file
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # the format pads the header to 8-byte alignment
            with open(out_dir / file, "wb") as f:
                f.write(struct.pack("<Q", len(raw)) + raw)
                for i in members:
                    name, shape, dt = tensors[i]
                    a = np.ascontiguousarray(produce(name), dtype=DTYPES[dt])
                    if a.shape != tuple(shape):
                        raise HFError(f"tensor '{name}' has shape {list(a.shape)}, expected {list(shape)}")
                    f.write(a.tobytes())
                    bar.update(1)
    if n > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return files


def export_params(out_dir: Path, m: ModelConfig, params: dict, dtype: str, max_shard_bytes: int,
                  progress: bool = True) -> list[str]:
    """Stream Tessera params (pure dict of jax arrays) into HF safetensors in `out_dir`."""
    plan = hf_tensors(param_specs(m), jax.tree.map(lambda x: x.shape, params), m.n_layers)
    by_name = {name: (spec, i) for name, spec, i, _ in plan}
    dt = DTYPE_NAMES[np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)]

    def produce(name):
        spec, i = by_name[name]
        arr = get_path(params, spec.path)
        # Index on device first so only this layer crosses to the host.
        return spec.to_hf(np.asarray(jax.device_get(arr[i] if i >= 0 else arr)))

    tensors = [(name, shape, dt) for name, _, _, shape in plan]
    return write_safetensors(out_dir, tensors, produce, max_shard_bytes, progress)
