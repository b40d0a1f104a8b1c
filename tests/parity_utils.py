"""Shared helpers for the torch-vs-jalias parity tests (tests/test_parity.py, tests/test_parity_fullsize.py).

The reference is `transformers.Sam3Model` (torch, CPU, fp32, eval mode). Both sides get the same fan-in-scaled
random weights (`jalias.model.init.random_tree`): a checkpoint-free stand-in for real SAM3 weights that keeps
activations at unit scale and makes the outputs depend on the prompt.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import transformers

from jalias.model.config import (MaskDecoderConfig, Sam3Config, TextConfig, TransformerConfig, ViTConfig,
                                 VisionConfig)
from jalias.model.init import random_params, random_tree
from jalias.model.sam3 import Sam3
from jalias.tokenizer import tokenize
from jalias.weights.load import from_torch
from jalias.weights.mapping import module_shapes, params_to_state_dict, skip_pattern

OUTPUTS = ("pred_logits", "pred_boxes", "presence_logits", "pred_masks", "semantic_seg")

# Short word, long multi-word prompt (many real tokens, few pads) and the empty prompt (start + end tokens only).
PROMPTS = ("cat", "a big red fire truck parked on the left side of the road next to two people", "")


# ---- configs ---------------------------------------------------------------------------------------------------
def make_config(image_size: int = 56, width: int = 32, heads: int = 2, vit_layers: int = 2,
                global_attn: tuple[int, ...] = (1,), window: int = 2, pretrain_image_size: int = 28,
                text_layers: int = 2, enc_layers: int = 1, dec_layers: int = 2, queries: int = 8) -> Sam3Config:
    """A small jalias Sam3Config (every MLP 2x wide, one head count everywhere, patch size 14)."""
    return Sam3Config(
        vision=VisionConfig(
            backbone=ViTConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=vit_layers,
                               num_attention_heads=heads, image_size=image_size, patch_size=14,
                               window_size=window, global_attn_indexes=tuple(global_attn),
                               pretrain_image_size=pretrain_image_size),
            fpn_hidden_size=width),
        text=TextConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=text_layers,
                        num_attention_heads=heads, projection_dim=width),
        encoder=TransformerConfig(hidden_size=width, num_layers=enc_layers, num_attention_heads=heads,
                                  intermediate_size=2 * width),
        decoder=TransformerConfig(hidden_size=width, num_layers=dec_layers, num_attention_heads=heads,
                                  intermediate_size=2 * width, num_queries=queries),
        mask_decoder=MaskDecoderConfig(hidden_size=width, num_attention_heads=heads),
    )


# ---- whole-model reference pairs ---------------------------------------------------------------------------------
@dataclass
class Pair:
    """The same random weights in the torch reference and in jalias (loaded back from torch via `from_torch`)."""

    cfg: Sam3Config
    params: dict          # the random Flax params (numpy)
    torch_model: Any      # transformers.Sam3Model, eval mode
    model: Sam3           # jalias, fp32


@functools.lru_cache(maxsize=None)
def build_pair(cfg: Sam3Config, seed: int) -> Pair:
    """Torch Sam3Model + jalias Sam3 with identical weights (cached per config and seed: torch init is slow)."""
    torch.manual_seed(seed)  # the skipped (unused) torch weights keep their own init: make it reproducible
    hm = transformers.Sam3Model(transformers.Sam3Config(**cfg.to_hf_dict())).eval()
    params = random_params(cfg, seed)
    result = hm.load_state_dict({k: torch.from_numpy(v) for k, v in params_to_state_dict(params).items()},
                                strict=False)
    assert not result.unexpected_keys, f"jalias params with no torch counterpart: {result.unexpected_keys}"
    not_loaded = [k for k in result.missing_keys if not skip_pattern(cfg).search(k)]
    assert not not_loaded, f"torch weights that jalias does not provide (and does not skip): {not_loaded}"
    return Pair(cfg, params, hm, from_torch(hm, prompt_mode="hf"))  # transformers skips the geometry CLS


def torch_forward(hm, pixel_values: np.ndarray, input_ids: np.ndarray, attention_mask: np.ndarray) -> dict:
    """Reference forward -> {output name: float32 numpy array}."""
    with torch.no_grad():
        out = hm(pixel_values=torch.from_numpy(pixel_values), input_ids=torch.from_numpy(input_ids).long(),
                 attention_mask=torch.from_numpy(attention_mask).long())
    return {k: getattr(out, k).numpy() for k in OUTPUTS}


def jax_forward(model: Sam3, pixel_values, input_ids, attention_mask) -> dict:
    out = model(pixel_values, input_ids, attention_mask)
    return {k: np.asarray(out[k], np.float32) for k in OUTPUTS}


def random_pixels(batch: int, size: int, seed: int) -> np.ndarray:
    """float32 [batch, 3, size, size] roughly like normalised images (unit scale), a different image per row."""
    return np.random.default_rng(seed).normal(size=(batch, 3, size, size)).astype(np.float32)


def prompts(texts: Sequence[str] = PROMPTS) -> tuple[np.ndarray, np.ndarray]:
    """Tokenised prompts: (input_ids int32 [N, 32], attention_mask int32 [N, 32])."""
    ids, mask = tokenize(list(texts))
    return np.asarray(ids), np.asarray(mask)


# ---- metrics and assertions ------------------------------------------------------------------------------------
def mask_iou(a_logits: np.ndarray, b_logits: np.ndarray) -> np.ndarray:
    """IoU of the thresholded masks (logit > 0) over the last two axes; two empty masks have IoU 1."""
    a, b = a_logits > 0, b_logits > 0
    inter = np.logical_and(a, b).sum((-1, -2))
    union = np.logical_or(a, b).sum((-1, -2))
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def assert_abs_close(name: str, actual, expected, atol: float) -> None:
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != torch {expected.shape}"
    assert np.all(np.isfinite(actual)), f"{name}: non-finite values"
    err = max_abs(actual, expected)
    assert err <= atol, f"{name}: max |jalias - torch| = {err:.3g} > {atol:g}"


def rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected| (scale-free error for activations of arbitrary size)."""
    return max_abs(actual, expected) / max(float(np.max(np.abs(expected))), 1e-30)


