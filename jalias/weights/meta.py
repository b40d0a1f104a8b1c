"""Meta's original SAM3 checkpoint layout (``sam3.pt``) <-> Hugging Face ``transformers.Sam3Model`` state dict.

Where the key names come from
-----------------------------
* Meta side: the module tree built by ``sam3.model_builder.build_sam3_image_model`` /
  ``build_sam3_video_model`` in github.com/facebookresearch/sam3 (commit 99d02f28, Jan 2026; identical
  module names in the PyPI wheel ``sam3==0.1.4``). The key list was produced by instantiating that code
  on CPU (without weights) and printing ``state_dict()``; the test file hard-codes a sample of it.
* HF side: ``transformers==5.24.0`` ``Sam3Model`` (``models/sam3/modeling_sam3.py``).
* The correspondence follows ``ORIGINAL_TO_CONVERTED_KEY_MAPPING`` and ``split_qkv`` in
  github.com/huggingface/transformers ``src/transformers/models/sam3/convert_sam3_to_hf.py``, re-derived
  here as a bidirectional table and checked key-for-key (names and shapes) against both models at the
  default (SAM3-L, ~840M params) config.

Meta checkpoint container
-------------------------
``sam3.pt`` is the state dict of the *video* model: ``detector.*`` (the image model, which is what
``Sam3Model`` corresponds to) and ``tracker.*`` (SAM2-style tracker), possibly wrapped as
``{"model": state_dict}`` (``sam3/model_builder.py::_load_checkpoint`` accepts both). An image-model
state dict has no prefix. Both are accepted; ``sam3_model.`` (seen in HF's script) is stripped too.

Tensor transforms (everything else is a pure rename)
----------------------------------------------------
* fused attention input projections are split along dim 0 into q, k, v (in that order):
  ViT ``attn.qkv`` and every ``nn.MultiheadAttention`` ``in_proj_weight`` / ``in_proj_bias``.
* ViT ``pos_embed`` (1, 1+N, C) carries a cls-token slot that SAM3 never reads (``retain_cls_token=False``:
  ``vitdet.get_abs_pos`` drops it); HF keeps (1, N, C). ``hf_to_meta`` writes zeros into that slot, so
  Meta -> HF -> Meta is exact except for that unused row.
* CLIP ``text_projection`` is a raw (width, proj) matrix in Meta, an ``nn.Linear`` weight (proj, width) in HF.

Meta keys dropped by ``meta_to_hf`` (counted and logged, see ``DROPPED_META_KEYS``): the tracker, the
tracker's extra SAM2 neck (``sam2_convs``), the precomputed RoPE tables (``attn.freqs_cis``, complex64;
recomputed from the config) and the point-prompt projections of the geometry encoder (``Sam3Model``
supports only box prompts).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Container prefixes stripped from Meta keys before renaming.
META_PREFIXES = ("detector.", "sam3_model.")

# Meta keys for parts jalias does not use: pattern -> reason.
DROPPED_META_KEYS: dict[str, str] = {
    r"^tracker\.": "video tracker",
    r"^inst_interactive_predictor\.": "SAM1-style interactive predictor",
    # "interactive_convs" is the SAM 3.1 name of the same neck.
    r"^backbone\.vision_backbone\.(sam2|interactive)_convs\.": "tracker-only SAM2 neck",
    # complex64 in sam3.pt; SAM 3.1 code stores real/imag parts separately.
    r"^backbone\.vision_backbone\.trunk\.blocks\.\d+\.attn\.freqs_cis(_real|_imag)?$": "precomputed RoPE tables",
    r"^geometry_encoder\.points_(direct|pool|pos_enc)_project\.": "point-prompt encoder",
}
_DROPPED_RE = [(re.compile(p), why) for p, why in DROPPED_META_KEYS.items()]


@dataclass(frozen=True)
class _Rule:
    """One row of the table. Placeholders: {i} layer index, {p} weight|bias, {qkv} q|k|v (HF side only).

    kind: "rename" | "qkv" (Meta fused -> 3 HF keys) | "transpose" | "cls_pos" (see module docstring).
    hf_sibling: (template, must_exist) -- only for HF->Meta disambiguation of the FPN upsampling convs.
    """

    meta: str
    hf: str
    kind: str = "rename"
    hf_sibling: tuple[str, bool] | None = None


def _attention_rules(meta: str, hf: str, out_proj: str = "o_proj") -> list[_Rule]:
    """Rules for one torch ``nn.MultiheadAttention`` (fused in_proj) <-> HF q/k/v/o projections."""
    return [
        _Rule(meta + ".in_proj_{p}", hf + ".{qkv}_proj.{p}", "qkv"),
        _Rule(meta + ".out_proj.{p}", hf + f".{out_proj}.{{p}}"),
    ]


def _fusion_layer_rules(meta: str, hf: str) -> list[_Rule]:
    """Geometry-encoder / DETR-encoder layer (Meta ``TransformerEncoderLayer``)."""
    rules = _attention_rules(meta + ".self_attn", hf + ".self_attn")
    rules += _attention_rules(meta + ".cross_attn_image", hf + ".cross_attn")
    rules += [
        _Rule(meta + ".linear1.{p}", hf + ".mlp.fc1.{p}"),
        _Rule(meta + ".linear2.{p}", hf + ".mlp.fc2.{p}"),
        _Rule(meta + ".norm1.{p}", hf + ".layer_norm1.{p}"),
        _Rule(meta + ".norm2.{p}", hf + ".layer_norm2.{p}"),
        _Rule(meta + ".norm3.{p}", hf + ".layer_norm3.{p}"),
    ]
    return rules


def _mlp_rules(meta: str, hf: str, n: int) -> list[_Rule]:
    """Meta ``MLP.layers.{k}`` (0-based) <-> HF ``layer{k+1}``."""
    return [_Rule(f"{meta}.layers.{k}.{{p}}", f"{hf}.layer{k + 1}.{{p}}") for k in range(n)]


def _moved(meta: str, hf: str, *names: str) -> list[_Rule]:
    """Submodules whose own name is unchanged, under a renamed parent (``meta`` -> ``hf``)."""
    return [_Rule(f"{meta}.{n}.{{p}}", f"{hf}.{n}.{{p}}") for n in names]


_VIT, _HVIT = "backbone.vision_backbone.trunk", "vision_encoder.backbone"
_FPN, _HFPN = "backbone.vision_backbone.convs.{i}", "vision_encoder.neck.fpn_layers.{i}"
_TXT, _HTXT = "backbone.language_backbone.encoder", "text_encoder.text_model"
_DEC, _HDEC = "transformer.decoder", "detr_decoder"
_SEG, _HSEG = "segmentation_head", "mask_decoder"
_GEO = "geometry_encoder"
_4X = (_HFPN + ".scale_layers.2.{p}", True)  # the 4x level has a second transposed conv

RULES: list[_Rule] = [
    # --- ViT trunk
    _Rule(_VIT + ".pos_embed", _HVIT + ".embeddings.position_embeddings", "cls_pos"),
    _Rule(_VIT + ".patch_embed.proj.{p}", _HVIT + ".embeddings.patch_embeddings.projection.{p}"),
    _Rule(_VIT + ".ln_pre.{p}", _HVIT + ".layer_norm.{p}"),
    _Rule(_VIT + ".blocks.{i}.norm1.{p}", _HVIT + ".layers.{i}.layer_norm1.{p}"),
    _Rule(_VIT + ".blocks.{i}.norm2.{p}", _HVIT + ".layers.{i}.layer_norm2.{p}"),
    _Rule(_VIT + ".blocks.{i}.attn.qkv.{p}", _HVIT + ".layers.{i}.attention.{qkv}_proj.{p}", "qkv"),
    _Rule(_VIT + ".blocks.{i}.attn.proj.{p}", _HVIT + ".layers.{i}.attention.o_proj.{p}"),
    _Rule(_VIT + ".blocks.{i}.mlp.fc1.{p}", _HVIT + ".layers.{i}.mlp.fc1.{p}"),
    _Rule(_VIT + ".blocks.{i}.mlp.fc2.{p}", _HVIT + ".layers.{i}.mlp.fc2.{p}"),
    # --- FPN neck: 4x = deconv, GELU, deconv (HF indexes 0 and 2); 2x = one deconv; 1x/0.5x none
    _Rule(_FPN + ".dconv_2x2_0.{p}", _HFPN + ".scale_layers.0.{p}", hf_sibling=_4X),
    _Rule(_FPN + ".dconv_2x2_1.{p}", _HFPN + ".scale_layers.2.{p}"),
    _Rule(_FPN + ".dconv_2x2.{p}", _HFPN + ".scale_layers.0.{p}", hf_sibling=(_4X[0], False)),
    _Rule(_FPN + ".conv_1x1.{p}", _HFPN + ".proj1.{p}"),
    _Rule(_FPN + ".conv_3x3.{p}", _HFPN + ".proj2.{p}"),
    # --- CLIP-style text encoder
    _Rule(_TXT + ".token_embedding.{p}", _HTXT + ".embeddings.token_embedding.{p}"),
    _Rule(_TXT + ".positional_embedding", _HTXT + ".embeddings.position_embedding.weight"),
    _Rule(_TXT + ".ln_final.{p}", _HTXT + ".final_layer_norm.{p}"),
    _Rule(_TXT + ".text_projection", "text_encoder.text_projection.weight", "transpose"),
    *_attention_rules(
        _TXT + ".transformer.resblocks.{i}.attn", _HTXT + ".encoder.layers.{i}.self_attn", out_proj="out_proj"
    ),
    _Rule(_TXT + ".transformer.resblocks.{i}.ln_1.{p}", _HTXT + ".encoder.layers.{i}.layer_norm1.{p}"),
    _Rule(_TXT + ".transformer.resblocks.{i}.ln_2.{p}", _HTXT + ".encoder.layers.{i}.layer_norm2.{p}"),
    _Rule(_TXT + ".transformer.resblocks.{i}.mlp.c_fc.{p}", _HTXT + ".encoder.layers.{i}.mlp.fc1.{p}"),
    _Rule(_TXT + ".transformer.resblocks.{i}.mlp.c_proj.{p}", _HTXT + ".encoder.layers.{i}.mlp.fc2.{p}"),
    _Rule("backbone.language_backbone.resizer.{p}", "text_projection.{p}"),
    # --- geometry (box prompt) encoder
    *_moved(_GEO, _GEO, "label_embed", "cls_embed", "final_proj"),
    *_moved(_GEO, _GEO, "boxes_direct_project", "boxes_pool_project", "boxes_pos_enc_project"),
    _Rule(_GEO + ".img_pre_norm.{p}", _GEO + ".vision_layer_norm.{p}"),
    _Rule(_GEO + ".norm.{p}", _GEO + ".prompt_layer_norm.{p}"),
    _Rule(_GEO + ".encode_norm.{p}", _GEO + ".output_layer_norm.{p}"),
    *_fusion_layer_rules(_GEO + ".encode.{i}", _GEO + ".layers.{i}"),
    # --- DETR encoder (image/text fusion)
    *_fusion_layer_rules("transformer.encoder.layers.{i}", "detr_encoder.layers.{i}"),
    # --- DETR decoder
    *_moved(_DEC, _HDEC, "query_embed", "reference_points", "presence_token"),
    _Rule(_DEC + ".presence_token_out_norm.{p}", _HDEC + ".presence_layer_norm.{p}"),
    _Rule(_DEC + ".norm.{p}", _HDEC + ".output_layer_norm.{p}"),
    *_mlp_rules(_DEC + ".presence_token_head", _HDEC + ".presence_head", 3),
    *_mlp_rules(_DEC + ".bbox_embed", _HDEC + ".box_head", 3),
    *_mlp_rules(_DEC + ".ref_point_head", _HDEC + ".ref_point_head", 2),
    *_mlp_rules(_DEC + ".boxRPB_embed_x", _HDEC + ".box_rpb_embed_x", 2),
    *_mlp_rules(_DEC + ".boxRPB_embed_y", _HDEC + ".box_rpb_embed_y", 2),
    *_attention_rules(_DEC + ".layers.{i}.self_attn", _HDEC + ".layers.{i}.self_attn"),
    *_attention_rules(_DEC + ".layers.{i}.ca_text", _HDEC + ".layers.{i}.text_cross_attn"),
    *_attention_rules(_DEC + ".layers.{i}.cross_attn", _HDEC + ".layers.{i}.vision_cross_attn"),
    _Rule(_DEC + ".layers.{i}.linear1.{p}", _HDEC + ".layers.{i}.mlp.fc1.{p}"),
    _Rule(_DEC + ".layers.{i}.linear2.{p}", _HDEC + ".layers.{i}.mlp.fc2.{p}"),
    _Rule(_DEC + ".layers.{i}.norm1.{p}", _HDEC + ".layers.{i}.vision_cross_attn_layer_norm.{p}"),
    _Rule(_DEC + ".layers.{i}.catext_norm.{p}", _HDEC + ".layers.{i}.text_cross_attn_layer_norm.{p}"),
    _Rule(_DEC + ".layers.{i}.norm2.{p}", _HDEC + ".layers.{i}.self_attn_layer_norm.{p}"),
    _Rule(_DEC + ".layers.{i}.norm3.{p}", _HDEC + ".layers.{i}.mlp_layer_norm.{p}"),
    # --- text/query dot-product scoring
    *_mlp_rules("dot_prod_scoring.prompt_mlp", "dot_product_scoring.text_mlp", 2),
    _Rule("dot_prod_scoring.prompt_mlp.out_norm.{p}", "dot_product_scoring.text_mlp_out_norm.{p}"),
    _Rule("dot_prod_scoring.prompt_proj.{p}", "dot_product_scoring.text_proj.{p}"),
    _Rule("dot_prod_scoring.hs_proj.{p}", "dot_product_scoring.query_proj.{p}"),
    # --- mask decoder (Meta "segmentation head")
    _Rule(_SEG + ".pixel_decoder.conv_layers.{i}.{p}", _HSEG + ".pixel_decoder.conv_layers.{i}.{p}"),
    _Rule(_SEG + ".pixel_decoder.norms.{i}.{p}", _HSEG + ".pixel_decoder.norms.{i}.{p}"),
    _Rule(_SEG + ".mask_predictor.mask_embed.layers.{i}.{p}", _HSEG + ".mask_embedder.layers.{i}.{p}"),
    _Rule(_SEG + ".instance_seg_head.{p}", _HSEG + ".instance_projection.{p}"),
    _Rule(_SEG + ".semantic_seg_head.{p}", _HSEG + ".semantic_projection.{p}"),
    *_attention_rules(_SEG + ".cross_attend_prompt", _HSEG + ".prompt_cross_attn"),
    _Rule(_SEG + ".cross_attn_norm.{p}", _HSEG + ".prompt_cross_attn_norm.{p}"),
]

_PLACEHOLDERS = {"{i}": r"(?P<i>\d+)", "{p}": r"(?P<p>weight|bias)", "{qkv}": r"(?P<qkv>[qkv])"}


def _compile(template: str) -> re.Pattern[str]:
    pattern = re.escape(template)
    for ph, rx in _PLACEHOLDERS.items():
        pattern = pattern.replace(re.escape(ph), rx)
    return re.compile(pattern + "$")


def _fill(template: str, groups: dict[str, str]) -> str:
    for name, value in groups.items():
        template = template.replace("{" + name + "}", value)
    return template


_META_RE = [(_compile(r.meta), r) for r in RULES]
_HF_RE = [(_compile(r.hf), r) for r in RULES]


def _to_numpy(x: Any) -> np.ndarray:
    """torch.Tensor (any dtype incl. bfloat16) or array-like -> np.ndarray, without importing torch."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            import ml_dtypes  # ships with jax
            import torch  # present: x is a torch tensor

            # numpy has no bfloat16; reinterpret the bits.
            return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return x.numpy()
    return np.asarray(x)


