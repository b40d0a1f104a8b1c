"""CLIP text encoder (causal, context 32) as used by SAM3 (HF `CLIPTextModelWithProjection.text_model`).

Supports prefix key/value caching: because attention is causal, the hidden states and keys/values of a prefix
do not depend on what follows, so many candidates sharing a prefix can reuse them
(`TextEncoder.__call__(..., past=...)`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from .config import TextConfig
from .layers import MASK_VALUE, MLP, XLA, AttentionPolicy, attend, dense, layer_norm

KV = tuple[jax.Array, jax.Array]  # keys, values: [B, P, N, H] each


class CausalSelfAttention(nn.Module):
    """x: [B, T, C] at absolute positions start..start+T; past: cached (k, v) for positions 0..start-1."""

    cfg: TextConfig
    dtype: jnp.dtype = jnp.float32
    attn: AttentionPolicy = XLA

    @nn.compact
    def __call__(self, x, key_valid, past: KV | None = None):
        """key_valid: bool [B, P+T] over all key positions (padding mask). Returns (out [B, T, C], (k, v))."""
        c, n = self.cfg.hidden_size, self.cfg.num_attention_heads
        split = lambda t: t.reshape(*t.shape[:-1], n, c // n)
        q = split(dense(c, self.dtype, "q_proj")(x))
        k = split(dense(c, self.dtype, "k_proj")(x))
        v = split(dense(c, self.dtype, "v_proj")(x))
        if past is not None:
            pk, pv = past
            b = q.shape[0]
            k = jnp.concatenate([jnp.broadcast_to(pk, (b, *pk.shape[1:])).astype(k.dtype), k], axis=1)
            v = jnp.concatenate([jnp.broadcast_to(pv, (b, *pv.shape[1:])).astype(v.dtype), v], axis=1)
        t, s = q.shape[1], k.shape[1]
        q_pos = jnp.arange(t) + (s - t)
        allowed = (jnp.arange(s)[None, :] <= q_pos[:, None])[None] & key_valid[:, None, :].astype(bool)  # [B,T,S]
        bias = jnp.where(allowed, 0.0, MASK_VALUE)[:, None]  # [B, 1, T, S]
        out = attend(q, k, v, bias, self.attn)
        out = dense(c, self.dtype, "out_proj")(out.reshape(*out.shape[:-2], c))
        return out, (k, v)


class TextLayer(nn.Module):
    cfg: TextConfig
    dtype: jnp.dtype = jnp.float32
    attn: AttentionPolicy = XLA

    @nn.compact
    def __call__(self, x, key_valid, past=None):
        cfg = self.cfg
        h = layer_norm(cfg.layer_norm_eps, self.dtype, "layer_norm1")(x)
        h, kv = CausalSelfAttention(cfg, self.dtype, self.attn, name="self_attn")(h, key_valid, past)
        x = x + h
        h = layer_norm(cfg.layer_norm_eps, self.dtype, "layer_norm2")(x)
        x = x + MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, self.dtype, name="mlp")(h)
        return x, kv


class TextEmbeddings(nn.Module):
    cfg: TextConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.token_embedding = nn.Embed(self.cfg.vocab_size, self.cfg.hidden_size)
        self.position_embedding = nn.Embed(self.cfg.max_position_embeddings, self.cfg.hidden_size)

    def __call__(self, tokens_embeds, start: int = 0):
        """tokens_embeds: [B, T, C] token embeddings at positions start..start+T -> + position embeddings."""
        t = tokens_embeds.shape[1]
        pos = self.position_embedding.embedding[start:start + t]
        return (tokens_embeds + pos[None]).astype(self.dtype)

    def lookup(self, ids):
        """ids: int [B, T] -> [B, T, C] token embeddings."""
        return self.token_embedding(ids)

    def table(self):
        """The token embedding matrix [V, C]."""
        return self.token_embedding.embedding


class TextEncoderLayers(nn.Module):
    cfg: TextConfig
    dtype: jnp.dtype = jnp.float32
    attn: AttentionPolicy = XLA

    @nn.compact
    def __call__(self, x, key_valid, past=None):
        kvs = []
        for i in range(self.cfg.num_hidden_layers):
            x, kv = TextLayer(self.cfg, self.dtype, self.attn, name=f"layers_{i}")(
                x, key_valid, None if past is None else past[i])
            kvs.append(kv)
        return x, kvs


class TextTransformer(nn.Module):
    """HF `CLIPTextTransformer` (the `text_model` inside `CLIPTextModelWithProjection`)."""

    cfg: TextConfig
    dtype: jnp.dtype = jnp.float32
    attn: AttentionPolicy = XLA

    def setup(self):
        self.embeddings = TextEmbeddings(self.cfg, self.dtype)
        self.encoder = TextEncoderLayers(self.cfg, self.dtype, self.attn)
        self.final_layer_norm = layer_norm(self.cfg.layer_norm_eps, self.dtype, None)

    def __call__(self, token_embeds, attention_mask, start: int = 0, past=None):
        """Run positions start..start+T.

        token_embeds: [B, T, C] (from `lookup` or continuous soft-prompt embeddings); attention_mask: [B, P+T]
        (1 = real token) over ALL positions so far; past: per-layer cached (k, v) for positions 0..start-1.
        Returns (last_hidden_state [B, T, C] after final_layer_norm, per-layer (k, v) for positions 0..start+T-1).
        """
        x = self.embeddings(token_embeds, start)
        x, kvs = self.encoder(x, attention_mask, past)
        return self.final_layer_norm(x), kvs

    def lookup(self, ids):
        return self.embeddings.lookup(ids)

    def table(self):
        return self.embeddings.table()


class TextEncoder(nn.Module):
    """HF `CLIPTextModelWithProjection`: holds `text_model` (CLIP's own projection is unused by SAM3)."""

    cfg: TextConfig
    dtype: jnp.dtype = jnp.float32
    attn: AttentionPolicy = XLA

    def setup(self):
        self.text_model = TextTransformer(self.cfg, self.dtype, self.attn)

    def __call__(self, token_embeds, attention_mask, start: int = 0, past=None):
        return self.text_model(token_embeds, attention_mask, start, past)

    def lookup(self, ids):
        return self.text_model.lookup(ids)

    def table(self):
        return self.text_model.table()
