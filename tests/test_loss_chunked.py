"""The loss's chunked logits (model/loss.py): same NLL, log-partition and gradients as whole rows."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import load_config
from model.loss import CHUNK_ABOVE_BYTES, chunk_size, token_nll
from model.transformer import Transformer

SMALL = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
         "model.mlp_dim=64", "model.vocab_size=101", "model.compute_dtype=float32", "model.attention_impl=xla"]


@pytest.mark.parametrize("variant", [[], ["model.tie_embeddings=false", "model.final_logit_softcap=5.0"]])
@pytest.mark.parametrize("chunk", [8, 16])  # 40 positions: 5 whole chunks; 3 chunks, the last padded
@pytest.mark.parametrize("scan", [True, False])
def test_chunked_loss_matches_whole_rows(variant, chunk, scan):
    cfg = load_config("tiny", SMALL + variant).model
    params = Transformer(cfg, rngs=nnx.Rngs(0)).params()
    keys = jax.random.split(jax.random.key(1), 2)
    h = jax.random.normal(keys[0], (3, 40, cfg.d_model))
    targets = jax.random.randint(keys[1], (3, 40), 0, cfg.vocab_size)
    weights = jnp.linspace(0.5, 1.5, 40)

    def objective(p, h, chunk):
        nll, log_z = token_nll(p, h, targets, cfg, "fsdp", chunk, scan)
        return jnp.sum(nll * weights) + 1e-2 * jnp.sum(log_z ** 2), (nll, log_z)

    grad = jax.jit(jax.grad(objective, argnums=(0, 1), has_aux=True), static_argnums=2)
    (g_whole, (nll_whole, z_whole)), (g_chunk, (nll_chunk, z_chunk)) = grad(params, h, 0), grad(params, h, chunk)
    np.testing.assert_allclose(nll_chunk, nll_whole, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(z_chunk, z_whole, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g_chunk), jax.tree.leaves(g_whole)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_chunked_loss_scans_over_chunks():
    """The whole [B,T,V] logits never exist: the jaxpr has a scan whose body makes [B,chunk,V]."""
    cfg = load_config("tiny", SMALL).model
    params = Transformer(cfg, rngs=nnx.Rngs(0)).params()
    h, targets = jnp.zeros((2, 64, cfg.d_model)), jnp.zeros((2, 64), jnp.int32)
    text = str(jax.make_jaxpr(lambda h: token_nll(params, h, targets, cfg, "fsdp", 16))(h))
    assert "scan" in text and f"f32[2,16,{cfg.vocab_size}]" in text and f"f32[2,64,{cfg.vocab_size}]" not in text


def test_chunk_size_auto_only_past_a_gibibyte_per_row():
    """0 (auto): whole rows while a row's fp32 logits fit in 1 GiB, else power-of-two chunks under it;
    a positive value is taken as is and -1 keeps rows whole."""
    llama2 = load_config("llama2-7b").model                    # V 32000: 4096 positions are 0.5 GB
    llama3 = load_config("llama3-8b").model                    # V 128256: 8192 positions are 4.2 GB
    assert chunk_size(llama2, 4096) == 0
    assert chunk_size(llama3, 2048) == 0 and chunk_size(llama3, 8192) == 2048
    assert chunk_size(llama3, 8192) * 4 * llama3.vocab_size <= CHUNK_ABOVE_BYTES
    assert chunk_size(load_config("llama3-8b", ["model.logits_chunk=512"]).model, 8192) == 512
    assert chunk_size(load_config("llama3-8b", ["model.logits_chunk=-1"]).model, 8192) == 0


def test_logits_chunk_is_checked():
    from configs import ConfigError
    with pytest.raises(ConfigError, match="model.logits_chunk"):
        load_config("tiny", ["model.logits_chunk=-2"])