def _is_square(n: int) -> bool:
    return n >= 0 and math.isqrt(n) ** 2 == n


def _strip_prefix(key: str) -> str:
    for prefix in META_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def _drop_reason(key: str) -> str | None:
    for rx, why in _DROPPED_RE:
        if rx.search(key):
            return why
    return None


def _unknown(keys: list[str], side: str) -> ValueError:
    more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
    return ValueError(f"unknown {side} SAM3 key {keys[0]!r}{more}; not in jalias.weights.meta.RULES")


def meta_to_hf(state_dict: dict[str, Any]) -> dict[str, np.ndarray]:
    """Meta ``sam3.pt`` state dict (``detector.``-prefixed or bare) -> HF ``Sam3Model`` state dict.

    Values: torch tensors or numpy arrays of any shape/dtype; returned as numpy arrays with dtype kept.
    Unused parts (``DROPPED_META_KEYS``) are dropped and counted in a log line; any other key that no
    rule covers raises ValueError naming it.
    """
    out: dict[str, np.ndarray] = {}
    dropped: dict[str, int] = {}
    unknown: list[str] = []
    for raw_key, value in state_dict.items():
        key = _strip_prefix(raw_key)
        why = _drop_reason(key)
        if why is not None:
            dropped[why] = dropped.get(why, 0) + 1
            continue
        for rx, rule in _META_RE:
            m = rx.match(key)
            if m:
                break
        else:
            unknown.append(raw_key)
            continue
        groups = {k: v for k, v in m.groupdict().items() if v is not None}
        arr = _to_numpy(value)
        targets = _meta_value_to_hf(rule, groups, arr, raw_key)
        for hf_key, hf_arr in targets.items():
            if hf_key in out:
                raise ValueError(f"two Meta keys map to the same HF key {hf_key!r} (second: {raw_key!r})")
            out[hf_key] = hf_arr
    if unknown:
        raise _unknown(unknown, "Meta")
    if dropped:
        log.info("meta_to_hf: dropped %d unused Meta keys: %s", sum(dropped.values()), dropped)
    return out


