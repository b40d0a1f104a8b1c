"""DETR-style fusion encoder (HF `Sam3DetrEncoder`): image tokens self-attend, then cross-attend to the prompt.

Only the finest used FPN level (1x, g x g tokens) enters the encoder, as in SAM3's text path. The first
layer's self-attention block sees no prompt, so the engine computes it once per image (`first_self_block`).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from .config import TransformerConfig
from .layers import MLP, XLA, Attention, AttentionPolicy, layer_norm


class EncoderLayer(nn.Module):
    cfg: TransformerConfig
    dtype: jnp.dtype = jnp.float32
    attn: AttentionPolicy = XLA

    def setup(self):
        cfg, dt = self.cfg, self.dtype
        self.layer_norm1 = layer_norm(1e-5, dt, None)
        self.self_attn = Attention(cfg.hidden_size, cfg.num_attention_heads, dt, attn=self.attn)
        self.layer_norm2 = layer_norm(1e-5, dt, None)
        self.cross_attn = Attention(cfg.hidden_size, cfg.num_attention_heads, dt, attn=self.attn)
        self.layer_norm3 = layer_norm(1e-5, dt, None)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, dt)

    def self_block(self, x, pos):
        """x: [B, HW, D], pos: [1 or B, HW, D] -> x + SelfAttn(LN(x) + pos) (prompt-independent)."""
        h = self.layer_norm1(x)
        hp = h + pos.astype(h.dtype)
        return x + self.self_attn(hp, hp, h)

    def prompt_block(self, x, prompt, prompt_bias):
        """Cross-attention to the prompt [B, T, D] (bias [B, 1, 1, T]) and the MLP. [B, HW, D] -> [B, HW, D]."""
        x = x + self.cross_attn(self.layer_norm2(x), prompt, prompt, prompt_bias)
        return x + self.mlp(self.layer_norm3(x))

    def __call__(self, x, pos, prompt, prompt_bias):
        return self.prompt_block(self.self_block(x, pos), prompt, prompt_bias)


class DetrEncoder(nn.Module):
    cfg: TransformerConfig
    dtype: jnp.dtype = jnp.float32
    attn: AttentionPolicy = XLA

    def setup(self):
        self.layers = [EncoderLayer(self.cfg, self.dtype, self.attn) for _ in range(self.cfg.num_layers)]

    def first_self_block(self, x, pos):
        """Layer 0's prompt-independent block: x [B, HW, D] -> [B, HW, D]."""
        return self.layers[0].self_block(x, pos)

    def __call__(self, x, pos, prompt, prompt_bias, first_done: bool = False):
        """x: [B, HW, D] image tokens (or the output of `first_self_block` if first_done) -> [B, HW, D]."""
        for i, layer in enumerate(self.layers):
            if i == 0 and first_done:
                x = layer.prompt_block(x, prompt, prompt_bias)
            else:
                x = layer(x, pos, prompt, prompt_bias)
        return x
