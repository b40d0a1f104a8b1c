"""Output heads: query scoring against the pooled prompt (HF `Sam3DotProductScoring`) and the mask decoder
(HF `Sam3MaskDecoder`: prompt cross-attention on encoder tokens, FPN pixel decoder, per-query mask dot products).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from .config import MaskDecoderConfig, TransformerConfig
from .layers import Attention, DecoderMLP, dense, layer_norm

SCORE_CLAMP = 12.0


class DotProductScoring(nn.Module):
    """queries [B, Q, D], prompt [B, T, D], prompt_mask [B, T] -> logits [B, Q] (clamped to +-12)."""

    cfg: TransformerConfig  # the decoder's config
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, queries, prompt, prompt_mask):
        d = self.cfg.hidden_size
        t = prompt + DecoderMLP(self.cfg.intermediate_size, d, 2, self.dtype, name="text_mlp")(prompt)
        t = layer_norm(1e-5, self.dtype, "text_mlp_out_norm")(t)
        valid = prompt_mask.astype(jnp.float32)[..., None]
        pooled = (t.astype(jnp.float32) * valid).sum(1) / jnp.maximum(valid.sum(1), 1.0)  # [B, D]
        pt = dense(d, self.dtype, "text_proj")(pooled.astype(self.dtype))
        pq = dense(d, self.dtype, "query_proj")(queries)
        scores = jnp.einsum("bqd,bd->bq", pq, pt, preferred_element_type=jnp.float32) / math.sqrt(d)
        return jnp.clip(scores, -SCORE_CLAMP, SCORE_CLAMP)


def resize_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """torch F.interpolate(mode="nearest") on [B, H, W, C]: source index floor(dst * in / out)."""
    h, w = x.shape[1:3]
    if size[0] % h == 0 and size[1] % w == 0:
        return jnp.repeat(jnp.repeat(x, size[0] // h, axis=1), size[1] // w, axis=2)
    ri = (jnp.arange(size[0]) * h) // size[0]
    ci = (jnp.arange(size[1]) * w) // size[1]
    return x[:, ri][:, :, ci]


class PixelDecoder(nn.Module):
    """FPN top-down path: [4x, 2x, 1x] maps -> pixel embeddings at the 4x resolution [B, 4g, 4g, D]."""

    cfg: MaskDecoderConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, feats):
        d = self.cfg.hidden_size
        x = feats[-1]
        for i, skip in enumerate(reversed(feats[:-1])):
            x = resize_nearest(x, skip.shape[1:3]) + skip
            x = nn.Conv(d, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name=f"conv_layers_{i}")(x)
            x = nn.GroupNorm(num_groups=8, epsilon=1e-5, dtype=self.dtype, use_fast_variance=False,
                             name=f"norms_{i}")(x)
            x = jax.nn.relu(x)
        return x


class MaskDecoder(nn.Module):
    cfg: MaskDecoderConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, queries, fpn, encoder_tokens, prompt, prompt_bias):
        """queries [B, Q, D]; fpn: [4x, 2x, 1x] maps [B, h, w, D] (batch 1 broadcasts); encoder_tokens [B, g*g, D].

        Returns pred_masks [B, Q, 4g, 4g] (logits) and semantic_seg [B, 1, 4g, 4g].
        """
        cfg, dt, d = self.cfg, self.dtype, self.cfg.hidden_size
        h = layer_norm(1e-5, dt, "prompt_cross_attn_norm")(encoder_tokens)
        enc = encoder_tokens + Attention(d, cfg.num_attention_heads, dt, name="prompt_cross_attn")(
            h, prompt, prompt, prompt_bias)
        b = enc.shape[0]
        g_h, g_w = fpn[-1].shape[1:3]
        maps = [jnp.broadcast_to(f.astype(dt), (b, *f.shape[1:])) for f in fpn[:-1]]
        maps.append(enc.reshape(b, g_h, g_w, d))  # encoder tokens replace the 1x backbone level
        pixels = PixelDecoder(cfg, dt, name="pixel_decoder")(maps)
        inst = nn.Conv(d, (1, 1), dtype=dt, name="instance_projection")(pixels)
        emb = MaskEmbedder(d, dt, name="mask_embedder")(queries)
        masks = jnp.einsum("bqc,bhwc->bqhw", emb, inst, preferred_element_type=jnp.float32)
        semantic = nn.Conv(1, (1, 1), dtype=dt, name="semantic_projection")(pixels)
        return masks, jnp.transpose(semantic, (0, 3, 1, 2)).astype(jnp.float32)


class MaskEmbedder(nn.Module):
    """3 linear layers with ReLU between (HF `Sam3MaskEmbedder`). [B, Q, D] -> [B, Q, D]."""

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(3):
            x = dense(self.features, self.dtype, f"layers_{i}")(x)
            if i < 2:
                x = jax.nn.relu(x)
        return x