def _meta_value_to_hf(rule: _Rule, groups: dict[str, str], arr: np.ndarray, key: str) -> dict[str, np.ndarray]:
    if rule.kind == "rename":
        return {_fill(rule.hf, groups): arr}
    if rule.kind == "qkv":
        if arr.shape[0] % 3:
            raise ValueError(f"fused qkv {key!r} has leading dim {arr.shape[0]}, not divisible by 3")
        n = arr.shape[0] // 3
        return {_fill(rule.hf, {**groups, "qkv": part}): arr[j * n : (j + 1) * n] for j, part in enumerate("qkv")}
    if rule.kind == "transpose":
        if arr.ndim != 2:
            raise ValueError(f"{key!r} should be 2-D, got shape {arr.shape}")
        return {_fill(rule.hf, groups): np.ascontiguousarray(arr.T)}
    if rule.kind == "cls_pos":
        n = arr.shape[1] if arr.ndim == 3 else -1
        if n > 1 and _is_square(n - 1) and not _is_square(n):
            arr = arr[:, 1:]
        elif not (n > 0 and _is_square(n)):
            raise ValueError(f"{key!r} should be (1, [1+]S*S, C), got shape {arr.shape}")
        return {_fill(rule.hf, groups): arr}
    raise AssertionError(rule.kind)


