"""Sharded execution equals the single-device result; parameters carry their rule's sharding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs import load_config
from model.init import create_sharded_model
from sharding.mesh import make_mesh
from sharding.rules import RULES

BASE = ["model.compute_dtype=float32", "model.attention_impl=xla", "model.n_layers=2", "model.vocab_size=512"]


def logits_and_grads(cfg, mesh):
    graphdef, state = create_sharded_model(cfg, mesh, seed=0)
    params = nnx.to_pure_dict(state)
    x = jax.random.randint(jax.random.key(3), (8, 32), 0, cfg.model.vocab_size)

    def loss(p):
        logits = nnx.merge(graphdef, p)(x)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    with jax.set_mesh(mesh):
        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, grads, state


@pytest.fixture(scope="module")
def reference():
    cfg = load_config("tiny", BASE + ["mesh.fsdp=1"])
    logits, grads, _ = logits_and_grads(cfg, make_mesh(cfg, jax.devices()[:1]))
    return jax.device_get(logits), jax.device_get(grads)


@pytest.mark.parametrize("mesh", [
    ("1x1x1", ["mesh.fsdp=1"], 1),
    ("8x1x1", ["mesh.data=8", "mesh.fsdp=1"], 8),
    ("1x8x1", ["mesh.fsdp=8"], 8),
    ("2x2x2", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "mesh.rules=fsdp_tp"], 8),
], ids=lambda m: m[0])
def test_sharded_matches_single_device(reference, mesh):
    _, overrides, n = mesh
    cfg = load_config("tiny", BASE + overrides)
    m = make_mesh(cfg, jax.devices()[:n])
    logits, grads, state = logits_and_grads(cfg, m)
    ref_logits, ref_grads = reference
    assert np.max(np.abs(np.asarray(logits) - ref_logits)) <= 1e-5
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, atol=1e-5, rtol=0), grads, ref_grads)
    rules = RULES[cfg.mesh.rules]
    for path, var in jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda v: isinstance(v, nnx.Variable))[0]:
        axes = var.get_metadata()["axes"]
        expected = P(*(rules.get(a) for a in axes))
        assert var[...].sharding.spec == expected or var[...].sharding.is_equivalent_to(
            jax.sharding.NamedSharding(m, expected), var.ndim), (path, var[...].sharding.spec, expected)


def test_fsdp_tp_layout_of_a_weight():
    cfg = load_config("tiny", BASE + ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "mesh.rules=fsdp_tp"])
    _, state = create_sharded_model(cfg, make_mesh(cfg))
    wq = state["layers"]["wq"][...]  # [L,D,N,H]
    assert wq.sharding.spec == P(None, "fsdp", "tensor", None)
    shard = wq.addressable_shards[0].data
    assert shard.shape == (2, 128 // 2, 4 // 2, 32)


def test_params_created_sharded_without_full_copy():
    cfg = load_config("tiny", BASE + ["mesh.fsdp=8"])
    _, state = create_sharded_model(cfg, make_mesh(cfg))
    emb = state["embedding"][...]
    assert all(s.data.shape == (512, 128 // 8) for s in emb.addressable_shards)


def test_spec_rejects_an_unknown_logical_name():
    """A typo in a logical axis is an error naming it, not a silently replicated array."""
    from sharding.rules import spec
    assert spec(("batch", None, "cache_kv_heads"), RULES["serve_tp"]) == P(("data", "fsdp"), None, "tensor")
    with pytest.raises(ValueError, match="unknown logical axis 'kv_head'"):
        spec(("layers", "embed", "kv_head", "head_dim"), RULES["fsdp_tp"])


def test_rules_tables_use_known_names_only():
    """Every table maps known logical names to mesh axes of the one AXES, and the config's
    mesh.rules choices are exactly the tables."""
    from configs.schema import RULE_TABLES
    from sharding.mesh import AXES as MESH_AXES
    from sharding.rules import AXES, LOGICAL_AXES, mesh_axes
    assert MESH_AXES is AXES and set(RULES) == set(RULE_TABLES)
    for table in RULES.values():
        assert set(table) <= LOGICAL_AXES, set(table) - LOGICAL_AXES
        assert all(set(mesh_axes(name, table)) <= set(AXES) for name in table)


def test_make_mesh_from_a_mesh_config():
    """Serving and evaluation build their meshes with make_mesh from a MeshConfig alone."""
    from configs import MeshConfig
    from serving.load import serving_mesh
    m = serving_mesh(4)
    assert dict(m.shape) == {"data": 1, "fsdp": 1, "tensor": 4} and list(m.devices.flat) == jax.devices()[:4]
    m = make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1))
    assert dict(m.shape) == {"data": 8, "fsdp": 1, "tensor": 1}


def test_hardware_peaks_by_device_kind():
    """One table answers MFU's peak for every device kind jax reports (v5p reports 'TPU v5')."""
    from sharding.hardware import peak_flops
    kinds = {("tpu", "TPU v4"): 275e12, ("tpu", "TPU v5 lite"): 197e12, ("tpu", "TPU v5e"): 197e12,
             ("tpu", "TPU v5"): 459e12, ("tpu", "TPU v5p"): 459e12, ("tpu", "TPU v6 lite"): 918e12,
             ("gpu", "NVIDIA H100 80GB HBM3"): 989e12, ("gpu", "NVIDIA A100-SXM4-80GB"): 312e12,
             ("cpu", "cpu"): None, ("tpu", "TPU7x"): None}
    assert {k: peak_flops(*k) for k in kinds} == kinds
