"""The images of one category: search / held-out split, decoded images and ground truth, and the same images
rebuilt from a finished run's records (for export)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .rundir import RunSettings


@dataclass
class Split:
    """Images of one split, loaded: images uint8[H, W, 3], gts bool[H, W] (empty for negatives)."""

    images: list[np.ndarray]
    gts: list[np.ndarray]
    image_ids: list[str]
    is_negative: np.ndarray  # bool[K]

    def __len__(self) -> int:
        return len(self.images)

    @property
    def n_positive(self) -> int:
        return int((~self.is_negative).sum())


def load_split(cd) -> Split:
    """ConceptData -> Split: positives then negatives (decodes every image now; a corrupt file raises here)."""
    images, gts = [], []
    for i in range(len(cd.images)):
        images.append(cd.image(i))
        gts.append(np.asarray(cd.masks[i], bool))
    for j in range(len(cd.negatives)):
        img = cd.negative_image(j)
        images.append(img)
        gts.append(np.zeros(img.shape[:2], bool))
    flags = np.array([False] * len(cd.images) + [True] * len(cd.negatives), bool)
    return Split(images, gts, list(cd.image_ids) + list(cd.negative_ids), flags)


def check_budget(concepts, settings: RunSettings) -> None:
    """ValueError unless the budget pays for one candidate on every search image of each category (a candidate
    costs one evaluation per search image), checked before any search starts."""
    for cd in concepts:
        search, _ = split_category(cd, settings)
        k = len(search.images) + len(search.negatives)
        if settings.budget < k:
            raise ValueError(f"budget {settings.budget} is below {k}, the number of search images of {cd.name!r} "
                             "(one candidate costs one evaluation per search image)")


def split_category(cd, settings: RunSettings):
    """ConceptData (max_images already applied) -> (search ConceptData, held-out ConceptData or None)."""
    from ..data import split_concept

    n_neg = min(settings.negatives, len(cd.negatives))
    sub = cd.subset(range(len(cd.images)), range(n_neg))
    if settings.heldout <= 0 or len(sub.images) < 2:
        return sub, None
    search, held = split_concept(sub, settings.heldout, settings.seed)
    return search, (held if len(held.images) + len(held.negatives) else None)


def check_images(concepts: list, settings: RunSettings, skip: bool, log) -> tuple[list, dict[str, str]]:
    """Decode every image a run will use (each file once) before any search starts.

    -> (concepts without the unreadable images, {image id: reason}). Without `skip` an unreadable image is a
    ValueError naming it; with `skip` it is left out of every category (each a warning line) and a category left
    without positives is dropped."""
    seen: dict[str, str | None] = {}

    def reason(key: str, read) -> str | None:
        if key not in seen:
            try:
                read()
                seen[key] = None
            except (OSError, ValueError) as e:
                seen[key] = " ".join(str(e).split())
        return seen[key]

    out = []
    for cd in concepts:
        pos = [i for i in range(len(cd.images)) if reason(cd.image_ids[i], lambda i=i: cd.image(i)) is None]
        n_neg = min(settings.negatives, len(cd.negatives))
        neg = [j for j in range(len(cd.negatives))
               if j >= n_neg or reason(cd.negative_ids[j], lambda j=j: cd.negative_image(j)) is None]
        bad = {k: v for k, v in seen.items() if v is not None}
        if bad and not skip:
            iid, why = next(iter(bad.items()))
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise ValueError(f"{why}{more}; checked before any search: fix the image(s) or pass --skip-bad-images")
        if not pos:
            log(f"warning: category {cd.name!r} has no readable positive image: skipped")
            continue
        out.append(cd if len(pos) == len(cd.images) and len(neg) == len(cd.negatives) else cd.subset(pos, neg))
    bad = {k: v for k, v in seen.items() if v is not None}
    for iid, why in bad.items():
        log(f"warning: skipped unreadable image {iid}: {why}")
    return out, bad


def label_ids_of(label: str, name: str, max_length: int = 30) -> list[int]:
    """Content token ids of a category's natural label (ValueError naming the category if there are none)."""
    from ..tokenizer import encode

    ids = encode(label)[:max_length]
    if not ids:
        raise ValueError(f"category {name!r}: its label {label!r} has no tokens")
    return ids


def rebuild_inputs(settings: RunSettings, res: dict) -> dict:
    """A finished category's images in export order (search positives, search negatives, held-out positives,
    held-out negatives) -> {"images", "gts", "image_ids", "split", "is_negative"} (rebuilt from the dataset)."""
    from ..data import load_coco

    (cd,) = load_coco(settings.annotations, settings.images, categories=[res["category"]])
    pos = {iid: i for i, iid in enumerate(cd.image_ids)}
    neg = {iid: j for j, iid in enumerate(cd.negative_ids)}
    out: dict[str, list] = {"images": [], "gts": [], "image_ids": [], "split": [], "is_negative": []}
    ids = res["images"]
    for split in ("search", "heldout"):
        for iid in ids[split]:
            if iid not in pos:
                raise ValueError(f"image {iid} of category {res['category']!r} is no longer annotated in "
                                 f"{settings.annotations}")
            i = pos[iid]
            out["images"].append(cd.image(i))
            out["gts"].append(np.asarray(cd.masks[i], bool))
        for iid in ids[f"{split}_negatives"]:
            if iid not in neg:
                raise ValueError(f"negative image {iid} of category {res['category']!r} now has the category "
                                 f"(or is gone) in {settings.annotations}")
            img = cd.negative_image(neg[iid])
            out["images"].append(img)
            out["gts"].append(np.zeros(img.shape[:2], bool))
        n = len(ids[split]) + len(ids[f"{split}_negatives"])
        out["image_ids"] += ids[split] + ids[f"{split}_negatives"]
        out["split"] += [split] * n
        out["is_negative"] += [False] * len(ids[split]) + [True] * len(ids[f"{split}_negatives"])
    return out
