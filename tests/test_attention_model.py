"""The model with attention_impl=pallas (TPU kernel in TPU interpret mode on CPU) gives the same
loss and gradients as attention_impl=xla: layers under scan + remat, packed segments."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from configs.schema import ModelConfig
from model.transformer import Transformer
from test_kernels_common import assert_close, fresh_key, packed_segments


# Gemma-style: local and global layers (one group of 2, one local layer left) whose static windows
# reach the kernels inside the grouped scan, soft caps, post norms, GeGLU.
GEMMA = dict(n_layers=3, global_every=2, attn_logit_softcap=5.0, final_logit_softcap=8.0, post_norms=True,
             norm_offset=1.0, embed_scale=True, mlp_activation="gelu_tanh", query_pre_attn_scalar=24)


@pytest.mark.parametrize("variant", [{}, GEMMA], ids=["llama", "gemma"])
def test_model_pallas_matches_xla_under_grad(variant):
    cfg = ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      mlp_dim=128, max_seq_len=64, remat="full", scan_layers=True,
                      attn_block_q=16, attn_block_kv=16, sliding_window=20)
    cfg = dataclasses.replace(cfg, **variant)
    B, T = 2, 40
    tokens = jax.random.randint(fresh_key(), (B, T), 0, cfg.vocab_size)
    segments = packed_segments(B, T, 2)
    positions = jnp.broadcast_to(jnp.arange(T), (B, T)).astype(jnp.int32)

    def loss_and_grad(impl):
        model = Transformer(dataclasses.replace(cfg, attention_impl=impl), rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)

        def loss(state):
            logits = nnx.merge(graphdef, state)(tokens, positions, segments)
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]),
                                                 tokens[:, 1:, None], axis=-1))
        return jax.jit(jax.value_and_grad(loss))(state)

    loss_p, grads_p = loss_and_grad("pallas")
    loss_x, grads_x = loss_and_grad("xla")
    assert_close(loss_p, loss_x, 1e-5, "loss")
    for gp, gx in zip(jax.tree.leaves(grads_p), jax.tree.leaves(grads_x)):
        assert_close(gp, gx, 1e-4, "grad")
