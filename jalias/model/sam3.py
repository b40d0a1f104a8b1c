"""SAM3 image model for text prompts: the Flax module and the loaded-model wrapper.

Stages (each separately callable so the engine can cache the image side):
  encode_image(pixel_values [B,3,S,S])            -> image context (FPN maps + layer-0 encoder self-attention,
                                                     and in "meta" prompt mode the geometry CLS token)
  encode_text(token_embeds [B,T,Ct], mask [B,T])  -> prompt features [B, T, D] (CLIP -> text_projection)
  detect(image context, prompt [B,T,D], mask)     -> pred_logits, pred_boxes, presence_logits, pred_masks, ...
An image context with batch 1 broadcasts against a batch of prompts.

Prompt modes (`PROMPT_MODES`):
  "meta": Meta's SAM3 (`sam3` package, what SAM3 was trained and evaluated with): the geometry encoder's CLS
          token (`geometry.py`, one per image) is appended to every text prompt, and token id 0 (CLIP's "!") is
          masked out of the prompt that fusion, decoder, scoring and mask head read, as Meta's `ids != 0` mask
          does (CLIP itself still reads it, as in Meta). Needs the geometry encoder's weights (config.geometry).
  "hf":   transformers' `Sam3Model`: the text tokens alone, every token up to END valid.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .config import Sam3Config
from .decoder import DetrDecoder
from .encoder import DetrEncoder
from .geometry import GeometryEncoder
from .heads import DotProductScoring, MaskDecoder
from .layers import XLA, AttentionPolicy, choose_policy, dense, key_padding_bias, sine_embed_2d
from .text import TextEncoder
from .vision import VisionEncoder


PROMPT_MODES = ("meta", "hf")
PAD_ID_META = 0  # Meta's tokenizer pads with 0 and its prompt mask is `ids != 0`


def check_prompt_mode(mode: str, config: Sam3Config) -> str:
    if mode not in PROMPT_MODES:
        raise ValueError(f"prompt_mode must be one of {', '.join(PROMPT_MODES)}, got {mode!r}")
    if mode == "meta" and config.geometry is None:
        raise ValueError("prompt_mode 'meta' needs the geometry encoder's weights, which this model lacks (a "
                         "checkpoint converted by an older jalias, or a config without `geometry`): re-convert "
                         "it from the HF/Meta source, or use prompt_mode 'hf'")
    return mode


def default_prompt_mode(config: Sam3Config) -> str:
    """"meta" (Meta's own behaviour) when the model has the geometry encoder, else "hf"."""
    return "meta" if config.geometry is not None else "hf"


def prompt_mask(input_ids, attention_mask, mode: str):
    """The mask of the prompt that fusion/decoder/scoring/mask head read: the CLIP mask, and in "meta" mode
    also 0 where the id is 0 (Meta's `ids != 0`). ids/mask [B, T] (numpy or jax) -> same type, mask's dtype."""
    if mode != "meta":
        return attention_mask
    xp = np if isinstance(attention_mask, np.ndarray) else jnp
    return attention_mask * (xp.asarray(input_ids) != PAD_ID_META).astype(attention_mask.dtype)


class Sam3Module(nn.Module):
    """prompt_mode: "hf" (default here, the low-level module) or "meta" (see the module docstring)."""

    cfg: Sam3Config
    dtype: jnp.dtype = jnp.float32
    attn: AttentionPolicy = XLA
    prompt_mode: str = "hf"

    def setup(self):
        cfg, dt = self.cfg, self.dtype
        check_prompt_mode(self.prompt_mode, cfg)
        if cfg.geometry is not None:
            self.geometry_encoder = GeometryEncoder(cfg.geometry, dt, self.attn)
        self.vision_encoder = VisionEncoder(cfg.vision, dt, self.attn)
        self.text_encoder = TextEncoder(cfg.text, dt, self.attn)
        self.text_projection = dense(cfg.encoder.hidden_size, dt, None)
        self.detr_encoder = DetrEncoder(cfg.encoder, dt, self.attn)
        self.detr_decoder = DetrDecoder(cfg.decoder, dt, self.attn)
        self.mask_decoder = MaskDecoder(cfg.mask_decoder, dt, self.attn)
        self.dot_product_scoring = DotProductScoring(cfg.decoder, dt)

    # ---- image side (computed once per image) -----------------------------------------------------------------
    def encoder_pos(self) -> np.ndarray:
        """Sine position embedding of the 1x level, flattened: [1, g*g, D] (a constant)."""
        g, d = self.cfg.vision.backbone.grid, self.cfg.encoder.hidden_size
        return sine_embed_2d(g, g, d // 2, normalize=True).reshape(1, g * g, d)

    def encode_image(self, pixel_values):
        """pixel_values [B, 3, S, S] -> image context, all prompt-independent (cached by the engine):
        "fpn": [4x, 2x, 1x] maps [B, h, w, D]; "enc0": the detr encoder's first self-attention block on the 1x
        tokens [B, g*g, D]; "terms": the pixel decoder's skip-conv terms [[B, 2g, 2g, D], [B, 4g, 4g, D]]; in
        "meta" mode also "geo": the geometry encoder's CLS token [B, 1, D] (appended to every prompt by `detect`).
        """
        fpn = self.vision_encoder(pixel_values)
        tokens = fpn[-1].reshape(fpn[-1].shape[0], -1, fpn[-1].shape[-1])
        enc0 = self.detr_encoder.first_self_block(tokens, self.encoder_pos())
        ctx = {"fpn": fpn, "enc0": enc0, "terms": self.mask_decoder.image_terms(fpn)}
        if self.prompt_mode == "meta":
            ctx["geo"] = self.geometry_encoder.cls_token(tokens, self.encoder_pos())
        return ctx

    # ---- prompt side --------------------------------------------------------------------------------------------
    def embed_tokens(self, ids):
        """ids int [B, T] -> CLIP token embeddings [B, T, Ct]."""
        return self.text_encoder.lookup(ids)

    def token_table(self):
        """CLIP token embedding matrix [V, Ct]."""
        return self.text_encoder.table()

    def encode_text(self, token_embeds, attention_mask, start: int = 0, past=None):
        """CLIP over positions start..start+T, then text_projection.

        token_embeds [B, T, Ct]; attention_mask [B, start+T] over all positions so far; past: cached per-layer
        (k, v) of positions < start. Returns (prompt features [B, T, D], per-layer (k, v) up to start+T).
        """
        hidden, kvs = self.text_encoder(token_embeds, attention_mask, start, past)
        return self.text_projection(hidden), kvs

    def text_features(self, input_ids, attention_mask):
        """input_ids [B, T] -> prompt features [B, T, D] (no cache)."""
        return self.encode_text(self.embed_tokens(input_ids), attention_mask)[0]

    # ---- fusion + heads -------------------------------------------------------------------------------------------
    def detect(self, image, prompt, prompt_mask, fast: bool = False, detach_boxes: bool = True):
        """image: context from `encode_image` (batch 1 or B); prompt [B, T, D]; prompt_mask [B, T] (1 = valid;
        in "meta" mode pass `prompt_mask(ids, mask, "meta")`). In "meta" mode the image's geometry CLS token is
        appended here: fusion, decoder, scoring and mask head read T + 1 prompt tokens.

        Returns dict: pred_logits [B, Q], pred_boxes [B, Q, 4] (xyxy, normalised), presence_logits [B, 1],
        pred_masks [B, Q, 4g, 4g] (logits), and semantic_seg [B, 1, 4g, 4g] unless fast. All float32.
        fast=True uses the engine's reordered mask decoder (same values up to float rounding). detach_boxes=False
        lets gradients flow through the decoder's box refinement (SAM3 detaches it; search wants exact gradients).
        """
        if fast:
            return self.detect_fast_parts(image, prompt, prompt_mask, detach_boxes)[0]
        out, parts = self.detect_scores(image, prompt, prompt_mask, detach_boxes)
        out["pred_masks"], out["semantic_seg"] = self.mask_decoder(parts["hidden"], image["fpn"], parts["enc"],
                                                                   parts["prompt"], parts["bias"])
        return out

    def detect_scores(self, image, prompt, prompt_mask, detach_boxes: bool = True):
        """Everything of `detect` but the mask head -> (out: pred_logits, pred_boxes, presence_logits; parts: what
        the mask head reads: hidden [B, Q, D], enc [B, g*g, D], prompt [B, T(+1), D], bias). The engine decides
        from the scores which rows need masks at all (`mask_pixels_fast` + `mask_logits_from` on those only)."""
        b = prompt.shape[0]
        g = self.cfg.vision.backbone.grid
        if self.prompt_mode == "meta":
            geo = jnp.broadcast_to(image["geo"].astype(prompt.dtype), (b, 1, prompt.shape[-1]))
            prompt = jnp.concatenate([prompt, geo], axis=1)
            prompt_mask = jnp.concatenate([prompt_mask, jnp.ones((b, 1), prompt_mask.dtype)], axis=1)
        bias = key_padding_bias(prompt_mask)
        pos = self.encoder_pos()
        enc0 = jnp.broadcast_to(image["enc0"].astype(self.dtype), (b, *image["enc0"].shape[1:]))
        enc = self.detr_encoder(enc0, pos, prompt, bias, first_done=True)
        pos_b = jnp.broadcast_to(jnp.asarray(pos), enc.shape)
        dec = self.detr_decoder(enc, pos_b, prompt, bias, (g, g), detach_boxes)
        out = {
            "pred_logits": self.dot_product_scoring(dec["hidden"], prompt, prompt_mask),
            "pred_boxes": self.detr_decoder.boxes(dec["hidden"], dec["ref_boxes"]),
            "presence_logits": dec["presence_logits"],
        }
        return out, {"hidden": dec["hidden"], "enc": enc, "prompt": prompt, "bias": bias}

    def mask_logits_fast(self, image, parts):
        """pred_masks [B, Q, 4g, 4g] from `detect_scores`' parts (B rows, any subset of its rows) and the image
        context's skip terms: the engine's reordered mask decoder."""
        return self.mask_logits_from(parts["hidden"], self.mask_pixels_fast(image, parts))

    def mask_pixels_fast(self, image, parts):
        """The query-independent half of `mask_logits_fast`: pixel embeddings [B, 4g, 4g, D] (most of its cost)."""
        g = self.cfg.vision.backbone.grid
        return self.mask_decoder.pixels_fast(image["terms"], parts["enc"], parts["prompt"], parts["bias"], (g, g))

    def mask_logits_from(self, hidden, pixels):
        """Decoder query states hidden [B, Q', D] (any subset of the queries) -> mask logits [B, Q', 4g, 4g]."""
        return self.mask_decoder.masks_from_pixels(hidden, pixels)

    def detect_fast(self, image, prompt, prompt_mask, detach_boxes: bool = True):
        return self.detect_fast_parts(image, prompt, prompt_mask, detach_boxes)[0]

    def detect_fast_parts(self, image, prompt, prompt_mask, detach_boxes: bool = True):
        """`detect_fast`'s outputs and the internal states they come from: (out, parts) as `detect_scores`
        returns them (parts: hidden [B, Q, D] decoder query states, enc [B, g*g, D] fused image tokens, ...), with
        out["pred_masks"] added. What adapter distillation reads (`jalias.adapt`)."""
        out, parts = self.detect_scores(image, prompt, prompt_mask, detach_boxes)
        out["pred_masks"] = self.mask_logits_fast(image, parts)
        return out, parts

    def __call__(self, pixel_values, input_ids, attention_mask):
        """Full forward, same inputs/outputs as transformers' Sam3Model (text prompts)."""
        image = self.encode_image(pixel_values)
        prompt, _ = self.encode_text(self.embed_tokens(input_ids), attention_mask)
        return self.detect(image, prompt, prompt_mask(input_ids, attention_mask, self.prompt_mode))


class Sam3:
    """A loaded SAM3: config + params + the Flax module, with jitted stage functions.

    `model(pixel_values, input_ids, attention_mask)` mirrors `transformers.Sam3Model(...)` outputs (as numpy-able
    jax arrays). `dtype="bfloat16"` computes in bf16 (params cast once); softmax/norm statistics stay fp32.
    attention: an `AttentionPolicy`, "xla", "cudnn" or "auto" (default: cuDNN's fused kernel on a GPU in bf16/fp16,
    the exact xla path otherwise; see `layers.choose_policy`).
    prompt_mode: "meta" (Meta's SAM3: geometry CLS token, id 0 masked) or "hf" (transformers' Sam3Model); None
    (default) is "meta" when the model has the geometry encoder's weights, else "hf" (see `PROMPT_MODES`).
    """

    def __init__(self, config: Sam3Config, params: Any, dtype: str | jnp.dtype = "float32",
                 attention: AttentionPolicy | str = "auto", prompt_mode: str | None = None):
        self.config = config
        self.prompt_mode = check_prompt_mode(default_prompt_mode(config) if prompt_mode is None else prompt_mode,
                                             config)
        self.dtype = jnp.dtype(dtype)
        if attention == "auto":
            attention = choose_policy(jax.default_backend(), self.dtype)
        elif isinstance(attention, str):
            attention = AttentionPolicy(attention)
        self.attention = attention
        self.module = Sam3Module(config, self.dtype, attention, self.prompt_mode)
        cast = (lambda x: jnp.asarray(x, self.dtype)) if self.dtype != jnp.float32 else jnp.asarray
        self.params = jax.tree_util.tree_map(cast, params)
        self._jit = {}

    def with_prompt_mode(self, mode: str | None) -> "Sam3":
        """The same weights (shared, not copied) in another prompt mode; self if mode is None or unchanged."""
        if mode is None or mode == self.prompt_mode:
            return self
        other = object.__new__(Sam3)
        other.__dict__.update(self.__dict__, _jit={}, prompt_mode=check_prompt_mode(mode, self.config))
        other.module = Sam3Module(self.config, self.dtype, self.attention, other.prompt_mode)
        return other

    def prompt_mask(self, input_ids, attention_mask):
        """The detect-side prompt mask for ids/mask [B, T] in this model's prompt mode (see `prompt_mask`)."""
        return prompt_mask(input_ids, attention_mask, self.prompt_mode)

    def apply(self, method: str, *args, params=None, **kwargs):
        """Un-jitted pure call of a stage: `apply("detect", image, prompt, mask)` (use inside your own jit)."""
        return self.module.apply({"params": self.params if params is None else params}, *args,
                                 method=getattr(Sam3Module, method), **kwargs)

    def _jitted(self, method: str):
        if method not in self._jit:
            self._jit[method] = jax.jit(lambda p, *a: self.apply(method, *a, params=p))
        return self._jit[method]

    def __call__(self, pixel_values, input_ids, attention_mask) -> dict:
        return self._jitted("__call__")(self.params, jnp.asarray(pixel_values), jnp.asarray(input_ids),
                                        jnp.asarray(attention_mask))

    def encode_image(self, pixel_values) -> dict:
        return self._jitted("encode_image")(self.params, jnp.asarray(pixel_values))

    def encode_text(self, input_ids, attention_mask):
        """Token ids [B, T] -> prompt features [B, T, D]."""
        return self._jitted("text_features")(self.params, jnp.asarray(input_ids), jnp.asarray(attention_mask))

    def detect(self, image: dict, prompt, prompt_mask) -> dict:
        return self._jitted("detect")(self.params, image, prompt, jnp.asarray(prompt_mask))

    def detect_fast(self, image: dict, prompt, prompt_mask) -> dict:
        return self._jitted("detect_fast")(self.params, image, prompt, jnp.asarray(prompt_mask))

    def detect_fast_parts(self, image: dict, prompt, prompt_mask) -> tuple[dict, dict]:
        return self._jitted("detect_fast_parts")(self.params, image, prompt, jnp.asarray(prompt_mask))

    @property
    def num_params(self) -> int:
        return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(self.params)))
