"""Pure jax scoring functions: prompt layout, the exact mask prediction + IoU, and the soft (differentiable) IoU.

Prediction rule (exact path; this file is its one definition, see `query_scores` / `query_keep` /
`union_decision` / `predicted_mask`; `np_query_keep` is its numpy twin): a query is kept when
sigmoid(pred_logit) * sigmoid(presence_logit) > threshold (KEEP_THRESHOLD, 0.5); its mask logits are resized bilinearly (half-pixel centres, no antialiasing: torch
`F.interpolate(mode="bilinear", align_corners=False)`) to the GT's resolution and thresholded at 0; the predicted
mask is the union over kept queries. IoU follows `jalias.data.masks.iou` (empty vs empty = 1).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..tokenizer import CONTEXT_LENGTH, END_ID, PAD_ID, START_ID


def layout_prompts(ids: np.ndarray, context: int = CONTEXT_LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """Content tokens int[N, L] (L <= context-2) -> (input_ids int32[N, context], attention_mask int32[N, context]):
    [START, ids..., END, PAD...] with mask 1 on START..END, as SAM3's processor lays out a prompt."""
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"candidate token ids must be int[N, L], got shape {list(ids.shape)}")
    n, length = ids.shape
    if length > context - 2:
        raise ValueError(f"candidates have {length} tokens; at most {context - 2} fit the {context}-token context")
    if ids.size and (ids.min() < 0 or ids.max() >= START_ID):
        bad = int(ids.min() if ids.min() < 0 else ids.max())
        raise ValueError(f"unknown or special token id {bad} in candidates (content ids are 0..{START_ID - 1})")
    out = np.full((n, context), PAD_ID, np.int32)
    out[:, 0] = START_ID
    out[:, 1:1 + length] = ids
    out[:, 1 + length] = END_ID
    mask = np.zeros((n, context), np.int32)
    mask[:, :length + 2] = 1
    return out, mask


def bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
    """float32[out, in] weights of 1-D bilinear resizing, half-pixel centres, edge clamp, no antialias."""
    pos = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
    pos = np.clip(pos, 0, in_size - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = pos - lo
    m = np.zeros((out_size, in_size), np.float64)
    m[np.arange(out_size), lo] += 1 - frac
    m[np.arange(out_size), hi] += frac
    return m.astype(np.float32)


DROPPED_LOGIT = -1.0  # mask logit a dropped query gets before resizing: a resized constant stays < 0


def query_scores(pred_logits: jax.Array, presence_logits: jax.Array) -> jax.Array:
    """[..., Q], [..., 1] -> float32 [..., Q]: query prob x presence prob."""
    return jax.nn.sigmoid(pred_logits.astype(jnp.float32)) * jax.nn.sigmoid(presence_logits.astype(jnp.float32))


KEEP_THRESHOLD = 0.5  # the default query-score threshold of the prediction rule (a run records it in run.json)


def query_keep(pred_logits: jax.Array, presence_logits: jax.Array, threshold: float = KEEP_THRESHOLD) -> jax.Array:
    """[..., Q], [..., 1] -> bool [..., Q]: queries whose score (query prob x presence prob) passes threshold."""
    return query_scores(pred_logits, presence_logits) > threshold


def np_sigmoid(x: np.ndarray) -> np.ndarray:
    """Numpy logistic function, in the input's float precision."""
    return 1.0 / (1.0 + np.exp(-x))


def np_query_keep(pred_logits: np.ndarray, presence_logits: np.ndarray,
                  threshold: float = KEEP_THRESHOLD) -> np.ndarray:
    """Numpy twin of `query_keep` for code that must stay in numpy (planted calibration): [..., Q], [..., 1] ->
    bool [..., Q], computed in the inputs' precision (float32 inputs give `query_keep`'s answer, tests/test_engine.py)."""
    pred_logits, presence_logits = np.asarray(pred_logits), np.asarray(presence_logits)
    return np_sigmoid(pred_logits) * np_sigmoid(presence_logits) > threshold


def union_decision(masks: jax.Array, keep: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
    """masks [..., Q, h, w] logits, keep bool [..., Q], rows [H, h], cols [W, w] -> float32 [..., H, W]: the max
    over queries of the resized mask logits, dropped queries at DROPPED_LOGIT. The predicted mask is where it is
    > 0, and |value| is how far a pixel is from flipping (down to |DROPPED_LOGIT|)."""
    m = jnp.where(keep[..., None, None], masks.astype(jnp.float32), DROPPED_LOGIT)
    up = jnp.matmul(rows, jnp.matmul(m, cols.T))  # [..., Q, H, W]; two GEMMs, separable bilinear resize
    return jnp.max(up, axis=-3)


def predicted_mask(masks: jax.Array, keep: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
    """masks [..., Q, h, w] logits, keep bool [..., Q], rows [H, h], cols [W, w] -> bool [..., H, W]: the union of
    the kept queries' resized masks."""
    return union_decision(masks, keep, rows, cols) > 0


def iou(pred: jax.Array, gt: jax.Array) -> jax.Array:
    """Jax twin of `jalias.data.masks.iou` for bool [..., H, W] -> float32 [...]."""
    inter = jnp.sum(pred & gt, axis=(-2, -1)).astype(jnp.float32)
    union = jnp.sum(pred | gt, axis=(-2, -1)).astype(jnp.float32)
    return jnp.where(union == 0, 1.0, inter / jnp.maximum(union, 1.0))


def kept_tiers(max_kept: int | Sequence[int]) -> tuple[int, ...]:
    """`exact_iou`'s max_kept (one count or several) -> its tiers, sorted and distinct; ValueError unless each >= 1."""
    tiers = tuple(sorted({int(m) for m in (np.atleast_1d(max_kept) if np.ndim(max_kept) == 0 else max_kept)}))
    if not tiers or tiers[0] < 1:
        raise ValueError(f"max_kept must be >= 1, got {max_kept}")
    return tiers


def exact_iou(out: dict, gt: jax.Array, rows: jax.Array, cols: jax.Array, threshold: float = 0.5,
              batch_size: int = 8, max_kept: int | Sequence[int] = 16, masks_of: Callable | None = None) -> jax.Array:
    """Detector outputs for N candidates on one image (pred_masks [N, Q, h, w] unless `masks_of` is given,
    pred_logits [N, Q], presence_logits [N, 1]) and gt bool [H, W], rows [H, h], cols [W, w] -> iou float32 [N].

    Candidates are mapped in batches of `batch_size` so the [Q, H, W] upsampled logits never exist for the whole
    chunk. Only kept queries reach the union, so when no candidate keeps more than m queries, for m the smallest of
    the `max_kept` tiers (an int or several) that holds them, each candidate's kept queries are moved to the front and
    only the first m are resized (Q / m times less resize work); otherwise all Q are (same result either way). The
    choice is a `lax.switch`: under `vmap` it would run every branch, so map over images with `lax.map`, as the
    engine does.
    masks_of: instead of out["pred_masks"], a function (order int [N, Q'] or None for all Q) -> the mask logits of
    those queries [N, Q', h, w], so the engine computes only the masks it resizes.
    """
    tiers = kept_tiers(max_kept)
    keep = query_keep(out["pred_logits"], out["presence_logits"], threshold)  # [N, Q]
    tiers = [m for m in tiers if m < keep.shape[-1]]  # a tier >= Q is all queries
    if masks_of is None:
        def masks_of(order):
            m = out["pred_masks"]
            return m if order is None else jnp.take_along_axis(m, order[:, :, None, None], axis=1)

    def one(args):
        m, k = args  # [Q', h, w], bool [Q']
        return iou(predicted_mask(m, k, rows, cols), gt)

    def score(m, k):
        return jax.lax.map(one, (m, k), batch_size=batch_size)

    def every():
        return score(masks_of(None), keep)

    if not tiers:
        return every()

    def kept_first(m):
        def branch():
            order = jnp.argsort(~keep, axis=-1, stable=True)[:, :m]  # [N, m]: kept queries first
            return score(masks_of(order), jnp.take_along_axis(keep, order, axis=1))
        return branch

    most = jnp.max(jnp.sum(keep, axis=-1))  # the most queries a candidate keeps
    tier = sum((most > m).astype(jnp.int32) for m in tiers)  # index of the smallest tier holding them, else all
    return jax.lax.switch(tier, [kept_first(m) for m in tiers] + [every])


def soft_union(out: dict) -> jax.Array:
    """Differentiable union: 1 - prod_q (1 - s_q * sigmoid(mask_q)), s_q = query prob x presence prob.
    pred_masks [N, Q, h, w] -> [N, h, w] in [0, 1]."""
    s = query_scores(out["pred_logits"], out["presence_logits"])  # [N, Q]
    p = s[..., None, None] * jax.nn.sigmoid(out["pred_masks"].astype(jnp.float32))
    return 1.0 - jnp.exp(jnp.sum(jnp.log1p(-jnp.clip(p, 0.0, 1 - 1e-6)), axis=-3))


def soft_scores(out: dict, gt_soft: jax.Array, negative: jax.Array) -> jax.Array:
    """Soft IoU against a [h, w] GT in [0,1] (the GT area-resized to mask resolution); on a negative image the
    score is the probability that no query fires (1 - max_q s_q). -> float32 [N]."""
    u = soft_union(out)
    inter = jnp.sum(u * gt_soft, axis=(-2, -1))
    union = jnp.sum(u + gt_soft - u * gt_soft, axis=(-2, -1))
    pos = inter / (union + 1e-6)
    neg = 1.0 - jnp.max(query_scores(out["pred_logits"], out["presence_logits"]), axis=-1)
    return jnp.where(negative, neg, pos)


def area_resize(mask: np.ndarray, size: int) -> np.ndarray:
    """bool/float [H, W] -> float32 [size, size] fraction of each target cell covered (box filter via bilinear
    matrices of the cell centres when shapes do not divide)."""
    m = np.asarray(mask, np.float32)
    h, w = m.shape
    rows = _area_matrix(size, h)
    cols = _area_matrix(size, w)
    return (rows @ m @ cols.T).astype(np.float32)


def _area_matrix(out_size: int, in_size: int) -> np.ndarray:
    """float64 [out, in]: overlap of output cell i with input pixel j, rows normalised to sum 1."""
    edges_out = np.linspace(0, in_size, out_size + 1)
    m = np.zeros((out_size, in_size))
    for i in range(out_size):
        a, b = edges_out[i], edges_out[i + 1]
        j0, j1 = int(np.floor(a)), int(np.ceil(b))
        for j in range(j0, min(j1, in_size)):
            m[i, j] = max(0.0, min(b, j + 1) - max(a, j))
        m[i] /= max(m[i].sum(), 1e-12)
    return m
