"""Skill of a trained model on evaluation images (EVAL_STREAM: never training images), by the engine's one
prediction rule.

- In-distribution: per trained "<colour> <shape>" concept, its label's mean IoU on images of the concept, and
  the fraction of images without it (other concepts' images) where the label predicts nothing.
- Out-of-distribution: per OOD concept, its label's mean IoU on images of the concept.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ..data import world
from ..engine.scoring import bilinear_matrix, exact_iou, layout_prompts
from ..model.preprocess import preprocess
from ..model.sam3 import Sam3
from ..tokenizer import encode


def concept_images(concept, n: int, size: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """n evaluation images of a concept (ID or OOD) and the union masks of its instances."""
    images, masks = [], []
    for k in range(n):
        sc = world.concept_scene(seed, concept, k, size)
        images.append(sc.image)
        masks.append(np.any([i.mask for i in sc.instances if i.concept == concept.name], axis=0))
    return images, masks


class Scorer:
    """IoU of text prompts on a fixed set of same-size images, by the engine's prediction rule
    (`engine.scoring.exact_iou`); one compiled program for every prompt (cheaper than an Engine per concept)."""

    def __init__(self, model: Sam3, images: list[np.ndarray], gts: list[np.ndarray]):
        self.model = model
        size = model.config.image_size
        px = np.concatenate([preprocess(im, size) for im in images])
        self.ctx = model.encode_image(px)
        self.gts = jnp.asarray(np.stack(gts))
        h, w = gts[0].shape
        m = 4 * model.config.vision.backbone.grid
        self.rows, self.cols = jnp.asarray(bilinear_matrix(h, m)), jnp.asarray(bilinear_matrix(w, m))

    def __call__(self, ids: list[int]) -> np.ndarray:
        """IoU float32[K] of one prompt (content token ids) on every image."""
        input_ids, mask = layout_prompts(np.asarray([ids], np.int64).reshape(1, len(ids)))
        fn = _iou_fn(self.model)
        return np.asarray(fn(self.model.params, self.ctx, jnp.asarray(input_ids), jnp.asarray(mask), self.gts,
                             self.rows, self.cols))


@functools.lru_cache(maxsize=4)
def _iou_fn(model: Sam3):
    def iou(params, ctx, ids, mask, gts, rows, cols):
        prompt, _ = model.apply("encode_text", model.apply("embed_tokens", ids, params=params), mask, params=params)
        k = gts.shape[0]
        out = model.apply("detect_fast", ctx, jnp.repeat(prompt, k, 0), jnp.repeat(mask, k, 0), params=params)
        out = {n: out[n][:, None] for n in ("pred_logits", "presence_logits", "pred_masks")}
        return jax.lax.map(lambda a: exact_iou(a[0], a[1], rows, cols), (out, gts))[:, 0]

    return jax.jit(iou)


def label_scores(model: Sam3, label: str, images, masks, negatives) -> tuple[np.ndarray, np.ndarray]:
    """IoU of `label` per positive image, and per negative image whether the prediction is empty."""
    gts = list(masks) + [np.zeros(im.shape[:2], bool) for im in negatives]
    iou = Scorer(model, list(images) + list(negatives), gts)(encode(label))
    return iou[:len(masks)], iou[len(masks):] == 1.0


def skill(model: Sam3, n_images: int = 8, seed: int = 0, id_concepts=None, ood_concepts=None) -> dict:
    """{"id_iou", "id_empty_rate", "ood_iou", "id": {name: {...}}, "ood": {name: iou}} on fresh images.

    Negatives of an ID concept: the first image of every other ID concept that holds no instance of it."""
    size = model.config.image_size
    ids = list(world.ID_CONCEPTS if id_concepts is None else id_concepts)
    oods = list(world.OOD_CONCEPTS if ood_concepts is None else ood_concepts)
    pos = {c.name: concept_images(c, n_images, size, seed) for c in ids}
    firsts = {c.name: world.concept_scene(seed, c, 0, size) for c in world.ID_CONCEPTS}
    per_id = {}
    for c in ids:
        negs = [sc.image for name, sc in firsts.items()
                if name != c.name and not any(i.concept == c.name for i in sc.instances)][:n_images]
        iou, empty = label_scores(model, c.label, *pos[c.name], negs)
        per_id[c.name] = {"iou": float(iou.mean()), "empty_rate": float(empty.mean())}
    per_ood = {}
    for c in oods:
        images, masks = concept_images(c, n_images, size, seed)
        iou, _ = label_scores(model, c.label, images, masks, [])
        per_ood[c.name] = float(iou.mean())
    return {
        "id_iou": float(np.mean([v["iou"] for v in per_id.values()])) if per_id else None,
        "id_empty_rate": float(np.mean([v["empty_rate"] for v in per_id.values()])) if per_id else None,
        "ood_iou": float(np.mean(list(per_ood.values()))) if per_ood else None,
        "n_images": n_images, "seed": seed, "id": per_id, "ood": per_ood,
    }
