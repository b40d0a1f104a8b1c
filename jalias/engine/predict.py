"""Everything SAM3 says about N prompts on one image, with the engine's prediction rule (`scoring.py`): the
predicted masks at image resolution and the detector outputs behind them (report overlays, teacher targets)."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..model.preprocess import preprocess
from . import scoring

UNION_FLOOR = -20.0  # union_logits where no query is kept: sigmoid(-20) ~ 2e-9, "certainly background"

_masks = jax.jit(scoring.predicted_mask)
# (query scores, kept queries) by the prediction rule, in one program: keep is exactly scores > threshold
_scores_keep = jax.jit(lambda logits, presence, threshold: (scoring.query_scores(logits, presence),
                                                            scoring.query_keep(logits, presence, threshold)))


def layout(prompts: Sequence[Sequence[int]], context: int) -> tuple[np.ndarray, np.ndarray]:
    """N content-id sequences (any lengths) -> (input_ids int32[N, T], attention_mask int32[N, T])."""
    rows = [scoring.layout_prompts(np.asarray(p, np.int32).reshape(1, -1), context) for p in prompts]
    return np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows])


def union_logits(pred_masks: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """pred_masks float32[N, Q, m, m], keep bool[N, Q] -> float32[N, m, m]: max over the kept queries' mask
    logits, UNION_FLOOR where none is kept."""
    union = np.where(keep[:, :, None, None], pred_masks, -np.inf).max(axis=1)
    return np.where(np.isfinite(union), union, UNION_FLOOR).astype(np.float32)


def predict(model, image: np.ndarray, prompts: Sequence[Sequence[int]], threshold: float = scoring.KEEP_THRESHOLD,
            context: dict | None = None, mask_shape: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """SAM3 outputs of N prompts on one image.

    image: uint8[H, W, 3]; prompts: N sequences of content token ids; context: the image's `encode_image`
    context, to skip the image encoder (not an `Engine`'s: it holds no FPN maps, which the full mask head reads); mask_shape: (H', W') of the predicted masks
    (default the image's). Returns numpy arrays: masks bool[N, H', W'], pred_masks float32[N, Q, m, m],
    pred_logits [N, Q], presence_logits [N, 1], scores [N, Q], keep bool[N, Q], pred_boxes [N, Q, 4],
    semantic_logits [N, m, m], union_logits [N, m, m].
    """
    cfg = model.config
    input_ids, mask = layout(prompts, cfg.context_length)
    if context is None:
        context = model.encode_image(preprocess(image, cfg.image_size))
    elif "fpn" not in context:
        raise ValueError("predict needs a full encode_image context (an Engine's cached context has no FPN maps)")
    prompt = model.encode_text(input_ids, mask)
    out = model.detect(context, prompt, model.prompt_mask(input_ids, mask))  # "meta": id 0 masked
    scores, keep = _scores_keep(out["pred_logits"], out["presence_logits"], threshold)
    m = out["pred_masks"].shape[-1]
    h, w = mask_shape if mask_shape is not None else image.shape[:2]
    masks = _masks(out["pred_masks"], keep, jnp.asarray(scoring.bilinear_matrix(h, m)),
                   jnp.asarray(scoring.bilinear_matrix(w, m)))
    pred_masks = np.asarray(out["pred_masks"], np.float32)
    keep = np.asarray(keep)
    return {
        "masks": np.asarray(masks, bool),
        "pred_masks": pred_masks,
        "pred_logits": np.asarray(out["pred_logits"], np.float32),
        "presence_logits": np.asarray(out["presence_logits"], np.float32),
        "scores": np.asarray(scores, np.float32),
        "keep": keep,
        "pred_boxes": np.asarray(out["pred_boxes"], np.float32),
        "semantic_logits": np.asarray(out["semantic_seg"], np.float32)[:, 0],
        "union_logits": union_logits(pred_masks, keep),
    }