def assert_rel_close(name: str, actual, expected, rtol: float) -> None:
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != torch {expected.shape}"
    assert np.all(np.isfinite(actual)), f"{name}: non-finite values"
    err = rel_err(actual, expected)
    assert err <= rtol, f"{name}: max |jalias - torch| / max |torch| = {err:.3g} > {rtol:g}"


def assert_varied(name: str, x, min_std: float) -> None:
    """Guards against a vacuous comparison: the reference output is not (near) constant."""
    x = np.asarray(x, np.float64)
    assert np.all(np.isfinite(x)), f"{name}: torch output has non-finite values"
    assert x.std() > min_std, f"{name}: torch output is degenerate (std {x.std():.3g} <= {min_std:g})"


def nchw_to_nhwc(x) -> np.ndarray:
    return np.transpose(np.asarray(x), (0, 2, 3, 1))


# ---- single stages (full-size tests) ------------------------------------------------------------------------------
def stage_params(jax_module, *example_args, seed: int, method=None) -> tuple[dict, dict[str, np.ndarray]]:
    """Random fan-in-scaled params for one jalias stage -> (Flax params, HF-keyed numpy state dict)."""
    shapes = module_shapes(jax_module, *example_args, method=method)
    # random_tree looks at each param's owner (path[-2]); a stage can have params at its root (ViTEmbeddings'
    # position_embeddings), so nest everything under a dummy root and unwrap again.
    params = random_tree({("stage", *path): shape for path, shape in shapes.items()}, seed)["stage"]
    return params, params_to_state_dict(params)


def load_torch_stage(torch_module, state_dict: dict[str, np.ndarray], unused: Iterable[str] = ()) -> None:
    """Load a stage's state dict into the torch module: strict, except for the named torch-only key patterns
    (weights that exist in HF but are never used on the text-prompted path), which must be exactly the missing ones.
    """
    unused = [re.compile(p) for p in unused]
    result = torch_module.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()},
                                          strict=not unused)
    assert not result.unexpected_keys, f"unexpected keys: {result.unexpected_keys}"
    bad = [k for k in result.missing_keys if not any(p.search(k) for p in unused)]
    assert not bad, f"torch weights not provided by jalias: {bad}"
    for p in unused:
        assert any(p.search(k) for k in result.missing_keys), f"pattern {p.pattern!r} matched no torch weight"
    torch_module.eval()


def t(x, dtype=torch.float32) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).to(dtype)


# ---- the prediction rule, restated on the torch side (an independent check of jalias.engine.scoring) ---------
def torch_model_of(model: Sam3):
    """transformers.Sam3Model (eval) holding a jalias model's params (float32)."""
    cfg = model.config
    hm = transformers.Sam3Model(transformers.Sam3Config(**cfg.to_hf_dict())).eval()
    flat = params_to_state_dict(jax_tree_to_numpy(model.params))
    result = hm.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in flat.items()},
                                strict=False)
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if not skip_pattern(cfg).search(k)]
    return hm


def jax_tree_to_numpy(tree):
    return {k: jax_tree_to_numpy(v) if isinstance(v, dict) else np.asarray(v) for k, v in tree.items()}


def content_prompts(rows: Sequence[Sequence[int]], context: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Content token ids per prompt -> (input_ids, attention_mask) int32 [N, context] laid out as CLIP's processor
    does: [START, ids..., END, PAD...], mask 1 on START..END (restated here, independent of jalias' layout)."""
    from jalias.tokenizer import END_ID, PAD_ID, START_ID

    ids = np.full((len(rows), context), PAD_ID, np.int32)
    mask = np.zeros((len(rows), context), np.int32)
    for r, row in enumerate(rows):
        ids[r, 0], ids[r, 1:1 + len(row)], ids[r, 1 + len(row)] = START_ID, row, END_ID
        mask[r, :len(row) + 2] = 1
    return ids, mask


def numpy_iou(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU of bool masks over the last two axes; two empty masks have IoU 1."""
    inter = np.logical_and(pred, gt).sum((-1, -2))
    union = np.logical_or(pred, gt).sum((-1, -2))
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def torch_predicted_masks(out: dict, shape: tuple[int, int], threshold: float = 0.5) -> np.ndarray:
    """SAM3's text-prompt mask from a torch forward's outputs -> bool[B, *shape]: the union of the masks of queries
    with sigmoid(pred_logit) * sigmoid(presence_logit) > threshold, each upsampled with torch's bilinear
    interpolate (align_corners=False) and thresholded at 0."""
    score = torch.sigmoid(torch.tensor(out["pred_logits"])) * torch.sigmoid(torch.tensor(out["presence_logits"]))
    logits = torch.nn.functional.interpolate(torch.tensor(out["pred_masks"]), size=shape, mode="bilinear",
                                             align_corners=False)
    return ((logits > 0) & (score > threshold)[..., None, None]).any(1).numpy()