def hf_to_meta(state_dict: dict[str, Any], prefix: str = "detector.") -> dict[str, np.ndarray]:
    """HF ``Sam3Model`` state dict -> Meta layout (the image-model part of ``sam3.pt``).

    ``prefix`` is prepended to every key: "detector." reproduces the ``sam3.pt`` naming, "" gives the
    bare ``build_sam3_image_model`` naming. Keys Meta has but HF lacks (see ``DROPPED_META_KEYS``) are
    not produced. Values are returned as numpy arrays. Unknown HF keys raise ValueError naming them.
    """
    out: dict[str, np.ndarray] = {}
    fused: dict[str, dict[str, np.ndarray]] = {}
    unknown: list[str] = []
    keys = set(state_dict)
    for key, value in state_dict.items():
        match = None
        for rx, rule in _HF_RE:
            m = rx.match(key)
            if not m:
                continue
            groups = {k: v for k, v in m.groupdict().items() if v is not None}
            if rule.hf_sibling is not None:
                template, must_exist = rule.hf_sibling
                if (_fill(template, groups) in keys) != must_exist:
                    continue
            match = (rule, groups)
            break
        if match is None:
            unknown.append(key)
            continue
        rule, groups = match
        arr = _to_numpy(value)
        meta_key = prefix + _fill(rule.meta, {k: v for k, v in groups.items() if k != "qkv"})
        if rule.kind == "qkv":
            fused.setdefault(meta_key, {})[groups["qkv"]] = arr
            continue
        if meta_key in out:
            raise ValueError(f"two HF keys map to the same Meta key {meta_key!r} (second: {key!r})")
        if rule.kind == "rename":
            out[meta_key] = arr
        elif rule.kind == "transpose":
            out[meta_key] = np.ascontiguousarray(arr.T)
        elif rule.kind == "cls_pos":
            # Unused cls-token slot (see module docstring): zeros.
            out[meta_key] = np.concatenate([np.zeros_like(arr[:, :1]), arr], axis=1)
    if unknown:
        raise _unknown(unknown, "HF")
    for meta_key, parts in fused.items():
        missing = [p for p in "qkv" if p not in parts]
        if missing:
            raise ValueError(f"cannot build {meta_key!r}: HF state dict lacks its {missing[0]}_proj")
        out[meta_key] = np.concatenate([parts["q"], parts["k"], parts["v"]], axis=0)
    return out


def load_meta_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
    """Read a Meta ``sam3.pt`` with torch (``weights_only=True``) -> flat {key: np.ndarray}, keys unchanged.

    Accepts a bare state dict or ``{"model": state_dict}`` / ``{"state_dict": state_dict}``. bfloat16
    tensors come back as ``ml_dtypes.bfloat16`` arrays. Feed the result to ``meta_to_hf``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Meta SAM3 checkpoint not found: {path}")
    try:
        import torch
    except ImportError as e:  # torch is only a dev/test extra
        raise ImportError("reading a Meta .pt checkpoint needs torch: pip install torch (CPU is enough)") from e
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's own message advises weights_only=False: never do that for a file you got
        raise ValueError(f"cannot read {path} as a torch checkpoint ({type(e).__name__}): expected a state dict "
                         "of tensors (Meta's sam3.pt); jalias reads .pt files with weights_only=True and never "
                         "unpickles other objects") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: expected a dict state dict, got {type(ckpt).__name__}")
    for wrapper in ("model", "state_dict"):
        if isinstance(ckpt.get(wrapper), dict):
            ckpt = ckpt[wrapper]
            break
    out: dict[str, np.ndarray] = {}
    for key, value in ckpt.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        out[key] = _to_numpy(value)
    return out
