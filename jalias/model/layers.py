"""Building blocks shared by the SAM3 stages.

Module and parameter names follow the Hugging Face `Sam3Model` attribute names (`q_proj`, `fc1`, `layers_0`, ...)
so that weight conversion is a handful of generic rules (see `jalias/weights/mapping.py`).
Layout conventions: sequences are [B, T, C]; images are channels-last [B, H, W, C].
"""

from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Which attention kernel to use: "xla" (plain einsum + fp32 softmax, exact and portable) or "cudnn"
# (jax.nn.dot_product_attention fused kernel; GPU + bf16 only). Set by the engine, read at trace time.
ATTENTION_IMPL = {"impl": "xla"}

MASK_VALUE = -1e9  # additive bias for masked keys (finite: a fully masked row stays NaN-free)


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """torch/transformers activation names -> jax functions (exact erf GELU for "gelu", like torch)."""
    table = {
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
        "relu": jax.nn.relu,
        "silu": jax.nn.silu,
    }
    if name not in table:
        raise ValueError(f"unsupported activation {name!r}; known: {sorted(table)}")
    return table[name]


def layer_norm(eps: float, dtype, name: str) -> nn.LayerNorm:
    # use_fast_variance=False: E[(x-mean)^2] like torch, not E[x^2]-mean^2 (cancellation at large means).
    return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


def dense(features: int, dtype, name: str, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, name=name)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """Scaled dot-product attention.

    q: [B, T, N, H], k/v: [B, S, N, H], bias: additive, broadcastable to [B, N, T, S]. Returns [B, T, N, H].
    Softmax runs in float32 whatever the input dtype.
    """
    if ATTENTION_IMPL["impl"] == "cudnn" and q.dtype in (jnp.bfloat16, jnp.float16):
        b = None if bias is None else bias.astype(q.dtype)
        return jax.nn.dot_product_attention(q, k, v, bias=b, implementation="cudnn")
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bnts,bsnh->btnh", weights, v)


def key_padding_bias(mask: jax.Array | None) -> jax.Array | None:
    """mask: [B, S] (1/True = valid) -> additive bias [B, 1, 1, S] (0 or MASK_VALUE)."""
    if mask is None:
        return None
    return jnp.where(mask.astype(bool), 0.0, MASK_VALUE)[:, None, None, :].astype(jnp.float32)


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v/o projections (HF `Sam3Attention`, CLIP uses o_name="out_proj").

    query: [B, T, C], key/value: [B, S, C], bias: broadcastable to [B, N, T, S] -> [B, T, C].
    """

    hidden_size: int
    num_heads: int
    dtype: jnp.dtype = jnp.float32
    o_name: str = "o_proj"

    @nn.compact
    def __call__(self, query, key, value, bias=None):
        split = lambda x: x.reshape(*x.shape[:-1], self.num_heads, self.hidden_size // self.num_heads)
        q = split(dense(self.hidden_size, self.dtype, "q_proj")(query))
        k = split(dense(self.hidden_size, self.dtype, "k_proj")(key))
        v = split(dense(self.hidden_size, self.dtype, "v_proj")(value))
        out = attend(q, k, v, bias)
        return dense(self.hidden_size, self.dtype, self.o_name)(out.reshape(*out.shape[:-2], self.hidden_size))


class MLP(nn.Module):
    """fc1 -> act -> fc2 (HF `Sam3MLP` / `CLIPMLP`). [..., C] -> [..., C]."""

    hidden_size: int
    intermediate_size: int
    act: str
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = dense(self.intermediate_size, self.dtype, "fc1")(x)
        x = activation(self.act)(x)
        return dense(self.hidden_size, self.dtype, "fc2")(x)


class DecoderMLP(nn.Module):
    """2- or 3-layer ReLU MLP (HF `Sam3DecoderMLP`): layer1, layer2[, layer3]. [..., in] -> [..., out]."""

    hidden_dim: int
    output_dim: int
    num_layers: int = 2
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dims = [self.hidden_dim] * (self.num_layers - 1) + [self.output_dim]
        for i, d in enumerate(dims):
            x = dense(d, self.dtype, f"layer{i + 1}")(x)
            if i < len(dims) - 1:
                x = jax.nn.relu(x)
        return x


def sine_embed_2d(height: int, width: int, num_feats: int, normalize: bool,
                  temperature: float = 10000.0, scale: float = 2 * math.pi) -> np.ndarray:
    """DETR sine position embedding for an unmasked grid -> float32 [H, W, 2*num_feats] (y features first).

    Computed in numpy at trace time: it depends only on shapes, so it costs nothing per candidate.
    """
    y = np.arange(1, height + 1, dtype=np.float32)[:, None].repeat(width, 1)
    x = np.arange(1, width + 1, dtype=np.float32)[None, :].repeat(height, 0)
    if normalize:
        eps = 1e-6
        y = y / (y[-1:, :] + eps) * scale
        x = x / (x[:, -1:] + eps) * scale
    dim_t = temperature ** (2 * (np.arange(num_feats) // 2) / num_feats).astype(np.float32)

    def enc(p):
        p = p[..., None] / dim_t
        return np.stack([np.sin(p[..., 0::2]), np.cos(p[..., 1::2])], axis=-1).reshape(*p.shape[:-1], -1)

    return np.concatenate([enc(y), enc(x)], axis=-1).astype(np.float32)


def sine_embed_boxes(boxes: jax.Array, num_feats: int, temperature: float = 10000.0,
                     scale: float = 2 * math.pi) -> jax.Array:
    """Sine embedding of boxes [..., 4] (cx, cy, w, h) -> [..., 4*num_feats] ordered (y, x, w, h)."""
    dim_t = jnp.asarray(temperature ** (2 * (np.arange(num_feats) // 2) / num_feats), jnp.float32)

    def enc(c):
        p = (c * scale)[..., None] / dim_t
        return jnp.stack([jnp.sin(p[..., 0::2]), jnp.cos(p[..., 1::2])], axis=-1).reshape(*p.shape[:-1], -1)

    x, y, w, h = (boxes[..., i] for i in range(4))
    return jnp.concatenate([enc(y), enc(x), enc(w), enc(h)], axis=-1)


def box_cxcywh_to_xyxy(b: jax.Array) -> jax.Array:
    cx, cy, w, h = (b[..., i] for i in range(4))
    return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def inverse_sigmoid(x: jax.Array, eps: float = 1e-3) -> jax.Array:
    x = jnp.clip(x, 0.0, 1.0)
    return jnp.log(jnp.maximum(x, eps) / jnp.maximum(1 - x, eps))
