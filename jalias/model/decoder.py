"""DETR-style decoder with presence token, iterative box refinement and box relative-position bias
(HF `Sam3DetrDecoder`), plus the box head applied to its output.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from .config import TransformerConfig
from .layers import (MLP, XLA, Attention, AttentionPolicy, DecoderMLP, box_cxcywh_to_xyxy, inverse_sigmoid,
                     layer_norm, sine_embed_boxes)

PRESENCE_CLAMP = 10.0


class DecoderLayer(nn.Module):
    """Post-norm layer: self-attn, text cross-attn, vision cross-attn (with box RPB bias), MLP.

    x: [B, 1+Q, D] (presence token first); query_pos: [B, Q, D]; text: [B, T, D]; vision/vision_pos: [B, HW, D].
    """

    cfg: TransformerConfig
    dtype: jnp.dtype = jnp.float32
    attn: AttentionPolicy = XLA

    @nn.compact
    def __call__(self, x, query_pos, text, text_bias, vision, vision_pos, rpb):
        cfg, dt = self.cfg, self.dtype
        attn = lambda name: Attention(cfg.hidden_size, cfg.num_attention_heads, dt, attn=self.attn, name=name)
        ln = lambda name: layer_norm(1e-5, dt, name)
        qp = jnp.pad(query_pos, ((0, 0), (1, 0), (0, 0))).astype(x.dtype)  # presence token has no position
        q = x + qp
        x = ln("self_attn_layer_norm")(x + attn("self_attn")(q, q, x))
        x = ln("text_cross_attn_layer_norm")(x + attn("text_cross_attn")(x + qp, text, text, text_bias))
        key = vision + vision_pos.astype(vision.dtype)
        x = ln("vision_cross_attn_layer_norm")(x + attn("vision_cross_attn")(x + qp, key, vision, rpb))
        x = x + MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, dt, name="mlp")(x)
        return ln("mlp_layer_norm")(x)


class DetrDecoder(nn.Module):
    cfg: TransformerConfig
    dtype: jnp.dtype = jnp.float32
    attn: AttentionPolicy = XLA

    def setup(self):
        cfg, dt, d = self.cfg, self.dtype, self.cfg.hidden_size
        self.layers = [DecoderLayer(cfg, dt, self.attn) for _ in range(cfg.num_layers)]
        self.output_layer_norm = layer_norm(1e-5, dt, None)
        self.box_head = DecoderMLP(d, 4, 3, dt)
        self.query_embed = nn.Embed(cfg.num_queries, d)
        self.reference_points = nn.Embed(cfg.num_queries, 4)
        self.presence_token = nn.Embed(1, d)
        self.presence_head = DecoderMLP(d, 1, 3, dt)
        self.presence_layer_norm = layer_norm(1e-5, dt, None)
        self.ref_point_head = DecoderMLP(d, d, 2, dt)
        self.box_rpb_embed_x = DecoderMLP(d, cfg.num_attention_heads, 2, dt)
        self.box_rpb_embed_y = DecoderMLP(d, cfg.num_attention_heads, 2, dt)

    def rpb(self, boxes, height: int, width: int):
        """Box relative-position bias. boxes: [B, Q, 4] cxcywh in [0,1] -> [B, heads, 1+Q, H*W] (presence row 0)."""
        xyxy = box_cxcywh_to_xyxy(boxes)
        ys = jnp.arange(height, dtype=jnp.float32) / height
        xs = jnp.arange(width, dtype=jnp.float32) / width
        dy = ys[None, None, :, None] - xyxy[:, :, None, 1::2]  # [B, Q, H, 2]
        dx = xs[None, None, :, None] - xyxy[:, :, None, 0::2]  # [B, Q, W, 2]
        log_enc = lambda d: jnp.sign(d * 8) * jnp.log2(jnp.abs(d * 8) + 1.0) / math.log2(8)
        ey = self.box_rpb_embed_y(log_enc(dy).astype(self.dtype))  # [B, Q, H, heads]
        ex = self.box_rpb_embed_x(log_enc(dx).astype(self.dtype))  # [B, Q, W, heads]
        bias = ey[:, :, :, None, :] + ex[:, :, None, :, :]
        b, q = boxes.shape[:2]
        bias = bias.reshape(b, q, height * width, -1).transpose(0, 3, 1, 2)
        return jnp.pad(bias, ((0, 0), (0, 0), (1, 0), (0, 0)))

    def __call__(self, vision, vision_pos, text, text_bias, spatial: tuple[int, int], detach_boxes: bool = True):
        """vision: [B, HW, D] encoder output; text: [B, T, D]; text_bias: [B, 1, 1, T]. detach_boxes: stop the
        gradient at each layer's refined boxes, as SAM3 training does (False: exact derivatives, for search).

        Returns dict: hidden [B, Q, D] (last layer, output-normed), ref_boxes [B, Q, 4] (input boxes of the last
        layer, cxcywh), presence_logits [B, 1] (last layer, clamped to +-10).
        """
        b = vision.shape[0]
        d = self.cfg.hidden_size
        boxes = jnp.broadcast_to(jax.nn.sigmoid(self.reference_points.embedding), (b, self.cfg.num_queries, 4))
        x = jnp.concatenate([self.presence_token.embedding, self.query_embed.embedding], 0)
        x = jnp.broadcast_to(x.astype(self.dtype), (b, 1 + self.cfg.num_queries, d))
        for i, layer in enumerate(self.layers):
            query_pos = self.ref_point_head(sine_embed_boxes(boxes, d // 2).astype(self.dtype))
            rpb = self.rpb(boxes, *spatial)
            x = layer(x, query_pos, text, text_bias, vision, vision_pos, rpb)
            hidden = self.output_layer_norm(x[:, 1:])
            ref_in = boxes
            if i < len(self.layers) - 1:  # the last refinement is recomputed by the caller via `boxes`
                boxes = jax.nn.sigmoid(inverse_sigmoid(boxes) + self.box_head(hidden).astype(jnp.float32))
                if detach_boxes:
                    boxes = jax.lax.stop_gradient(boxes)
        presence = self.presence_head(self.presence_layer_norm(x[:, :1]))[..., 0]
        presence = jnp.clip(presence.astype(jnp.float32), -PRESENCE_CLAMP, PRESENCE_CLAMP)
        return {"hidden": hidden, "ref_boxes": ref_in, "presence_logits": presence}

    def boxes(self, hidden, ref_boxes):
        """Final boxes: sigmoid(inverse_sigmoid(ref) + box_head(hidden)) -> xyxy [B, Q, 4] in [0, 1]."""
        cxcywh = jax.nn.sigmoid(inverse_sigmoid(ref_boxes) + self.box_head(hidden).astype(jnp.float32))
        return box_cxcywh_to_xyxy(cxcywh)
