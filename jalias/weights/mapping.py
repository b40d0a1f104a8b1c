"""Hugging Face `Sam3Model` state dict <-> jalias Flax params, by generic rules.

Flax modules are named after the HF modules, so a parameter path maps to an HF key mechanically:
  path components joined by ".", a trailing "_<i>" (list index) becomes ".<i>";
  leaf "kernel" -> "weight" (2-D: transposed; 4-D conv: (O,I,H,W) -> (H,W,I,O)); "scale"/"embedding" -> "weight";
  anything else keeps its name and layout.
The only true exceptions are the HF weights that the text-prompted path never uses (SKIPPED below). The geometry
encoder's CLS path (`jalias/model/geometry.py`: cls_embed, final_proj, prompt_layer_norm, layers, output_layer_norm)
is mapped like any other module when the config has `geometry`; its box-only weights are always skipped.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np

from ..model.config import Sam3Config
from ..model.shapes import module_shapes, param_shapes  # noqa: F401 (re-exported)


class WeightError(ValueError):
    """A checkpoint does not fit the model: missing, unexpected or mis-shaped tensor."""


# HF keys that exist in a Sam3Model checkpoint but are not used for text prompts. They are checked to exist
# nowhere else and are dropped: the geometry encoder's box-prompt parts (its CLS path is used in "meta" prompt
# mode), the 0.5x FPN level (SAM3 drops it), CLIP's own projection (SAM3 projects every token with
# `text_projection` instead), the unused last pixel-decoder stage, and tracker/video weights in combined
# checkpoints.
GEOMETRY_BOX_ONLY = (r"^geometry_encoder\.(label_embed|boxes_direct_project|boxes_pool_project|boxes_pos_enc_project"
                     r"|vision_layer_norm)\.")
SKIPPED = (
    GEOMETRY_BOX_ONLY,
    r"^vision_encoder\.neck\.fpn_layers\.3\.",
    r"^text_encoder\.text_projection\.",
    r"^mask_decoder\.pixel_decoder\.(conv_layers|norms)\.[2-9]\.",
    r"^tracker_model\.",
    r"^tracker_neck\.",
)
_SKIP_RE = re.compile("|".join(SKIPPED))
# A config without `geometry` (no geometry-encoder params: "hf" prompt mode only) skips the whole encoder.
_SKIP_ALL_GEOMETRY_RE = re.compile("|".join(SKIPPED + (r"^geometry_encoder\.",)))


def skip_pattern(config: Sam3Config) -> re.Pattern:
    """The HF keys a checkpoint may carry that this config does not map (dropped, not an error)."""
    return _SKIP_RE if config.geometry is not None else _SKIP_ALL_GEOMETRY_RE
_INDEX_RE = re.compile(r"^(.*)_(\d+)$")


def hf_key(path: Iterable[str]) -> str:
    """('detr_encoder', 'layers_0', 'self_attn', 'q_proj', 'kernel') -> 'detr_encoder.layers.0.self_attn.q_proj.weight'."""
    parts = list(path)
    leaf = parts.pop()
    out = []
    for p in parts:
        m = _INDEX_RE.match(p)
        out.extend([m.group(1), m.group(2)] if m else [p])
    out.append({"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf))
    return ".".join(out)


def to_flax_layout(leaf: str, t: np.ndarray) -> np.ndarray:
    """Torch tensor layout -> Flax layout for a leaf named `leaf`."""
    if leaf == "kernel" and t.ndim == 2:
        return t.T
    if leaf == "kernel" and t.ndim == 4:
        return t.transpose(2, 3, 1, 0)
    return t


def to_torch_layout(leaf: str, a: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and a.ndim == 2:
        return a.T
    if leaf == "kernel" and a.ndim == 4:
        return a.transpose(3, 2, 0, 1)
    return a


def _strip_prefix(keys: Iterable[str]) -> str:
    """Checkpoints saved from Sam3VideoModel nest the image model under 'detector_model.'."""
    keys = list(keys)
    return "detector_model." if keys and all(k.startswith("detector_model.") for k in keys
                                             if not _SKIP_ALL_GEOMETRY_RE.search(k)) else ""


def state_dict_to_params(state_dict: Mapping[str, Any], config: Sam3Config,
                         to_numpy: Callable[[Any], np.ndarray] = np.asarray) -> dict:
    """HF `Sam3Model` state dict (name -> tensor/array) -> nested Flax params dict of float32 numpy arrays.

    Raises WeightError naming the first missing, mis-shaped or unexpected tensor.
    """
    prefix = _strip_prefix(state_dict.keys())
    sd = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}
    return tree_from_state_dict(sd, param_shapes(config), to_numpy, skip=skip_pattern(config))


def tree_from_state_dict(sd: Mapping[str, Any], shapes: Mapping[tuple[str, ...], tuple[int, ...]],
                         to_numpy: Callable[[Any], np.ndarray] = np.asarray, skip: re.Pattern | None = None) -> dict:
    """Generic conversion for any module (whole model or one stage): `shapes` maps each Flax param path to its
    shape; every path must find its HF key in `sd` with the right shape, and every key of `sd` must be used
    (unless it matches `skip`)."""
    params: dict = {}
    used = set()
    for path, shape in shapes.items():
        key = hf_key(path)
        if key not in sd:
            raise WeightError(f"missing weight {key!r} (expected shape {tuple(_torch_shape(path[-1], shape))})")
        arr = to_flax_layout(path[-1], np.asarray(to_numpy(sd[key]), dtype=np.float32))
        if tuple(arr.shape) != tuple(shape):
            got = tuple(np.shape(to_numpy(sd[key])))
            raise WeightError(f"weight {key!r} has shape {got}, expected {tuple(_torch_shape(path[-1], shape))}")
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = arr
        used.add(key)
    extra = sorted(k for k in sd if k not in used and not (skip is not None and skip.search(k)))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise WeightError(f"unexpected weight {extra[0]!r}{more}: checkpoint does not match this SAM3 config")
    return params


def _torch_shape(leaf: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    return to_torch_layout(leaf, np.empty(flax_shape, np.uint8)).shape


def params_to_state_dict(params: dict) -> dict[str, np.ndarray]:
    """Inverse of `state_dict_to_params` for the used weights (skipped HF weights are not recreated)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {hf_key([k.key for k in path]): np.ascontiguousarray(to_torch_layout(path[-1].key, np.asarray(leaf)))
            for path, leaf in flat}
