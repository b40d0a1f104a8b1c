"""Model configuration mirroring `transformers.Sam3Config` (plain dataclasses, no transformers import).

`Sam3Config.from_hf_dict(d)` reads the nested dict that `Sam3Config.to_dict()` / `config.json` holds, so a
Hugging Face checkpoint's config works unchanged. Only fields that affect the text-prompted image path are kept.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ViTConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4736
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 1008
    patch_size: int = 14
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    window_size: int = 24
    global_attn_indexes: tuple[int, ...] = (7, 15, 23, 31)
    pretrain_image_size: int = 336
    rope_theta: float = 10000.0

    @property
    def grid(self) -> int:
        """Patches per side of the input image."""
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class VisionConfig:
    backbone: ViTConfig = field(default_factory=ViTConfig)
    fpn_hidden_size: int = 256
    scale_factors: tuple[float, ...] = (4.0, 2.0, 1.0, 0.5)


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 49408
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    max_position_embeddings: int = 32
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512  # CLIP's own projection: carried in checkpoints, unused by SAM3's text path


@dataclass(frozen=True)
class TransformerConfig:
    """Shared by the DETR encoder, DETR decoder and (partly) the mask decoder."""

    hidden_size: int = 256
    num_layers: int = 6
    num_attention_heads: int = 8
    intermediate_size: int = 2048
    hidden_act: str = "relu"
    num_queries: int = 200  # decoder only


@dataclass(frozen=True)
class MaskDecoderConfig:
    hidden_size: int = 256
    num_upsampling_stages: int = 3
    num_attention_heads: int = 8


@dataclass(frozen=True)
class GeometryConfig:
    """The geometry (box-prompt) encoder as text prompts use it: its CLS token through `num_layers` pre-norm
    layers (self-attention, cross-attention to the 1x image features, MLP). Meta's builder: 3 layers, 8 heads,
    d 256, MLP 2048, relu; every LayerNorm there is torch's default eps 1e-5 (HF's config says 1e-6 but its
    geometry encoder never reads it), so `layer_norm_eps` is not taken from an HF dict."""

    hidden_size: int = 256
    num_layers: int = 3
    num_attention_heads: int = 8
    intermediate_size: int = 2048
    hidden_act: str = "relu"
    layer_norm_eps: float = 1e-5


# to_hf_dict marks a config without geometry weights inside its geometry_encoder_config (HF keeps unknown keys)
_NO_GEOMETRY = "jalias_unused"


@dataclass(frozen=True)
class Sam3Config:
    """geometry: None for a model without the geometry encoder's weights (only prompt_mode="hf" can run it);
    HF and Meta checkpoints always carry them."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    encoder: TransformerConfig = field(default_factory=TransformerConfig)
    decoder: TransformerConfig = field(default_factory=TransformerConfig)
    mask_decoder: MaskDecoderConfig = field(default_factory=MaskDecoderConfig)
    geometry: GeometryConfig | None = None
    hf: dict = field(default_factory=dict, compare=False, hash=False, repr=False)  # the original HF dict

    @property
    def image_size(self) -> int:
        return self.vision.backbone.image_size

    @property
    def context_length(self) -> int:
        return self.text.max_position_embeddings

    # ---- (de)serialisation -------------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "Sam3Config":
        """Build from a `Sam3Config.to_dict()` / HF `config.json` dict (sub-configs may be partial)."""
        if "detector_config" in d and d["detector_config"]:  # a sam3_video config wraps the image model
            d = d["detector_config"]
        vis = dict(d.get("vision_config") or {})
        bb = dict(vis.get("backbone_config") or {})
        rope = bb.get("rope_parameters") or {}
        vit = _pick(ViTConfig, bb, rope_theta=rope.get("rope_theta", 10000.0))
        if bb.get("global_attn_indexes") is not None:
            vit = dataclasses.replace(vit, global_attn_indexes=tuple(bb["global_attn_indexes"]))
        vision = VisionConfig(
            backbone=vit,
            fpn_hidden_size=vis.get("fpn_hidden_size", 256),
            scale_factors=tuple(vis.get("scale_factors") or (4.0, 2.0, 1.0, 0.5)),
        )
        text = _pick(TextConfig, {**_HF_TEXT_DEFAULTS, **(d.get("text_config") or {})})
        enc = _pick(TransformerConfig, d.get("detr_encoder_config") or {})
        dec = _pick(TransformerConfig, d.get("detr_decoder_config") or {})
        mask = _pick(MaskDecoderConfig, d.get("mask_decoder_config") or {})
        geo_d = dict(d.get("geometry_encoder_config") or {})
        geo_d.pop("layer_norm_eps", None)
        geo = None if not geo_d or geo_d.get(_NO_GEOMETRY) else _pick(GeometryConfig, geo_d)
        cfg = cls(vision=vision, text=text, encoder=enc, decoder=dec, mask_decoder=mask, geometry=geo, hf=dict(d))
        cfg.validate()
        return cfg

    def to_hf_dict(self) -> dict[str, Any]:
        """A dict `transformers.Sam3Config(**d)` accepts (used to build the torch reference in tests)."""
        vit = dataclasses.asdict(self.vision.backbone)
        theta = vit.pop("rope_theta")
        vit.update(model_type="sam3_vit_model", global_attn_indexes=list(vit["global_attn_indexes"]),
                   rope_parameters={"rope_theta": theta, "rope_type": "axial"})
        g = self.vision.backbone.grid
        s = self.vision.scale_factors
        return {
            "vision_config": {
                "backbone_config": vit,
                "fpn_hidden_size": self.vision.fpn_hidden_size,
                "scale_factors": list(s),
                "backbone_feature_sizes": [[int(g * f), int(g * f)] for f in s[:3]],
            },
            "text_config": {**dataclasses.asdict(self.text), "model_type": "clip_text_model"},
            "detr_encoder_config": _drop(dataclasses.asdict(self.encoder), "num_queries"),
            "detr_decoder_config": dataclasses.asdict(self.decoder),
            "mask_decoder_config": dataclasses.asdict(self.mask_decoder),
            "geometry_encoder_config": self._geometry_hf_dict(),
        }

    def _geometry_hf_dict(self) -> dict:
        if self.geometry is not None:
            return _drop(dataclasses.asdict(self.geometry), "layer_norm_eps")
        # HF's Sam3Model always builds a geometry encoder: give it one, marked as carrying no jalias weights
        base = {k: v for k, v in (self.hf.get("geometry_encoder_config") or {}).items()
                if k in ("hidden_size", "num_layers", "num_attention_heads", "intermediate_size")}
        return {"hidden_size": self.encoder.hidden_size, "num_layers": 1,
                "num_attention_heads": self.encoder.num_attention_heads,
                "intermediate_size": self.encoder.intermediate_size, **base, _NO_GEOMETRY: True}

    def to_json(self) -> str:
        return json.dumps(self.to_hf_dict(), indent=2)

    @classmethod
    def from_json_file(cls, path: str | Path) -> "Sam3Config":
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read SAM3 config {path}: {e}") from None
        return cls.from_hf_dict(d)

    def validate(self) -> None:
        v, t = self.vision.backbone, self.text
        checks = [
            (v.image_size % v.patch_size == 0, f"image_size {v.image_size} not divisible by patch_size {v.patch_size}"),
            (v.hidden_size % v.num_attention_heads == 0, "vision hidden_size not divisible by heads"),
            (t.hidden_size % t.num_attention_heads == 0, "text hidden_size not divisible by heads"),
            (self.encoder.hidden_size == self.decoder.hidden_size == self.mask_decoder.hidden_size
             == self.vision.fpn_hidden_size, "DETR/mask/FPN hidden sizes must agree"),
            (self.geometry is None or self.geometry.hidden_size == self.encoder.hidden_size,
             "geometry encoder hidden size must equal the DETR hidden size"),
            (tuple(self.vision.scale_factors[:3]) == (4.0, 2.0, 1.0),
             f"scale_factors must start with 4, 2, 1 (got {self.vision.scale_factors})"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"invalid SAM3 config: {msg}")


_HF_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, projection_dim=512,
                         num_hidden_layers=24, num_attention_heads=16, max_position_embeddings=32,
                         hidden_act="gelu")


