"""Vision path: ViT backbone (windowed + global attention, 2-D axial RoPE) and the FPN neck.

HF counterparts: `Sam3ViTModel` (vision_encoder.backbone) and `Sam3VisionNeck` (vision_encoder.neck).
Images are channels-last inside jalias: pixel_values arrive [B, 3, S, S] (torch layout) and are transposed once.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .config import ViTConfig, VisionConfig
from .layers import MLP, XLA, AttentionPolicy, attend, dense, layer_norm


def rope_tables(cfg: ViTConfig, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Axial RoPE cos/sin for one layer -> two float32 [T, head_dim] arrays (T = tokens per attention window).

    Windowed layers use a window x window grid; global layers the full grid with positions scaled by
    window_size / grid, as in SAM3. Positions are (x, y) pairs; each frequency is used for 2 adjacent dims.
    """
    grid = window if window > 0 else cfg.grid
    hd = cfg.hidden_size // cfg.num_attention_heads
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, hd // 2, 2, dtype=np.float32) / (hd // 2)))
    ys, xs = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32), indexing="ij")
    pos = np.stack([xs.ravel(), ys.ravel()], -1) * np.float32(cfg.window_size / grid)  # [T, 2]
    freqs = pos[:, :, None] * inv_freq  # [T, 2, hd/4]
    freqs = np.concatenate([freqs[:, 0], freqs[:, 1]], -1).repeat(2, axis=-1)  # [T, hd]
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


def apply_rope(x: jax.Array, cos: np.ndarray, sin: np.ndarray) -> jax.Array:
    """x: [B, T, N, H]; rotates adjacent pairs (x0, x1) -> (-x1, x0), in float32."""
    xf = x.astype(jnp.float32)
    pairs = xf.reshape(*xf.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], -1).reshape(xf.shape)
    return (xf * cos[:, None, :] + rotated * sin[:, None, :]).astype(x.dtype)


def window_partition(x: jax.Array, w: int) -> tuple[jax.Array, tuple[int, int]]:
    """[B, H, W, C] -> windows [B * nh * nw, w, w, C] (zero-padded to a multiple of w), padded (H, W)."""
    b, h, wd, c = x.shape
    ph, pw = (-h) % w, (-wd) % w
    x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
    hp, wp = h + ph, wd + pw
    x = x.reshape(b, hp // w, w, wp // w, w, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w, w, c), (hp, wp)


def window_unpartition(x: jax.Array, w: int, padded: tuple[int, int], size: tuple[int, int]) -> jax.Array:
    hp, wp = padded
    b = x.shape[0] // ((hp // w) * (wp // w))
    x = x.reshape(b, hp // w, wp // w, w, w, -1).transpose(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, : size[0], : size[1]]


class RoPEAttention(nn.Module):
    """Self-attention with 2-D RoPE over a square token grid. x: [B, h, w, C] -> [B, h, w, C]."""

    cfg: ViTConfig
    window: int
    dtype: jnp.dtype = jnp.float32
    attn: AttentionPolicy = XLA

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        n = self.cfg.num_attention_heads
        cos, sin = rope_tables(self.cfg, self.window)
        split = lambda t: t.reshape(b, h * w, n, c // n)
        q = apply_rope(split(dense(c, self.dtype, "q_proj")(x)), cos, sin)
        k = apply_rope(split(dense(c, self.dtype, "k_proj")(x)), cos, sin)
        v = split(dense(c, self.dtype, "v_proj")(x))
        out = attend(q, k, v, None, self.attn).reshape(b, h, w, c)
        return dense(c, self.dtype, "o_proj")(out)


class ViTLayer(nn.Module):
    """Pre-norm ViT block; window > 0 means windowed attention. [B, H, W, C] -> [B, H, W, C]."""

    cfg: ViTConfig
    window: int
    dtype: jnp.dtype = jnp.float32
    attn: AttentionPolicy = XLA

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        h = layer_norm(cfg.layer_norm_eps, self.dtype, "layer_norm1")(x)
        if self.window > 0:
            size = h.shape[1:3]
            h, padded = window_partition(h, self.window)
        h = RoPEAttention(cfg, self.window, self.dtype, self.attn, name="attention")(h)
        if self.window > 0:
            h = window_unpartition(h, self.window, padded, size)
        x = x + h
        h = layer_norm(cfg.layer_norm_eps, self.dtype, "layer_norm2")(x)
        return x + MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, self.dtype, name="mlp")(h)


class PatchEmbeddings(nn.Module):
    cfg: ViTConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels):
        """pixels: [B, S, S, 3] -> [B, S/p, S/p, C] patch embeddings plus tiled position embeddings."""
        cfg = self.cfg
        p = cfg.patch_size
        x = nn.Conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=self.dtype,
                    name="projection")(pixels)
        return x


