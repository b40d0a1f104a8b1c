"""Teacher targets and the adapter loss: one target layout and one loss for both teachers.

Targets (K training images, Q queries, m = mask resolution = 4 x ViT grid):

    query     float32[K, Q]     target probability of each query's sigmoid(pred_logit)
    presence  float32[K]        target probability of sigmoid(presence_logit)
    union     float32[K, m, m]  target of the soft union mask (scoring.soft_union)
    weights   float32[3]        (w_query, w_presence, w_union)

alias teacher (`alias_targets`): what the model does with the alias on each image: query = sigmoid(alias query
    logits), presence = sigmoid(alias presence logit), union = the alias's predicted mask at mask resolution (the
    max mask logit of the queries the prediction rule keeps at AdaptConfig.threshold, > 0; the export's
    `union_logits > 0`). weights = (w_query, w_presence, w_union).
gt teacher (`gt_targets`): union = the ground truth area-resized to m x m, presence = 1 on positive images and
    0 on negatives; there is no per-query target, so query = 0 with weight 0.

Loss per image (`image_loss`), averaged over images:

    w_query    * mean_q BCE(pred_logit_q, query_q)
  + w_presence * BCE(presence_logit, presence)
  + w_union    * (mean_px BCE(u, union) + dice(u, union)),   u = 1 - prod_q (1 - s_q sigmoid(mask_q))

with s_q = sigmoid(pred_logit_q) sigmoid(presence_logit) (the prediction rule's query score) and
dice(u, y) = 1 - (2 sum u y + 1) / (sum u + sum y + 1), counted only where the target has foreground.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..engine import scoring
from ..engine.predict import layout
from ..model.preprocess import preprocess
from ..model.sam3 import Sam3
from .config import AdaptConfig

EPS = 1e-6


@dataclass
class Targets:
    """Training targets of one adapter (shapes in the module docstring); ctx: the K images' stacked contexts."""

    ctx: dict
    query: np.ndarray
    presence: np.ndarray
    union: np.ndarray
    weights: np.ndarray
    teacher: str
    features: np.ndarray | None = None  # alias teacher: the alias's prompt features float32[T, D]
    feature_mask: np.ndarray | None = None  # and its attention mask int[T]
    states: dict | None = None  # alias teacher: {"hidden": float32[K, Q, D], "enc": float32[K, g*g, D]}

    def feature_target(self, valid: int) -> dict | None:
        """{"target": float32[T, D], "mask": float32[T]}: the alias's prompt features, when the adapted label's
        prompt has `valid` positions like the alias's (position i of one is compared with position i of the
        other); None otherwise or without features (gt teacher)."""
        if self.features is None or int(np.sum(self.feature_mask)) != int(valid):
            return None
        return {"target": jnp.asarray(self.features, jnp.float32),
                "mask": jnp.asarray(self.feature_mask, jnp.float32)}

    def arrays(self) -> dict:
        return {"query": jnp.asarray(self.query, jnp.float32), "presence": jnp.asarray(self.presence, jnp.float32),
                "union": jnp.asarray(self.union, jnp.float32)}

    @property
    def n_images(self) -> int:
        return int(self.query.shape[0])


def image_contexts(model: Sam3, images: Sequence[np.ndarray]) -> dict:
    """uint8[H, W, 3] images -> their image contexts stacked on a leading axis [K, ...]."""
    ctxs = [model.encode_image(preprocess(np.asarray(im), model.config.image_size)) for im in images]
    return jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs, 0), *ctxs)


