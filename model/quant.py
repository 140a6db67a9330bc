"""Int8 weights as data: a quantized-array pytree (int8 values + per-output-channel scales).

`QArray` stores a weight `w ~= values * scale` with symmetric per-output-channel scales:
`scale` has the shape of `values` with every contracted (input) axis reduced to size 1, so
slicing a stacked [L, ...] QArray under `lax.scan` slices both leaves consistently.

`QArray.matmul(eq, x)` is the one int8 matmul (called by `model.layers.linear`). Two modes:
  * act_quant=True (default): activations are quantized per token (symmetric, over the
    contracted axes) and the dot runs int8 x int8 -> int32 (`preferred_element_type=int32`,
    the fast path on GPU/TPU), then rescaled by the token and channel scales.
  * act_quant=False: the int8 weight is converted to the activation dtype inside the matmul.
Measured on these 2-core CPUs (x[B,1024] @ w[1024,4096], XLA): fp32 0.47 ms / 2.6 ms at
B=1 / 16, int8-dequant 2.2 / 4.4 ms, int8 x int8 -> int32 1.2 / 0.96 ms; so W8A8 is the default.
XLA CPU runs that dot fast only for two rows or more (one row: a generic int32 loop, ~4x slower
for 768 x 3072 on an AVX-512 Xeon), so `matmul` pads a single row (a batch-1 decode step) to two.
A tied int8 output head goes through `matmul_rows`, the one formulation XLA CPU's int8 dot runs
fast (the [V,D] table's minor axis contracted, at least two rows): for [768, 50304] it is on par
with fp32 for one token and faster for 16, where the [D,V] einsum took ~100 ms and ~290 ms.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
    """values int8 [...], scale float32 [...] (contracted axes kept with size 1)."""

    values: jax.Array
    scale: jax.Array
    act_quant: bool = dataclasses.field(default=True, metadata=dict(static=True))

    @property
    def shape(self):
        return self.values.shape

    @property
    def ndim(self):
        return self.values.ndim

    @property
    def dtype(self):
        return self.values.dtype

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes) + int(self.scale.nbytes)

    @property
    def T(self) -> "QArray":
        """Transpose (2-D): a tied [V,D] embedding used as the [D,V] output head."""
        return QArray(self.values.T, self.scale.T, self.act_quant)

    def __getitem__(self, idx):
        # `param[...]` reads the whole array; a QArray is already that.
        if idx is Ellipsis:
            return self
        raise TypeError("index a QArray's rows with model.quant.take_rows")

    def matmul(self, eq: str, x: jax.Array) -> jax.Array:
        """einsum(eq, x, w) with this int8 weight; result in x.dtype."""
        ins, out = eq.replace(" ", "").split("->")
        xl, wl = ins.split(",")
        w_keep = [c for c in wl if c in out]  # the output-channel letters of the weight
        w_scale = self.scale.reshape([self.values.shape[wl.index(c)] for c in w_keep])
        if not self.act_quant:
            y = jnp.einsum(eq, x, self.values.astype(x.dtype), preferred_element_type=jnp.float32)
            return (y * _expand(w_scale, w_keep, out)).astype(x.dtype)
        x_red = tuple(i for i, c in enumerate(xl) if c not in out)  # x's contracted axes
        rows = [i for i, c in enumerate(xl) if c in out]
        if rows and all(x.shape[i] == 1 for i in rows):  # one row: XLA CPU's slow int8 dot
            y = self.matmul(eq, _two_rows(x, rows[0]))
            return jax.lax.slice_in_dim(y, 0, 1, axis=out.index(xl[rows[0]]))
        x32 = x.astype(jnp.float32)
        x_scale = jnp.maximum(jnp.max(jnp.abs(x32), axis=x_red, keepdims=True), 1e-8) / 127.0
        xq = jnp.clip(jnp.round(x32 / x_scale), -127, 127).astype(jnp.int8)
        y = jnp.einsum(eq, xq, self.values, preferred_element_type=jnp.int32).astype(jnp.float32)
        x_keep = [c for c in xl if c in out]
        x_scale = x_scale.reshape([x.shape[xl.index(c)] for c in x_keep])
        return (y * _expand(x_scale, x_keep, out) * _expand(w_scale, w_keep, out)).astype(x.dtype)


    def matmul_rows(self, x: jax.Array) -> jax.Array:
        """x [..., D] against the rows of this row-quantized [V,D] table (a tied output head) ->
        [..., V] in x.dtype: the same as matmul("...D,DV->...V", x) with the transposed table.

        Written for XLA CPU's int8 dot, which is fast only in one shape: the table's own minor
        axis contracted (a [D,V] view makes it copy the 50k x 768 table on every call), with at
        least two rows (a single row takes a path ~8x slower; measured in docs/results.md), so
        one row is padded to two. Both choices cost nothing on TPU/GPU."""
        lead, D = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, D).astype(jnp.float32)
        M = x2.shape[0]
        if M == 1:
            x2 = _two_rows(x2, 0)
        dims = (((1,), (1,)), ((), ()))
        if self.act_quant:
            x_scale = jnp.maximum(jnp.max(jnp.abs(x2), axis=1, keepdims=True), 1e-8) / 127.0
            xq = jnp.clip(jnp.round(x2 / x_scale), -127, 127).astype(jnp.int8)
            y = jax.lax.dot_general(xq, self.values, dims, preferred_element_type=jnp.int32)
            y = y.astype(jnp.float32) * x_scale
        else:
            y = jax.lax.dot_general(x2.astype(x.dtype), self.values.astype(x.dtype), dims,
                                    preferred_element_type=jnp.float32)
        y = y * self.scale[:, 0][None, :]                                     # [M,V]
        return y[:M].reshape(*lead, self.values.shape[0]).astype(x.dtype)


def _two_rows(x: jax.Array, axis: int) -> jax.Array:
    """x with a row of zeros appended along `axis` (size 1): XLA CPU's int8 dot is fast only for
    two rows or more, and the padding costs nothing on TPU/GPU."""
    return jnp.concatenate([x, jnp.zeros_like(x)], axis=axis)


def _expand(a: jax.Array, letters: list[str], out: str) -> jax.Array:
    """Broadcast `a` (axes named by `letters`, a subset of `out`) against an `out`-shaped array."""
    order = sorted(range(len(letters)), key=lambda i: out.index(letters[i]))
    a = jnp.transpose(a, order)
    present = {letters[i] for i in order}
    shape, it = [], iter(a.shape)
    for c in out:
        shape.append(next(it) if c in present else 1)
    return a.reshape(shape)


def quantize(w: jax.Array, contract_axes: tuple[int, ...], act_quant: bool = True) -> QArray:
    """Symmetric per-output-channel int8: scale = max|w| over the contracted axes / 127."""
    w32 = w.astype(jnp.float32)
    scale = jnp.maximum(jnp.max(jnp.abs(w32), axis=contract_axes, keepdims=True), 1e-12) / 127.0
    values = jnp.clip(jnp.round(w32 / scale), -127, 127).astype(jnp.int8)
    return QArray(values, scale, act_quant)


# Contracted (input) axes of each quantizable weight in the pure-dict params layout.
# Stacked layer weights carry a leading L axis, which is never contracted.
CONTRACT_AXES = {
    "wq": (1,), "wk": (1,), "wv": (1,), "wo": (1, 2),
    "w_gate": (1,), "w_up": (1,), "w_down": (1,),
    "lm_head": (0,),       # [D,V]
    "embedding": (1,),     # [V,D]: per-row scales serve both the lookup and a tied [D,V] head
}


VOCAB_WEIGHTS = ("embedding", "lm_head")  # kept in float when quantize_params(embedding=False)


def quantize_params(params: dict, embedding: bool = True, act_quant: bool = True) -> dict:
    """Pure-dict Transformer params -> same tree with every linear weight a QArray.

    embedding=False keeps the vocabulary-sized weights (embedding, output head) in float.

    Norms and biases stay in floating point. Run under jit: values keep the input sharding and
    scales keep it on their output axes, so a tensor-parallel model quantizes in place.
    """
    def visit(tree):
        out = {}
        for name, leaf in tree.items():
            if isinstance(leaf, dict):
                out[name] = visit(leaf)
            elif name in CONTRACT_AXES and (embedding or name not in VOCAB_WEIGHTS):
                out[name] = quantize(leaf, CONTRACT_AXES[name], act_quant)
            else:
                out[name] = leaf
        return out
    return visit(params)


def take_rows(table, ids: jax.Array, dtype) -> jax.Array:
    """Embedding lookup table[ids] for a float [V,D] table or a row-quantized QArray."""
    if isinstance(table, QArray):
        return (jnp.take(table.values, ids, axis=0).astype(jnp.float32)
                * jnp.take(table.scale, ids, axis=0)).astype(dtype)
    return jnp.take(table, ids, axis=0).astype(dtype)


def tree_nbytes(tree) -> int:
    """Bytes of every array in a params tree (QArray values + scales included)."""
    return sum(int(x.nbytes) for x in jax.tree.leaves(tree))


def to_storable(tree):
    """QArrays -> {'int8': values, 'scale': scale} dicts (the on-disk int8 checkpoint layout)."""
    if isinstance(tree, QArray):
        return {"int8": tree.values, "scale": tree.scale}
    if isinstance(tree, dict):
        return {k: to_storable(v) for k, v in tree.items()}
    return tree


def from_storable(tree, act_quant: bool = True):
    """Inverse of `to_storable`."""
    if isinstance(tree, dict):
        if set(tree) == {"int8", "scale"}:
            return QArray(tree["int8"], tree["scale"], act_quant)
        return {k: from_storable(v, act_quant) for k, v in tree.items()}
    return tree
