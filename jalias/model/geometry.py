"""The geometry (box-prompt) encoder's text-prompt path: the CLS token Meta's SAM3 appends to every prompt.

For a text-only prompt, Meta's `Sam3Image._encode_prompt` still runs `SequenceGeometryEncoder` on an empty
geometric prompt. With no boxes or points, its sequence is the CLS embedding alone, which goes through
final_proj -> LayerNorm -> `num_layers` pre-norm layers (self-attention over the one token, cross-attention to
the 1x FPN features with their sine position embedding added to the keys, ReLU MLP) -> LayerNorm. The result,
one token [B, 1, D], is appended after the text tokens of the prompt that the fusion encoder, decoder, scoring
and mask head read. transformers' `Sam3Model` skips this when there are no boxes ("hf" prompt mode).

The token depends on the image only, so it is part of the image context (`Sam3Module.encode_image`) and the
engine computes it once per image. Module and parameter names follow HF's `Sam3GeometryEncoder`
(`cls_embed`, `final_proj`, `prompt_layer_norm`, `layers.{i}.{self_attn,cross_attn,mlp,layer_norm1..3}`,
`output_layer_norm`); the box-only weights (`label_embed`, `boxes_*`, `vision_layer_norm`) are not used.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from .config import GeometryConfig
from .layers import MLP, XLA, Attention, AttentionPolicy, dense, layer_norm


class GeometryLayer(nn.Module):
    """Pre-norm layer (HF `Sam3GeometryEncoderLayer`, Meta `TransformerEncoderLayer.forward_pre`).

    x: [B, P, D] prompt tokens (all valid); vision, vision_pos: [B or 1, HW, D] -> [B, P, D].
    """

    cfg: GeometryConfig
    dtype: jnp.dtype = jnp.float32
    attn: AttentionPolicy = XLA

    def setup(self):
        cfg, dt = self.cfg, self.dtype
        eps = cfg.layer_norm_eps
        self.layer_norm1 = layer_norm(eps, dt, None)
        self.self_attn = Attention(cfg.hidden_size, cfg.num_attention_heads, dt, attn=self.attn)
        self.layer_norm2 = layer_norm(eps, dt, None)
        self.cross_attn = Attention(cfg.hidden_size, cfg.num_attention_heads, dt, attn=self.attn)
        self.layer_norm3 = layer_norm(eps, dt, None)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, dt)

    def __call__(self, x, vision, vision_pos):
        h = self.layer_norm1(x)
        x = x + self.self_attn(h, h, h)
        h = self.layer_norm2(x)
        b = x.shape[0]
        key = jnp.broadcast_to(vision + vision_pos.astype(vision.dtype), (b, *vision.shape[1:]))
        x = x + self.cross_attn(h, key, jnp.broadcast_to(vision, key.shape))
        return x + self.mlp(self.layer_norm3(x))


class GeometryEncoder(nn.Module):
    """CLS-only geometry encoder: `cls_token(vision [B, HW, D], vision_pos [1 or B, HW, D]) -> [B, 1, D]`."""

    cfg: GeometryConfig
    dtype: jnp.dtype = jnp.float32
    attn: AttentionPolicy = XLA

    def setup(self):
        cfg, dt = self.cfg, self.dtype
        self.cls_embed = nn.Embed(1, cfg.hidden_size)
        self.final_proj = dense(cfg.hidden_size, dt, None)
        self.prompt_layer_norm = layer_norm(cfg.layer_norm_eps, dt, None)
        self.layers = [GeometryLayer(cfg, dt, self.attn) for _ in range(cfg.num_layers)]
        self.output_layer_norm = layer_norm(cfg.layer_norm_eps, dt, None)

    def cls_token(self, vision, vision_pos):
        """vision: raw (un-normed) 1x FPN tokens [B, HW, D]; vision_pos: their sine embedding -> CLS [B, 1, D]."""
        b = vision.shape[0]
        x = jnp.broadcast_to(self.cls_embed.embedding[None].astype(self.dtype), (b, 1, self.cfg.hidden_size))
        x = self.prompt_layer_norm(self.final_proj(x))
        for layer in self.layers:
            x = layer(x, vision, vision_pos)
        return self.output_layer_norm(x)

    def __call__(self, vision, vision_pos):
        return self.cls_token(vision, vision_pos)
