"""Building blocks shared by the SAM3 stages.

Module and parameter names follow the Hugging Face `Sam3Model` attribute names (`q_proj`, `fc1`, `layers_0`, ...)
so that weight conversion is a handful of generic rules (see `jalias/weights/mapping.py`).
Layout conventions: sequences are [B, T, C]; images are channels-last [B, H, W, C].
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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


Q_BLOCK, K_BLOCK = 324, 648  # `attend_blocked` block sizes: they tile SAM3's 72 x 72 = 5184-token grid


@dataclass(frozen=True)
class AttentionPolicy:
    """How `attend` computes attention: a static field of every attention module (part of the jit cache key).

    impl: "xla" (einsum + float32 softmax, exact and portable) or "cudnn" (jax.nn.dot_product_attention's fused
    kernel, used only for bf16/fp16 inputs; float32 inputs keep the xla path).
    blocked_min_pairs: at or above this many query x key positions the xla path never materialises the
    [B, N, T, S] logits and runs `attend_blocked` (on CPU the logits' memory traffic, not the FLOPs, was the
    cost: SAM3's 5184-token self-attention ran ~4x faster blocked).
    """

    impl: str = "xla"
    blocked_min_pairs: int = 1 << 22

    def __post_init__(self):
        if self.impl not in ("xla", "cudnn"):
            raise ValueError(f"attention impl must be 'xla' or 'cudnn', got {self.impl!r}")
        if self.blocked_min_pairs < 1:
            raise ValueError(f"blocked_min_pairs must be >= 1, got {self.blocked_min_pairs}")


XLA = AttentionPolicy()


def choose_policy(backend: str, dtype) -> AttentionPolicy:
    """The default policy for a backend ("cpu", "gpu", "tpu") and compute dtype: cuDNN's fused kernel on a GPU
    in bf16/fp16, the exact xla path everywhere else."""
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return AttentionPolicy("cudnn") if backend == "gpu" and half else XLA


def default_dtype(backend: str | None = None) -> str:
    """The compute dtype used when none is given, per backend ("cpu", "gpu", "tpu"; None: JAX's default backend).
    The one place this default is chosen: `jalias search/eval --dtype`, `search_dataset`, `evaluate_prompt`,
    `jalias.run.model.load_model` and `jalias.load` all read it.

    float32 on every backend today. On a CPU bfloat16 is slower and less exact. On a GPU bfloat16 would halve the
    memory and speed up scoring, but it becomes the GPU default only once a GPU run has measured it equal to
    float32 (the same aliases and IoUs on the benchmarks); that has not been measured yet, so float32 it is."""
    if backend is None:
        backend = jax.default_backend()
    return "float32"  # every backend, `backend` included, until bf16 is measured equal on a GPU (see above)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None = None,
           policy: AttentionPolicy = XLA) -> jax.Array:
    """Scaled dot-product attention.

    q: [B, T, N, H], k/v: [B, S, N, H], bias: additive, broadcastable to [B, N, T, S]. Returns [B, T, N, H].
    Softmax runs in float32 whatever the input dtype. Large T x S goes to `attend_blocked` (same result).
    """
    if policy.impl == "cudnn" and q.dtype in (jnp.bfloat16, jnp.float16):
        b = None if bias is None else bias.astype(q.dtype)
        try:
            return jax.nn.dot_product_attention(q, k, v, bias=b, implementation="cudnn")
        except (ValueError, NotImplementedError, RuntimeError) as e:  # unsupported shape/device, at trace time
            warnings.warn(f"cuDNN attention unavailable for q {q.shape}, k {k.shape} ({e}); using the xla path",
                          stacklevel=2)
    if q.shape[1] * k.shape[1] >= policy.blocked_min_pairs:
        return attend_blocked(q, k, v, bias)
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bnts,bsnh->btnh", weights, v)


def attend_blocked(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None = None,
                   q_block: int = Q_BLOCK, k_block: int = K_BLOCK) -> jax.Array:
    """`attend` without the [B, N, T, S] logits: query blocks (lax.map) x key blocks (lax.scan), online softmax.

    q: [B, T, N, H], k/v: [B, S, N, H], bias: additive, broadcastable to [B, N, T, S] (finite, e.g. MASK_VALUE).
    Returns [B, T, N, H] in v's dtype; equal to `attend` up to float rounding (max / sum / accumulator in float32).
    T and S need not be multiples of the block sizes: padded keys are masked, padded queries dropped. Peak extra
    memory is one [B, N, q_block, k_block] float32 block.
    """
    b, t, n, h = q.shape
    s = k.shape[1]
    qb, kb = min(q_block, t), min(k_block, s)
    nq, nk = -(-t // qb), -(-s // kb)
    q = q * jnp.asarray(1.0 / math.sqrt(h), q.dtype)  # scaled once, not in every logits block (~10% on CPU)

    if bias is None:
        bias = jnp.zeros((1, 1, 1, s), jnp.float32)
    bias = bias.astype(jnp.float32).reshape((1,) * (4 - bias.ndim) + bias.shape)
    per_query = bias.shape[2] != 1
    bias = jnp.broadcast_to(bias, bias.shape[:2] + (t if per_query else 1, s))
    # Padded keys get a bias below MASK_VALUE so that even a row whose real keys are all masked ignores them
    # (as `attend` does: uniform weights over the real keys only).
    bias = jnp.pad(bias, ((0, 0), (0, 0), (0, nq * qb - t if per_query else 0), (0, nk * kb - s)),
                   constant_values=2 * MASK_VALUE)
    bb, bn = bias.shape[:2]
    q = jnp.pad(q, ((0, 0), (0, nq * qb - t), (0, 0), (0, 0)))
    k = jnp.pad(k, ((0, 0), (0, nk * kb - s), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, nk * kb - s), (0, 0), (0, 0)))
    qs = q.reshape(b, nq, qb, n, h).transpose(1, 0, 3, 2, 4)  # [nq, B, N, qb, H]
    ks = k.reshape(b, nk, kb, n, h).transpose(1, 0, 3, 4, 2)  # [nk, B, N, H, kb]
    vs = v.reshape(b, nk, kb, n, h).transpose(1, 0, 3, 2, 4)  # [nk, B, N, kb, H]
    if per_query:  # bias blocks travel with their query block: [nq, nk, b, n, qb, kb]
        q_bias, shared_bias = bias.reshape(bb, bn, nq, qb, nk, kb).transpose(2, 4, 0, 1, 3, 5), None
    else:  # one [nk, b, n, 1, kb] for every query block
        q_bias, shared_bias = None, bias.reshape(bb, bn, 1, nk, kb).transpose(3, 0, 1, 2, 4)

    def query_block(args):
        qq, kv_bias = args  # [B, N, qb, H], [nk, b, n, qb, kb] or None

        def key_block(carry, blk):
            m, l, acc = carry  # running max [B, N, qb], softmax denominator [B, N, qb], numerator [B, N, qb, H]
            kk, vv, bk = blk
            logits = jnp.matmul(qq, kk, preferred_element_type=jnp.float32) + bk
            # The running max cancels out of the result, so no gradient needs to flow through it.
            m_new = jax.lax.stop_gradient(jnp.maximum(m, logits.max(-1)))
            p = jnp.exp(logits - m_new[..., None])
            c = jnp.exp(m - m_new)
            pv = jnp.matmul(p.astype(vv.dtype), vv, preferred_element_type=jnp.float32)
            return (m_new, l * c + p.sum(-1), acc * c[..., None] + pv), None

        # start the max at the most negative finite float, not -inf: exp(m - m_new) is then never inf - inf
        init = (jnp.full(qq.shape[:-1], jnp.finfo(jnp.float32).min, jnp.float32),
                jnp.zeros(qq.shape[:-1], jnp.float32), jnp.zeros(qq.shape, jnp.float32))
        blocks = (ks, vs, shared_bias if kv_bias is None else kv_bias)
        (_, l, acc), _ = jax.lax.scan(key_block, init, blocks)
        return (acc / l[..., None]).astype(v.dtype)

    out = jax.lax.map(query_block, (qs, q_bias))  # [nq, B, N, qb, H]
    return out.transpose(1, 0, 3, 2, 4).reshape(b, nq * qb, n, h)[:, :t]


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
    attn: AttentionPolicy = XLA

    @nn.compact
    def __call__(self, query, key, value, bias=None):
        split = lambda x: x.reshape(*x.shape[:-1], self.num_heads, self.hidden_size // self.num_heads)
        q = split(dense(self.hidden_size, self.dtype, "q_proj")(query))
        k = split(dense(self.hidden_size, self.dtype, "k_proj")(key))
        v = split(dense(self.hidden_size, self.dtype, "v_proj")(value))
        out = attend(q, k, v, bias, self.attn)
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
