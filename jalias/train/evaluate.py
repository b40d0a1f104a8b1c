"""Skill of a trained model on evaluation images (EVAL_STREAM: never training images), by the engine's one
prediction rule.

- In-distribution: per trained "<texture> <shape>" concept, its label's mean IoU on images of the concept, and
  the fraction of images without it (other concepts' images) where the label predicts nothing.
- Out-of-distribution: per OOD concept, its label's mean IoU on images of the concept.
"""

from __future__ import annotations

import numpy as np

from ..data import world
from ..engine import Engine
from ..model.sam3 import Sam3


def concept_images(concept, n: int, size: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """n evaluation images of a concept (ID or OOD) and the union masks of its instances."""
    images, masks = [], []
    for k in range(n):
        sc = world.concept_scene(seed, concept, k, size)
        images.append(sc.image)
        masks.append(np.any([i.mask for i in sc.instances if i.concept == concept.name], axis=0))
    return images, masks


def label_scores(model: Sam3, label: str, images, masks, negatives) -> tuple[np.ndarray, np.ndarray]:
    """IoU of `label` per positive image, and per negative image whether the prediction is empty."""
    gts = list(masks) + [np.zeros(im.shape[:2], bool) for im in negatives]
    flags = [False] * len(masks) + [True] * len(negatives)
    eng = Engine(model, list(images) + list(negatives), gts, negative=flags, compilation_cache=False)
    iou = eng.score_text([label])[0]
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