class ViTEmbeddings(nn.Module):
    cfg: ViTConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels):
        """pixels: [B, S, S, 3] -> [B, g, g, C]. Pretraining position embeddings are tiled, not interpolated."""
        cfg = self.cfg
        x = PatchEmbeddings(cfg, self.dtype, name="patch_embeddings")(pixels)
        n_pre = (cfg.pretrain_image_size // cfg.patch_size) ** 2
        pos = self.param("position_embeddings", nn.initializers.normal(0.02), (1, n_pre, cfg.hidden_size))
        side = int(round(n_pre ** 0.5))
        g_h, g_w = x.shape[1], x.shape[2]
        pos = pos.reshape(side, side, cfg.hidden_size)
        pos = jnp.tile(pos, (g_h // side + 1, g_w // side + 1, 1))[:g_h, :g_w]
        return x + pos.astype(x.dtype)[None]


class ViTBackbone(nn.Module):
    """HF `Sam3ViTModel`: pixels [B, S, S, 3] (channels-last) -> [B, g, g, C] with g = S / patch_size."""

    cfg: ViTConfig
    dtype: jnp.dtype = jnp.float32
    attn: AttentionPolicy = XLA

    @nn.compact
    def __call__(self, pixels):
        cfg = self.cfg
        x = ViTEmbeddings(cfg, self.dtype, name="embeddings")(pixels)
        x = layer_norm(cfg.layer_norm_eps, self.dtype, "layer_norm")(x)
        for i in range(cfg.num_hidden_layers):
            window = 0 if i in cfg.global_attn_indexes else cfg.window_size
            x = ViTLayer(cfg, window, self.dtype, self.attn, name=f"layers_{i}")(x)
        return x


class ConvTranspose2x(nn.Module):
    """torch ConvTranspose2d(kernel=2, stride=2). kernel stored [2, 2, out, in]. [B, H, W, in] -> [B, 2H, 2W, out]."""

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (2, 2, self.features, x.shape[-1]))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        b, h, w, _ = x.shape
        y = jnp.einsum("bijc,xyoc->bixjyo", x, kernel.astype(self.dtype))
        return y.reshape(b, 2 * h, 2 * w, self.features) + bias.astype(self.dtype)


class FPNLayer(nn.Module):
    """One neck level: rescale the ViT map by `scale` (4, 2, 1), then 1x1 and 3x3 convs to fpn_dim."""

    scale: float
    fpn_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        if self.scale == 4.0:
            x = ConvTranspose2x(c // 2, self.dtype, name="scale_layers_0")(x)
            x = jax.nn.gelu(x, approximate=False)
            x = ConvTranspose2x(c // 4, self.dtype, name="scale_layers_2")(x)
        elif self.scale == 2.0:
            x = ConvTranspose2x(c // 2, self.dtype, name="scale_layers_0")(x)
        elif self.scale != 1.0:
            raise ValueError(f"unsupported FPN scale {self.scale}")
        x = nn.Conv(self.fpn_dim, (1, 1), dtype=self.dtype, name="proj1")(x)
        return nn.Conv(self.fpn_dim, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name="proj2")(x)


class VisionNeck(nn.Module):
    """HF `Sam3VisionNeck`, levels 4x, 2x, 1x only: SAM3's text path drops the 0.5x level, so it is not computed."""

    cfg: VisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        """x: [B, g, g, C_vit] -> [ [B, 4g, 4g, D], [B, 2g, 2g, D], [B, g, g, D] ]."""
        return [FPNLayer(s, self.cfg.fpn_hidden_size, self.dtype, name=f"fpn_layers_{i}")(x)
                for i, s in enumerate(self.cfg.scale_factors[:3])]


class VisionEncoder(nn.Module):
    """HF `Sam3VisionModel`: pixel_values [B, 3, S, S] -> list of 3 FPN maps (see VisionNeck)."""

    cfg: VisionConfig
    dtype: jnp.dtype = jnp.float32
    attn: AttentionPolicy = XLA

    @nn.compact
    def __call__(self, pixel_values):
        pixels = jnp.transpose(pixel_values, (0, 2, 3, 1)).astype(self.dtype)
        x = ViTBackbone(self.cfg.backbone, self.dtype, self.attn, name="backbone")(pixels)
        return VisionNeck(self.cfg, self.dtype, name="neck")(x)