def teacher_outputs(model: Sam3, ids: Sequence[int], ctx: dict, threshold: float = scoring.KEEP_THRESHOLD,
                    states: bool = True) -> dict:
    """The model's outputs for content ids on stacked contexts [K, ...]: pred_logits float32[K, Q],
    presence_logits [K, 1], union_logits [K, m, m] (export's key: max over the queries the prediction rule keeps
    at `threshold`, the run's (run.json); UNION_FLOOR if none), and the prompt's own prompt_features float32[T, D]
    and attention_mask int32[T]; the detector's internal states on each image, query_states float32[K, Q, D]
    (decoder query states) and fused_image [K, g*g, D] (the fusion encoder's image tokens), which do not depend
    on the prompt's length (only with states=True: ~5.5 MB per image at SAM3's size, read by a lora's state
    term alone). The mask head is the engine's `detect_fast`, what
    training reads; the export's `predict` runs `detect`: the same values up to float rounding
    (tests/test_adapt.py measures it)."""
    from ..engine.predict import union_logits

    input_ids, mask = layout([ids], model.config.context_length)
    prompt = model.encode_text(input_ids, mask)
    dmask = model.prompt_mask(input_ids, mask)
    k = jax.tree_util.tree_leaves(ctx)[0].shape[0]
    both = [model.detect_fast_parts(jax.tree_util.tree_map(lambda x: x[i:i + 1], ctx), prompt, dmask)
            for i in range(k)]
    outs = [o for o, _ in both]
    logits = np.concatenate([np.asarray(o["pred_logits"], np.float32) for o in outs])
    presence = np.concatenate([np.asarray(o["presence_logits"], np.float32) for o in outs])
    masks = np.concatenate([np.asarray(o["pred_masks"], np.float32) for o in outs])
    out = {"pred_logits": logits, "presence_logits": presence,
           "union_logits": union_logits(masks, np.asarray(scoring.query_keep(logits, presence, threshold))),
           "prompt_features": np.asarray(prompt, np.float32)[0], "attention_mask": np.asarray(mask)[0]}
    if states:
        out["query_states"] = np.concatenate([np.asarray(p["hidden"], np.float32) for _, p in both])
        out["fused_image"] = np.concatenate([np.asarray(p["enc"], np.float32) for _, p in both])
    return out


def alias_targets(ctx: dict, outputs: dict, cfg: AdaptConfig) -> Targets:
    """Alias teacher from the alias's outputs (`teacher_outputs`, or an export's pred_logits / presence_logits /
    union_logits of the same images, and its prompt_features / attention_mask and query_states / fused_image
    when present)."""
    sig = lambda x: 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))  # noqa: E731
    return Targets(ctx, sig(outputs["pred_logits"]).astype(np.float32),
                   sig(np.asarray(outputs["presence_logits"])[:, 0]).astype(np.float32),
                   (np.asarray(outputs["union_logits"]) > 0).astype(np.float32),
                   np.asarray([cfg.w_query, cfg.w_presence, cfg.w_union], np.float32), "alias",
                   outputs.get("prompt_features"), outputs.get("attention_mask"),
                   {"hidden": np.asarray(outputs["query_states"], np.float32),
                    "enc": np.asarray(outputs["fused_image"], np.float32)} if "query_states" in outputs else None)


def gt_targets(ctx: dict, gts: Sequence[np.ndarray], is_negative: Sequence[bool], num_queries: int,
               mask_size: int, cfg: AdaptConfig) -> Targets:
    """GT teacher: gts bool[H_i, W_i] (empty for negatives) -> area-resized union targets, presence 1/0."""
    neg = np.asarray(is_negative, bool)
    union = np.stack([scoring.area_resize(np.asarray(g, bool), mask_size) for g in gts]).astype(np.float32)
    return Targets(ctx, np.zeros((len(gts), num_queries), np.float32), (~neg).astype(np.float32), union,
                   np.asarray([0.0, cfg.w_presence, cfg.w_union], np.float32), "gt")


# ----------------------------------------------------------------------------------------------------------------
def _bce_logits(x, t):
    """Elementwise binary cross-entropy of logits x against probabilities t (stable form)."""
    x = x.astype(jnp.float32)
    return jnp.maximum(x, 0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))


def image_loss(out: dict, target: dict, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Detector outputs on one image (pred_logits [1, Q], presence_logits [1, 1], pred_masks [1, Q, m, m]) and
    its targets (query [Q], presence [], union [m, m]) -> (loss [], parts float32[3]: query, presence, union)."""
    l_query = jnp.mean(_bce_logits(out["pred_logits"][0], target["query"]))
    l_presence = _bce_logits(out["presence_logits"][0, 0], target["presence"])
    u = jnp.clip(scoring.soft_union(out)[0], EPS, 1 - EPS)
    y = target["union"]
    bce = jnp.mean(-(y * jnp.log(u) + (1 - y) * jnp.log1p(-u)))
    dice = 1.0 - (2 * jnp.sum(u * y) + 1.0) / (jnp.sum(u) + jnp.sum(y) + 1.0)
    l_union = bce + jnp.where(jnp.sum(y) > 0, dice, 0.0)
    parts = jnp.stack([l_query, l_presence, l_union])
    return jnp.dot(weights, parts), parts
