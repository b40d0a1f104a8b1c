"""Output heads: query scoring against the pooled prompt (HF `Sam3DotProductScoring`) and the mask decoder
(HF `Sam3MaskDecoder`: prompt cross-attention on encoder tokens, FPN pixel decoder, per-query mask dot products).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from .config import MaskDecoderConfig, TransformerConfig
from .layers import XLA, Attention, AttentionPolicy, DecoderMLP, dense, layer_norm

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


def upsample2_conv3x3(x: jax.Array, k: jax.Array) -> jax.Array:
    """conv3x3(nearest_upsample_2x(x)) (zero padding 1, no bias) computed at the LOW resolution.

    Output row 2i + a of the upsampled grid sees x rows (i - 1, i) when a = 0 and (i, i + 1) when a = 1, and likewise
    for columns: the 3x3 kernel folds into one 2x2 kernel per output phase (a, p), 4 of 9 taps' worth of work (the
    upsampled map is never materialised). Per row phase a, one 2x2 convolution of x, padded on the side that phase
    reaches past, computes both column phases (2 x O output channels, W + 1 columns; phase p reads columns p..p+W-1);
    the phases are then interleaved. 2.25x fewer FLOPs than one 3x3 convolution with 4 x O channels and 1.4-2.5x
    faster on XLA's CPU backend (benchmarks/RESULTS.md). x [B, H, W, C], k [3, 3, C, O] -> [B, 2H, 2W, O].
    """
    b, h, w, c = x.shape
    o = k.shape[-1]
    rows = {0: (k[0], k[1] + k[2]), 1: (k[0] + k[1], k[2])}  # row phase -> kernel rows applied to its two x rows
    phases = []
    for a in (0, 1):
        kr = jnp.stack(rows[a])  # [2, 3, C, O]
        cols = [jnp.stack((kr[:, 0], kr[:, 1] + kr[:, 2]), 1), jnp.stack((kr[:, 0] + kr[:, 1], kr[:, 2]), 1)]
        kk = jnp.concatenate(cols, -1).astype(x.dtype)  # [2, 2, C, 2(p) O]
        y = jax.lax.conv_general_dilated(x, kk, (1, 1), ((1 - a, a), (1, 1)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC")).reshape(b, h, w + 1, 2, o)
        phases.append(jnp.stack([y[:, :, 0:w, 0], y[:, :, 1:w + 1, 1]], axis=3))  # [B, H, W, 2(p), O]
    return jnp.stack(phases, 2).reshape(b, 2 * h, 2 * w, o)  # [B, H, 2(a), W, 2(p), O] -> interleaved


def group_norm_relu(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int, eps: float) -> jax.Array:
    """relu(GroupNorm(x)) over NHWC x [B, H, W, C] -> [B, H, W, C] in x's dtype: what flax's
    `nn.GroupNorm(use_fast_variance=False)` + relu compute (two-pass variance, statistics in float32), equal up to
    float rounding. Faster on XLA's CPU backend (1.8-2.3x at the mask head's shapes, benchmarks/RESULTS.md): the
    sums run over the spatial axes per channel first, then over each group's channels, on a [B, C] array instead of
    one reduction over a [B, H, W, G, C/G] view."""
    b, h, w, c = x.shape
    per = c // groups
    n = h * w * per
    z = x.astype(jnp.float32)

    def group_stat(v):  # per-channel sums [B, C] -> each group's mean, per channel [B, 1, 1, C]
        return jnp.repeat(v.reshape(b, groups, per).sum(-1) / n, per, axis=1)[:, None, None, :]

    d = z - group_stat(z.sum((1, 2)))
    inv = jax.lax.rsqrt(group_stat((d * d).sum((1, 2))) + eps)
    return jax.nn.relu(d * (inv * scale.astype(jnp.float32)) + bias.astype(jnp.float32)).astype(x.dtype)


class PixelDecoder(nn.Module):
    """FPN top-down path: [4x, 2x, 1x] maps -> pixel embeddings at the 4x resolution [B, 4g, 4g, D]."""

    cfg: MaskDecoderConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        d, n, dt = self.cfg.hidden_size, self.cfg.num_upsampling_stages, self.dtype
        self.conv_layers = [nn.Conv(d, (3, 3), padding=((1, 1), (1, 1)), dtype=dt) for _ in range(n)]
        self.norms = [nn.GroupNorm(num_groups=8, epsilon=1e-5, dtype=dt, use_fast_variance=False) for _ in range(n)]

    def __call__(self, feats):
        """Reference order (as HF): upsample, add the skip, conv, norm, relu."""
        x = feats[-1]
        for i, skip in enumerate(reversed(feats[:-1])):
            x = resize_nearest(x, skip.shape[1:3]) + skip
            x = jax.nn.relu(self.norms[i](self.conv_layers[i](x)))
        return x

    def skip_terms(self, feats):
        """Prompt-independent halves of each stage's conv: conv_i(skip_i) + bias (conv is linear). Per image."""
        return [self.conv_layers[i](skip) for i, skip in enumerate(reversed(feats[:-1]))]

    def fast(self, x, terms):
        """Same result as __call__ given `skip_terms`: conv(up(x) + skip) = conv_nobias(up(x)) + conv(skip),
        with the upsample folded into the conv (upsample2_conv3x3). x: [B, g, g, D] -> [B, 4g, 4g, D]."""
        for i, t in enumerate(terms):
            k = self.conv_layers[i].variables["params"]["kernel"]
            if t.shape[1] == 2 * x.shape[1] and t.shape[2] == 2 * x.shape[2]:
                y = upsample2_conv3x3(x, k)
            else:
                y = jax.lax.conv_general_dilated(resize_nearest(x, t.shape[1:3]), k.astype(x.dtype), (1, 1),
                                                 ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
            norm = self.norms[i]
            p = norm.variables["params"]
            x = group_norm_relu(y + t.astype(y.dtype), p["scale"], p["bias"], norm.num_groups, norm.epsilon)
        return x


class MaskDecoder(nn.Module):
    cfg: MaskDecoderConfig
    dtype: jnp.dtype = jnp.float32
    attn: AttentionPolicy = XLA

    def setup(self):
        cfg, dt, d = self.cfg, self.dtype, self.cfg.hidden_size
        self.prompt_cross_attn_norm = layer_norm(1e-5, dt, None)
        self.prompt_cross_attn = Attention(d, cfg.num_attention_heads, dt, attn=self.attn)
        self.pixel_decoder = PixelDecoder(cfg, dt)
        self.instance_projection = nn.Conv(d, (1, 1), dtype=dt)
        self.semantic_projection = nn.Conv(1, (1, 1), dtype=dt)
        self.mask_embedder = MaskEmbedder(d, dt)

    def _prompted_tokens(self, encoder_tokens, prompt, prompt_bias):
        h = self.prompt_cross_attn_norm(encoder_tokens)
        return encoder_tokens + self.prompt_cross_attn(h, prompt, prompt, prompt_bias)

    def __call__(self, queries, fpn, encoder_tokens, prompt, prompt_bias):
        """queries [B, Q, D]; fpn: [4x, 2x, 1x] maps [B, h, w, D] (batch 1 broadcasts); encoder_tokens [B, g*g, D].

        Returns pred_masks [B, Q, 4g, 4g] (logits) and semantic_seg [B, 1, 4g, 4g].
        """
        enc = self._prompted_tokens(encoder_tokens, prompt, prompt_bias)
        b, d = enc.shape[0], self.cfg.hidden_size
        g_h, g_w = fpn[-1].shape[1:3]
        maps = [jnp.broadcast_to(f.astype(self.dtype), (b, *f.shape[1:])) for f in fpn[:-1]]
        maps.append(enc.reshape(b, g_h, g_w, d))  # encoder tokens replace the 1x backbone level
        pixels = self.pixel_decoder(maps)
        inst = self.instance_projection(pixels)
        emb = self.mask_embedder(queries)
        masks = jnp.einsum("bqc,bhwc->bqhw", emb, inst, preferred_element_type=jnp.float32)
        semantic = self.semantic_projection(pixels)
        return masks, jnp.transpose(semantic, (0, 3, 1, 2)).astype(jnp.float32)

    def image_terms(self, fpn):
        """Per-image cache for `fast`: the pixel decoder's skip-conv terms (see PixelDecoder.skip_terms)."""
        return self.pixel_decoder.skip_terms(fpn)

    def fast(self, queries, terms, encoder_tokens, prompt, prompt_bias, grid: tuple[int, int]):
        """pred_masks [B, Q, 4g, 4g] like __call__ (up to float rounding), cheaper: skip convs cached per image,
        upsampling folded into convs, and the 1x1 instance projection folded into the query side
        (emb . (W p + b) = (W^T emb) . p + emb . b), so no D x D conv runs at the 4x resolution."""
        return self.masks_from_pixels(queries, self.pixels_fast(terms, encoder_tokens, prompt, prompt_bias, grid))

    def pixels_fast(self, terms, encoder_tokens, prompt, prompt_bias, grid: tuple[int, int]):
        """The query-independent half of `fast`: pixel embeddings [B, 4g, 4g, D] (encoder_tokens [B, g*g, D])."""
        enc = self._prompted_tokens(encoder_tokens, prompt, prompt_bias)
        b, d = enc.shape[0], self.cfg.hidden_size
        terms = [jnp.broadcast_to(t, (b, *t.shape[1:])) for t in terms]
        return self.pixel_decoder.fast(enc.reshape(b, *grid, d), terms)

    def masks_from_pixels(self, queries, pixels):
        """queries [B, Q', D] (any subset of the queries) x pixels_fast's [B, 4g, 4g, D] -> mask logits
        [B, Q', 4g, 4g] float32."""
        p = self.instance_projection.variables["params"]
        emb = self.mask_embedder(queries)
        q = jnp.einsum("bqc,dc->bqd", emb, p["kernel"][0, 0].astype(emb.dtype))
        offset = jnp.einsum("bqc,c->bq", emb, p["bias"].astype(emb.dtype), preferred_element_type=jnp.float32)
        masks = jnp.einsum("bqd,bhwd->bqhw", q, pixels, preferred_element_type=jnp.float32)
        return masks + offset[..., None, None]


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
