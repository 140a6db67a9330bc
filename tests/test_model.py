"""Model semantics: causality, packing isolation, GQA, sliding window, variants."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import load_config
from model.kernels.reference import attention_reference
from model.transformer import Transformer

SMALL = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
         "model.mlp_dim=128", "model.vocab_size=97", "model.compute_dtype=float32", "model.attention_impl=xla"]


def make(*overrides, seed=0):
    cfg = load_config("tiny", SMALL + list(overrides))
    return Transformer(cfg.model, rngs=nnx.Rngs(seed))


def tokens(shape, seed=1, vocab=97):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


@pytest.mark.parametrize("variant", [[], ["model.qkv_bias=true", "model.qk_norm=true"],
                                     ["model.tie_embeddings=false", "model.scan_layers=false"],
                                     ["model.sliding_window=4"], ["model.rope_scaling_factor=8.0"]])
def test_causal(variant):
    model = make(*variant)
    x = tokens((2, 16))
    y = x.at[:, 10].set((x[:, 10] + 1) % 97)
    a, b = model(x), model(y)
    np.testing.assert_array_equal(a[:, :10], b[:, :10])
    assert not np.allclose(a[:, 10:], b[:, 10:])


def test_packed_segments_do_not_attend_to_each_other():
    model = make()
    x = tokens((1, 24))
    seg = jnp.array([[1] * 10 + [2] * 14])
    pos = jnp.array([list(range(10)) + list(range(14))])
    packed = model(x, pos, seg)
    alone_a = model(x[:, :10])
    alone_b = model(x[:, 10:])
    np.testing.assert_allclose(packed[:, :10], alone_a, atol=1e-5)
    np.testing.assert_allclose(packed[:, 10:], alone_b, atol=1e-5)
    # changing the first document leaves the second untouched
    y = x.at[:, 3].set((x[:, 3] + 5) % 97)
    np.testing.assert_allclose(model(y, pos, seg)[:, 10:], packed[:, 10:], atol=1e-6)


def test_gqa_equals_mha_with_repeated_kv_heads():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    B, T, N, K, H = 2, 12, 8, 2, 16
    q = jax.random.normal(k1, (B, T, N, H))
    k = jax.random.normal(k2, (B, T, K, H))
    v = jax.random.normal(k3, (B, T, K, H))
    gqa = attention_reference(q, k, v)
    mha = attention_reference(q, jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2))
    np.testing.assert_allclose(gqa, mha, atol=1e-6)
    # the model-level check: a GQA model equals an MHA model whose k/v weights repeat its heads
    gqa_model = make()
    mha_model = make("model.n_kv_heads=4")
    for name in ("wk", "wv"):
        w = getattr(gqa_model.layers, name)[...]
        getattr(mha_model.layers, name)[...] = jnp.repeat(w, 2, axis=2)
    for name in ("wq", "wo", "w_gate", "w_up", "w_down", "attn_norm", "mlp_norm"):
        getattr(mha_model.layers, name)[...] = getattr(gqa_model.layers, name)[...]
    mha_model.embedding[...] = gqa_model.embedding[...]
    x = tokens((2, 12))
    np.testing.assert_allclose(gqa_model(x), mha_model(x), atol=1e-5)


def test_sliding_window_masks_distant_keys():
    W = 4
    model = make(f"model.sliding_window={W}")
    x = tokens((1, 20))
    base = model(x)
    # a token more than W-1 positions back, in every layer's receptive field... with 2 layers the
    # receptive field is 2*(W-1): changing token 0 must not affect position 2*(W-1)+1 onwards
    y = x.at[:, 0].set((x[:, 0] + 1) % 97)
    changed = model(y)
    reach = 2 * (W - 1)
    np.testing.assert_array_equal(base[:, reach + 1:], changed[:, reach + 1:])
    assert not np.allclose(base[:, reach], changed[:, reach])
    # attention-level: the reference masks exactly pos_q - pos_k >= W
    q = jax.random.normal(jax.random.key(1), (1, 8, 2, 8))
    k = jax.random.normal(jax.random.key(2), (1, 8, 2, 8))
    v = jnp.broadcast_to(jnp.arange(8, dtype=jnp.float32)[None, :, None, None], (1, 8, 2, 8))
    out = np.asarray(attention_reference(q, k, v, sliding_window=W))[0, :, :, 0].T  # [N,T]
    # v encodes the key index, so every output is the softmax-weighted mean of the visible key
    # indices s, t-W < s <= t: computed here in float64 with exactly that window.
    t, s = np.arange(8)[:, None], np.arange(8)[None, :]
    scores = np.einsum("tnh,snh->nts", np.asarray(q, np.float64)[0], np.asarray(k, np.float64)[0]) / np.sqrt(8)
    w = np.where((s <= t) & (t - s < W), np.exp(scores - scores.max(-1, keepdims=True)), 0.0)
    want = (w / w.sum(-1, keepdims=True)) @ np.arange(8.0)                           # [N,T]
    # fp32 error: each weight's relative error is at most ~(H + W + 4) eps32 (1 + |score|) =
    # 16 x 5 x 2^-24 (|scores| < 4 here) on a mean of indices <= 7: 7 x 80 x 2^-24 = 3.3e-5.
    # A window one key too wide or too narrow moves these means by 0.49 or more.
    np.testing.assert_allclose(out, want, rtol=0, atol=7 * 80 * 2.0 ** -24)
    assert np.all(out >= np.maximum(np.arange(8) - W + 1, 0) - 7 * 80 * 2.0 ** -24)  # never below t-W+1


def test_remat_policies_same_gradients():
    x = tokens((2, 8))
    from configs.schema import REMATS
    from model.transformer import REMAT_POLICIES
    assert set(REMAT_POLICIES) == set(REMATS) - {"none"}  # every remat config value has a policy
    grads = []
    for remat in REMATS:
        model = make(f"model.remat={remat}")
        g, p = nnx.split(model)
        loss = lambda p: jnp.mean(nnx.merge(g, p)(x) ** 2)
        grads.append(jax.grad(loss)(nnx.to_pure_dict(p)))
    for other in grads[1:]:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads[0], other)


def test_bf16_compute_close_to_fp32():
    x = tokens((2, 8))
    model = make()
    f32 = model(x)
    bf16 = make("model.compute_dtype=bfloat16")(x)
    assert bf16.dtype == jnp.float32  # logits always fp32
    # Each logit is z_v = sum_i h_i e_vi (h: final normed hidden state, e: tied embedding row).
    # With bf16 compute, e and h are rounded to bf16 and so is z (the head's einsum is bf16):
    # with u = 2^-8 (bf16's relative precision) and S_v = sum_i |h_i| |e_vi| >= |z_v|, each of the
    # three roundings moves z_v by at most u S_v: 3 u S_v. The error h brings from the two
    # layers below (a relative error of order u in a renormalised h, mostly cancelling) adds
    # through the same sum: budget 1 u S_v more. Here S_v is 0.5-1.3 (logits up to ~1.2), so
    # the bound is 0.008-0.02; the error measured is <= 1.15 u S_v (~0.004) over several seeds.
    u = 2.0 ** -8
    S = np.abs(np.asarray(model.backbone(x))) @ np.abs(np.asarray(model.embedding[...])).T  # [B,T,V]
    err = np.abs(np.asarray(bf16) - np.asarray(f32))
    assert np.all(err <= 4 * u * S), float((err / (u * S)).max())


GEMMA = ["model.n_layers=5", "model.global_every=2", "model.sliding_window=3", "model.rope_local_theta=100.0",
         "model.rope_theta=5000.0", "model.rope_scaling_factor=4.0", "model.rope_scaling_type=linear",
         "model.mlp_activation=gelu_tanh", "model.norm_offset=1.0", "model.embed_scale=true",
         "model.post_norms=true", "model.qk_norm=true", "model.final_logit_softcap=3.0",
         "model.attn_logit_softcap=5.0", "model.query_pre_attn_scalar=24.0", "model.tie_embeddings=true"]


def unrolled_reference(params: dict, cfg, x):
    """Plain jnp, layer by layer, from the definitions: what the grouped scan must compute."""
    m = cfg.model
    D, H, L = m.d_model, m.resolved_head_dim, m.n_layers

    def norm(y, w):
        return y * jax.lax.rsqrt(jnp.mean(y * y, -1, keepdims=True) + m.norm_eps) * (m.norm_offset + w)

    def rope(y, theta, factor):
        inv = 1.0 / theta ** (jnp.arange(0, H, 2, dtype=jnp.float32) / H) / factor
        ang = jnp.arange(y.shape[1], dtype=jnp.float32)[None, :, None, None] * inv     # [1,T,1,H/2]
        y1, y2 = jnp.split(y, 2, axis=-1)
        return jnp.concatenate([y1 * jnp.cos(ang) - y2 * jnp.sin(ang), y2 * jnp.cos(ang) + y1 * jnp.sin(ang)], -1)

    h = params["embedding"][x] * jnp.sqrt(jnp.float32(D))
    for i in range(L):
        p = jax.tree.map(lambda w: w[i], params["layers"])
        is_global = (i + 1) % m.global_every == 0
        theta, factor = (m.rope_theta, m.rope_scaling_factor) if is_global else (m.rope_local_theta, 1.0)
        a = norm(h, p["attn_norm"])
        q = rope(norm(jnp.einsum("btd,dnh->btnh", a, p["wq"]), p["q_norm"]), theta, factor)
        k = rope(norm(jnp.einsum("btd,dkh->btkh", a, p["wk"]), p["k_norm"]), theta, factor)
        v = jnp.einsum("btd,dkh->btkh", a, p["wv"])
        att = attention_reference(q, k, v, sliding_window=0 if is_global else m.sliding_window,
                                  logit_softcap=m.attn_logit_softcap, scale=m.query_pre_attn_scalar ** -0.5)
        h = h + norm(jnp.einsum("btnh,nhd->btd", att, p["wo"]), p["post_attn_norm"])
        a = norm(h, p["mlp_norm"])
        f = jax.nn.gelu(a @ p["w_gate"], approximate=True) * (a @ p["w_up"])
        h = h + norm(f @ p["w_down"], p["post_mlp_norm"])
    out = norm(h, params["final_norm"]) @ params["embedding"].T
    return m.final_logit_softcap * jnp.tanh(out / m.final_logit_softcap)


@pytest.mark.parametrize("variant", [[], ["model.scan_layers=false"], ["model.remat=full"],
                                     ["model.n_layers=4", "model.global_every=3"], ["model.global_every=1"]])
def test_grouped_local_global_layers_equal_unrolled_reference(variant):
    cfg = load_config("tiny", SMALL + GEMMA + list(variant))
    model = Transformer(cfg.model, rngs=nnx.Rngs(0))
    assert float(jnp.abs(model.layers.attn_norm[...]).max()) == 0.0  # (1 + w) starts at 1
    params = nnx.to_pure_dict(nnx.state(model))
    params = jax.tree.map(lambda w: w + 0.1 * jax.random.normal(jax.random.key(w.size), w.shape), params)
    nnx.update(model, params)
    x = tokens((2, 12))
    want = unrolled_reference(params, cfg, x)
    np.testing.assert_allclose(model(x), want, atol=1e-5, rtol=1e-5)
    # windows matter: local layers see 3 keys, so token 0 cannot reach the last position of a
    # model of only local layers, but reaches it through a global layer
    y = x.at[:, 0].set((x[:, 0] + 1) % 97)
    assert not np.allclose(model(y)[:, -1], model(x)[:, -1])


def test_grouped_layers_gradients_with_remat():
    x = tokens((2, 8))
    grads = []
    for remat in ("none", "full"):
        model = make(*GEMMA, f"model.remat={remat}")
        g, p = nnx.split(model)
        grads.append(jax.grad(lambda p: jnp.mean(nnx.merge(g, p)(x) ** 2))(nnx.to_pure_dict(p)))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), *grads)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_stacked_gate_up_and_cpu_glu_backward_match_the_plain_mlp(activation, monkeypatch):
    """At training sizes the MLP runs gate and up as one stacked matmul, and on CPU a GLU with a
    custom backward: outputs and weight gradients equal the two-matmul, autodiff form."""
    import model.transformer as tr
    from model.layers import _glu
    cfg = load_config("tiny", SMALL + [f"model.mlp_activation={activation}"]).model
    k = jax.random.split(jax.random.key(3), 4)
    p = {"w_gate": jax.random.normal(k[0], (64, 128)) * 0.1, "w_up": jax.random.normal(k[1], (64, 128)) * 0.1,
         "w_down": jax.random.normal(k[2], (128, 64)) * 0.1}
    x = jax.random.normal(k[3], (8, tr.FUSED_GATE_UP_MIN_ROWS // 8, 64))

    def plain(p, x):
        gate, up = x @ p["w_gate"], x @ p["w_up"]
        return _glu(gate, up, activation) @ p["w_down"]

    def loss(f):
        return jax.jit(jax.value_and_grad(lambda p: jnp.sum(jnp.sin(f(p, x)))))
    val, grads = loss(lambda p, x: tr.mlp(p, x, cfg, "fsdp"))(p)
    val_ref, grads_ref = loss(plain)(p)
    np.testing.assert_allclose(val, val_ref, rtol=1e-4)
    for name in p:
        np.testing.assert_allclose(grads[name], grads_ref[name], rtol=1e-4, atol=1e-4 * float(jnp.abs(grads_ref[name]).max()))
    jaxpr = str(jax.make_jaxpr(lambda p: tr.mlp(p, x, cfg, "fsdp"))(p))
    rows = x.shape[1]
    assert f"f32[8,{rows},2,128] = dot_general" in jaxpr, "gate and up not one matmul"
    assert "custom_vjp_call" in jaxpr, "no CPU GLU backward"