def _pick(cls, d: dict, **extra):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in {**d, **extra}.items() if k in names})


def _drop(d: dict, *keys) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


def tiny_config(image_size: int = 56, width: int = 32, queries: int = 8, window: int = 2) -> Sam3Config:
    """A small config (CPU-fast) with every stage present: 2 ViT layers (one windowed, one global), etc."""
    return Sam3Config(
        vision=VisionConfig(
            backbone=ViTConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                               num_attention_heads=2, image_size=image_size, patch_size=14, window_size=window,
                               global_attn_indexes=(1,), pretrain_image_size=28),
            fpn_hidden_size=width),
        text=TextConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                        num_attention_heads=2, projection_dim=width),
        encoder=TransformerConfig(hidden_size=width, num_layers=1, num_attention_heads=2, intermediate_size=2 * width),
        decoder=TransformerConfig(hidden_size=width, num_layers=2, num_attention_heads=2, intermediate_size=2 * width,
                                  num_queries=queries),
        mask_decoder=MaskDecoderConfig(hidden_size=width, num_attention_heads=2),
    )


def meta_config() -> Sam3Config:
    """The config of Meta's released `sam3.pt`, every size and constant as `sam3.model_builder` (sam3 0.1.4)
    builds it: ViT 1008 px / patch 14 / 1024 wide / 32 blocks / 16 heads / MLP ratio 4.625 / window 24 / global
    blocks 7, 15, 23, 31 / pretrain 336 / RoPE theta 10000 / LayerNorm eps 1e-5 (`vitdet.py`:
    `partial(nn.LayerNorm, eps=1e-5)`; transformers' port says 1e-6); CLIP text 1024 wide / 24 layers / 16 heads /
    context 32 / eps 1e-5; d 256 everywhere after the backbone; fusion encoder 6 layers, decoder 6 layers and 200
    queries, 8 heads, MLP 2048, relu; geometry encoder 3 layers (its CLS path). sam3.pt carries no config."""
    return Sam3Config(
        vision=VisionConfig(
            backbone=ViTConfig(hidden_size=1024, intermediate_size=int(1024 * 4.625), num_hidden_layers=32,
                               num_attention_heads=16, image_size=1008, patch_size=14, hidden_act="gelu",
                               layer_norm_eps=1e-5, window_size=24, global_attn_indexes=(7, 15, 23, 31),
                               pretrain_image_size=336, rope_theta=10000.0),
            fpn_hidden_size=256, scale_factors=(4.0, 2.0, 1.0, 0.5)),
        text=TextConfig(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                        num_attention_heads=16, max_position_embeddings=32, hidden_act="gelu", layer_norm_eps=1e-5,
                        projection_dim=512),
        encoder=TransformerConfig(hidden_size=256, num_layers=6, num_attention_heads=8, intermediate_size=2048,
                                  hidden_act="relu"),
        decoder=TransformerConfig(hidden_size=256, num_layers=6, num_attention_heads=8, intermediate_size=2048,
                                  hidden_act="relu", num_queries=200),
        mask_decoder=MaskDecoderConfig(hidden_size=256, num_upsampling_stages=3, num_attention_heads=8),
        geometry=GeometryConfig(hidden_size=256, num_layers=3, num_attention_heads=8, intermediate_size=2048,
                                hidden_act="relu", layer_norm_eps=1e-5),
    )
