"""Blocked online-softmax attention (`jalias.model.layers.attend_blocked`) against plain `attend`.

Contract:
  * Values: fp32 outputs equal the plain [B, N, T, S]-logits path within 1e-5 for T / S that are and are not
    multiples of the (small, so the tests are fast) blocks, T or S smaller than one block, and every bias shape
    the model uses: None, key padding [B, 1, 1, S], per-query [B, N, T, S], shared [1, N, T, S], causal
    [B, 1, T, S], a bare [T, S]; a row whose keys are all masked (MASK_VALUE) gives what `attend` gives.
  * Gradients w.r.t. q, k, v and a per-query bias equal the plain path's (1e-5); bf16 inputs give bf16 outputs
    within bf16 rounding of the fp32 result; jit and vmap work.
  * `attend` dispatches to the blocked path exactly when T * S >= its policy's blocked_min_pairs; the policy
    (`AttentionPolicy`, a model argument) reaches every attention of the model.
  * End to end: a tiny-config Engine with every attention forced through small blocks gives the same soft loss
    and gradient (jax.value_and_grad through the blocked path) as the plain engine.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jalias.model.layers as layers
from jalias.data import make_dataset
from jalias.engine import Engine
from jalias.model.config import tiny_config
from jalias.model.init import random_params
from jalias.model.layers import MASK_VALUE, attend_blocked
from jalias.model.sam3 import Sam3

QB, KB = 8, 16  # small blocks: several of each in every case below


@pytest.fixture(autouse=True, scope="module")
def _fp32_matmuls():
    """GPU fp32 matmuls default to TF32-like precision: compare at full fp32."""
    with jax.default_matmul_precision("highest"):
        yield


NEVER_BLOCKED = layers.AttentionPolicy(blocked_min_pairs=1 << 62)


def plain(q, k, v, bias=None):
    """`attend` with the blocked path switched off: materialised logits, plain softmax."""
    return layers.attend(q, k, v, bias, NEVER_BLOCKED)


def qkv(b, t, s, n, h, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=(b, x, n, h)), dtype) for x in (t, s, s))


def make_bias(kind, b, t, s, n, seed=1):
    rng = np.random.default_rng(seed)
    if kind is None:
        return None
    if kind == "key":  # [B, 1, 1, S], ~30% of keys padded, the first always valid
        valid = rng.random((b, s)) > 0.3
        valid[:, 0] = True
        return layers.key_padding_bias(jnp.asarray(valid))
    if kind == "per_query":
        return jnp.asarray(rng.normal(size=(b, n, t, s)), jnp.float32)
    if kind == "shared":
        return jnp.asarray(rng.normal(size=(1, n, t, s)), jnp.float32)
    if kind == "causal":  # [B, 1, T, S] like the text encoder's (queries at the last T positions)
        allowed = np.arange(s)[None, :] <= (np.arange(t) + s - t)[:, None]
        return jnp.asarray(np.where(allowed, 0.0, MASK_VALUE)[None, None].repeat(b, 0), jnp.float32)
    if kind == "2d":
        return jnp.asarray(rng.normal(size=(t, s)), jnp.float32)
    raise ValueError(kind)


CASES = [  # (B, T, S, N, H, bias)
    (2, 32, 64, 2, 8, None),  # multiples of both blocks
    (2, 37, 53, 2, 8, None),  # neither a multiple
    (2, 37, 53, 2, 8, "key"),
    (2, 37, 53, 2, 8, "per_query"),
    (1, 37, 53, 3, 4, "shared"),
    (3, 21, 45, 1, 8, "causal"),
    (2, 19, 50, 2, 8, "2d"),
    (2, 5, 11, 2, 8, "key"),  # T and S smaller than one block
    (1, 70, 9, 1, 16, "per_query"),  # many query blocks, one partial key block
]


@pytest.mark.parametrize("b,t,s,n,h,kind", CASES)
def test_blocked_equals_plain(b, t, s, n, h, kind):
    q, k, v = qkv(b, t, s, n, h)
    bias = make_bias(kind, b, t, s, n)
    got = jax.jit(functools.partial(attend_blocked, q_block=QB, k_block=KB))(q, k, v, bias)
    ref = plain(q, k, v, bias)
    assert got.shape == (b, t, n, h) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=0)
    assert float(jnp.abs(ref).max()) > 0.1  # non-trivial outputs


def test_fully_masked_row_matches_attend():
    """All real keys masked: `attend` averages the real values uniformly; the padded keys must not dilute it."""
    q, k, v = qkv(2, 9, 21, 1, 4)
    valid = np.ones((2, 21), bool)
    valid[1] = False
    bias = layers.key_padding_bias(jnp.asarray(valid))
    got = attend_blocked(q, k, v, bias, q_block=QB, k_block=KB)
    ref = plain(q, k, v, bias)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(got[1]), np.broadcast_to(np.asarray(v[1]).mean(0), (9, 1, 4)), atol=1e-5)


@pytest.mark.parametrize("kind", [None, "key", "per_query"])
def test_blocked_gradients_equal_plain(kind):
    b, t, s, n, h = 2, 23, 37, 2, 8
    q, k, v = qkv(b, t, s, n, h, seed=2)
    bias = make_bias(kind, b, t, s, n, seed=3)
    w = jnp.asarray(np.random.default_rng(4).normal(size=(b, t, n, h)), jnp.float32)  # generic cotangent

    def loss(fn, q, k, v, bias):
        return jnp.sum(fn(q, k, v, bias) * w)

    argnums = (0, 1, 2, 3) if kind == "per_query" else (0, 1, 2)
    blocked = functools.partial(attend_blocked, q_block=QB, k_block=KB)
    got = jax.jit(jax.grad(functools.partial(loss, blocked), argnums))(q, k, v, bias)
    ref = jax.grad(functools.partial(loss, plain), argnums)(q, k, v, bias)
    for name, g, r in zip("qkvb", got, ref):
        assert float(jnp.abs(r).max()) > 1e-3, name
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5, rtol=0, err_msg=f"d/d{name}")


def test_bf16_inputs():
    q, k, v = qkv(2, 37, 53, 2, 8, seed=5)
    bias = make_bias("key", 2, 37, 53, 2)
    ref = plain(q, k, v, bias)
    lo = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    got = attend_blocked(*lo, bias, q_block=QB, k_block=KB)
    plain_bf16 = plain(*lo, bias)
    assert got.dtype == jnp.bfloat16
    err = np.abs(np.asarray(got, np.float32) - np.asarray(ref))
    err_plain = np.abs(np.asarray(plain_bf16, np.float32) - np.asarray(ref))
    # bf16 keeps 8 mantissa bits (~0.4%): the blocked path is as close to the fp32 result as the plain bf16 one
    assert err.max() <= 0.03 and err.mean() <= 2 * err_plain.mean() + 1e-3, (err.max(), err.mean(), err_plain.mean())


def test_vmap_and_jit():
    q = jnp.asarray(np.random.default_rng(6).normal(size=(3, 2, 29, 2, 8)), jnp.float32)  # extra leading axis
    blocked = jax.jit(jax.vmap(lambda x: attend_blocked(x, x, x, None, q_block=QB, k_block=KB)))
    ref = jax.vmap(lambda x: plain(x, x, x))(q)
    np.testing.assert_allclose(np.asarray(blocked(q)), np.asarray(ref), atol=1e-5, rtol=0)


def test_attend_dispatch(monkeypatch):
    calls = []
    real = layers.attend_blocked
    monkeypatch.setattr(layers, "attend_blocked", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    policy = layers.AttentionPolicy(blocked_min_pairs=20 * 30)
    q, k, v = qkv(1, 20, 30, 1, 4)
    layers.attend(q, k, v, None, policy)  # 600 pairs: blocked
    layers.attend(q[:, :19], k, v, None, policy)  # 570 pairs: plain
    assert calls == [(1, 20, 1, 4)]


def test_choose_policy_and_policy_errors():
    assert layers.choose_policy("gpu", jnp.bfloat16).impl == "cudnn"
    assert layers.choose_policy("gpu", jnp.float16).impl == "cudnn"
    assert layers.choose_policy("gpu", jnp.float32).impl == "xla"  # fp32 stays exact
    assert layers.choose_policy("cpu", jnp.bfloat16).impl == "xla"
    assert layers.choose_policy("tpu", jnp.bfloat16).impl == "xla"
    cfg = tiny_config()
    params = random_params(cfg, 0)
    assert Sam3(cfg, params).attention == layers.choose_policy(jax.default_backend(), jnp.float32)
    assert Sam3(cfg, params, attention="cudnn").module.attn.impl == "cudnn"
    with pytest.raises(ValueError, match="attention impl must be 'xla' or 'cudnn', got 'flash'"):
        Sam3(cfg, params, attention="flash")
    with pytest.raises(ValueError, match="blocked_min_pairs must be >= 1"):
        layers.AttentionPolicy(blocked_min_pairs=0)


def test_policy_reaches_every_attention(monkeypatch):
    """Every attention of the model (ViT, text, fusion encoder, decoder, mask head) runs under the policy the
    model was built with: the one that blocks everything calls `attend_blocked` from each stage."""
    calls = []
    real = layers.attend_blocked
    monkeypatch.setattr(layers, "attend_blocked", lambda *a, **kw: calls.append(a[0].shape[1]) or real(*a, **kw))
    cfg = tiny_config()
    model = Sam3(cfg, random_params(cfg, 0), attention=layers.AttentionPolicy(blocked_min_pairs=1))
    s = cfg.image_size
    ids = np.zeros((1, cfg.context_length), np.int32)
    model(np.zeros((1, 3, s, s), np.float32), ids, np.ones_like(ids))
    n_attn = (cfg.vision.backbone.num_hidden_layers + cfg.text.num_hidden_layers + 2 * cfg.encoder.num_layers
              + 3 * cfg.decoder.num_layers + 1)
    assert len(calls) == n_attn, (len(calls), n_attn)


# ---- end to end: the engine with every attention blocked -----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_setup():
    cfg = tiny_config()
    ds = make_dataset(1, 64, seed=0)
    images, gts = [], []
    for smp in ds.samples[:3]:
        m = next(m for m in smp.masks.values() if m.any())
        images.append(smp.image)
        gts.append(m)
    ids = np.random.default_rng(7).integers(0, 1000, 6).astype(np.int32)  # one 6-token prompt
    return cfg, random_params(cfg, 1), images, gts, ids


def _soft_loss_and_grad(cfg, params, images, gts, ids, attention=NEVER_BLOCKED):
    engine = Engine(Sam3(cfg, params, attention=attention), images, gts, compilation_cache=False)
    emb = jnp.asarray(engine.embedding_table, jnp.float32)[jnp.asarray(ids)]  # [6, Ct]
    loss, grad = engine.soft_loss_and_grad(emb)
    return loss, np.asarray(grad)


def test_engine_soft_loss_through_blocked_attention(tiny_setup, monkeypatch):
    """jax.value_and_grad of the engine's soft loss with every attention of the model (text, fusion encoder,
    decoder, mask head) blocked equals the plain path. (The exact-IoU path runs the same forward.)"""
    ref_loss, ref_grad = _soft_loss_and_grad(*tiny_setup)
    calls = []
    real = layers.attend_blocked

    def small_blocks(*a, **kw):
        calls.append(a[0].shape)
        return real(*a, q_block=4, k_block=8)

    monkeypatch.setattr(layers, "attend_blocked", small_blocks)
    loss, grad = _soft_loss_and_grad(*tiny_setup, attention=layers.AttentionPolicy(blocked_min_pairs=1))
    assert len(calls) > 5
    # measured (2026-12-07): loss identical, gradients within 5.4e-7 of the largest gradient
    assert np.isfinite(loss) and abs(loss - ref_loss) <= 1e-6 * max(1.0, abs(ref_loss)), (loss, ref_loss)
    assert np.all(np.isfinite(grad)) and np.abs(ref_grad).max() > 0
    np.testing.assert_allclose(grad, ref_grad, atol=1e-5 * np.abs(ref_grad).max(), rtol=0)


def test_cudnn_policy_falls_back_where_cudnn_cannot_run():
    """On a machine without cuDNN (CI's CPU) a cudnn policy warns and gives the xla path's result; fp32 inputs
    never take the cudnn path."""
    q, k, v = qkv(1, 8, 8, 2, 16, dtype=jnp.bfloat16)
    cudnn = layers.AttentionPolicy("cudnn")
    if jax.default_backend() == "gpu":
        pytest.skip("a GPU runs cuDNN for real (see benchmarks/throughput.py)")
    with pytest.warns(UserWarning, match="cuDNN attention unavailable"):
        got = layers.attend(q, k, v, None, cudnn)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(plain(q, k, v), np.float32))
    q32, k32, v32 = qkv(1, 8, 8, 2, 16)
    np.testing.assert_array_equal(np.asarray(layers.attend(q32, k32, v32, None, cudnn)),
                                  np.asarray(plain(q32, k32, v32)))


@pytest.mark.parametrize("shape", [(2, 5, 7, 6), (1, 4, 4, 8)])
def test_upsample2_conv3x3_equals_torch_conv_of_the_upsampled_map(shape):
    """The mask head's folded upsample+conv (per row phase one 2x2 convolution with 2 x O channels at the low
    resolution, then the phases interleaved) against torch: F.interpolate(nearest, x2) then conv2d(padding 1),
    odd and non-square sizes."""
    import torch

    from jalias.model.heads import upsample2_conv3x3

    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    k = rng.standard_normal((3, 3, shape[-1], 5)).astype(np.float32)
    ref = torch.nn.functional.conv2d(
        torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), scale_factor=2, mode="nearest"),
        torch.from_numpy(k).permute(3, 2, 0, 1), padding=1).permute(0, 2, 3, 1).numpy()
    got = np.asarray(upsample2_conv3x3(jnp.asarray(x), jnp.asarray(k)))
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(3, 6, 5, 32), (2, 4, 4, 16)])
def test_group_norm_relu_equals_a_float64_group_norm(shape):
    """The engine's pixel-decoder GroupNorm + relu (per-channel sums, then per group) against GroupNorm + relu
    computed in float64 by numpy, on inputs far from zero mean (where a one-pass variance loses digits: torch's
    CPU group_norm is up to 1.2e-4 off here, flax's two-pass nn.GroupNorm 7e-6, this one 5e-6); in bf16 against
    flax's nn.GroupNorm in bf16 (what the reference path runs), to bf16 rounding."""
    import flax.linen as nn

    from jalias.model.heads import group_norm_relu

    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) * 2 + 30).astype(np.float32)
    scale, bias = rng.standard_normal(shape[-1]).astype(np.float32), rng.standard_normal(shape[-1]).astype(np.float32)
    z = x.astype(np.float64).reshape(*shape[:3], 8, shape[-1] // 8)
    mean, var = z.mean((1, 2, 4), keepdims=True), z.var((1, 2, 4), keepdims=True)
    ref = np.maximum(((z - mean) / np.sqrt(var + 1e-5)).reshape(shape) * scale + bias, 0)
    got = np.asarray(group_norm_relu(jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias), 8, 1e-5))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    gn = nn.GroupNorm(num_groups=8, epsilon=1e-5, dtype=jnp.bfloat16, use_fast_variance=False)
    params = {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}
    xb = jnp.asarray(x, jnp.bfloat16)
    want = np.asarray(jax.nn.relu(gn.apply(params, xb)), np.float32)
    got_b = group_norm_relu(xb, jnp.asarray(scale), jnp.asarray(bias), 8, 1e-5)
    assert got_b.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got_b, np.float32), want, rtol=1e-2, atol=1e-2)
