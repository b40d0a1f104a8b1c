"""COCO-format datasets -> one ConceptData per category (per-image union masks, negatives), lazily.

Ground truth per (category, image) is the union of all that category's instances in the image:
polygons, uncompressed RLE and compressed RLE alike. Crowd annotations (``iscrowd=1``) are included in
the union: they mark real pixels of the category, and jalias scores one semantic mask per image, so
leaving them out would punish SAM3 for segmenting exactly what was asked for.

Images are never decoded up front: a ConceptData holds file paths and reads an image when asked.
Masks are held as compressed RLE and decoded on access, so large datasets stay small in RAM.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence, TypeVar

import numpy as np
from pycocotools import mask as mask_utils

from ..model.preprocess import load_image
from .masks import annotation_rle, rle_to_mask

T = TypeVar("T")

# An image is either a path read on demand or an in-memory uint8[H, W, 3] array.
ImageSource = str | np.ndarray


def load_source(source: ImageSource) -> np.ndarray:
    """ImageSource -> uint8[H, W, 3] (reads the file for a path)."""
    if isinstance(source, np.ndarray):
        return source
    return load_image(source)


class RLEMasks(Sequence[np.ndarray]):
    """Read-only list of bool[H, W] masks stored as compressed RLE, decoded on each access."""

    def __init__(self, rles: Sequence[dict]):
        self._rles = list(rles)

    def __len__(self) -> int:
        return len(self._rles)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return RLEMasks(self._rles[i])
        return rle_to_mask(self._rles[i])

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"RLEMasks(n={len(self)})"


@dataclass
class ConceptData:
    """Everything the search needs about one concept.

    name: category / concept identifier.  label: the natural text prompt for it (e.g. "striped blob").
    images[i]: ImageSource (path or uint8[H, W, 3]) of the i-th positive image; ``image(i)`` loads it.
    masks[i]: bool[H, W] ground truth for images[i] (union of instances, never empty). May be a list or
        an RLEMasks (decoded on access); index it, don't mutate it.
    image_ids[i]: id of images[i] (COCO: the image's ``file_name``; synthetic: the Sample's image_id).
    negatives[j]: ImageSource of the j-th image WITHOUT the concept (its GT is the empty mask);
        ``negative_image(j)`` loads it.  negative_ids[j]: its id.
    """

    name: str
    label: str
    images: list[ImageSource]
    masks: Sequence[np.ndarray]
    image_ids: list[str]
    negatives: list[ImageSource] = field(default_factory=list)
    negative_ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    def image(self, i: int) -> np.ndarray:
        """uint8[H, W, 3] of positive image i; checks it matches its mask's size."""
        img = load_source(self.images[i])
        mask_shape = tuple(self.masks[i].shape)
        if img.shape[:2] != mask_shape:
            raise ValueError(
                f"image {self.image_ids[i]} is {img.shape[1]}x{img.shape[0]} but its annotations say "
                f"{mask_shape[1]}x{mask_shape[0]}"
            )
        return img

    def negative_image(self, j: int) -> np.ndarray:
        """uint8[H, W, 3] of negative image j."""
        return load_source(self.negatives[j])

    def subset(self, positives: Sequence[int], negatives: Sequence[int] = ()) -> "ConceptData":
        """A ConceptData holding only the given positive / negative indices (in the given order)."""
        masks = self.masks
        if isinstance(masks, RLEMasks):
            new_masks: Sequence[np.ndarray] = RLEMasks([masks._rles[i] for i in positives])
        else:
            new_masks = [masks[i] for i in positives]
        return ConceptData(
            name=self.name,
            label=self.label,
            images=[self.images[i] for i in positives],
            masks=new_masks,
            image_ids=[self.image_ids[i] for i in positives],
            negatives=[self.negatives[j] for j in negatives],
            negative_ids=[self.negative_ids[j] for j in negatives],
        )


def split_heldout(items: Sequence[T], fraction: float, seed: int = 0) -> tuple[list[T], list[T]]:
    """Deterministic random split -> (search, heldout), each keeping the input order.

    ``round(fraction * n)`` items go to heldout, clamped so both parts get at least one item when
    n >= 2; with n < 2 everything goes to search. ``fraction`` must be in (0, 1).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"heldout fraction must be between 0 and 1 (exclusive), got {fraction}")
    items = list(items)
    n = len(items)
    if n < 2:
        return items, []
    n_held = min(max(int(round(fraction * n)), 1), n - 1)
    held_idx = set(np.random.default_rng(seed).permutation(n)[:n_held].tolist())
    search = [x for i, x in enumerate(items) if i not in held_idx]
    heldout = [x for i, x in enumerate(items) if i in held_idx]
    return search, heldout


def split_concept(data: ConceptData, fraction: float, seed: int = 0) -> tuple[ConceptData, ConceptData]:
    """Split a ConceptData's positives and negatives with ``split_heldout`` -> (search, heldout)."""
    pos_search, pos_held = split_heldout(range(len(data.images)), fraction, seed)
    neg_search, neg_held = split_heldout(range(len(data.negatives)), fraction, seed + 1)
    return data.subset(pos_search, neg_search), data.subset(pos_held, neg_held)


def _read_annotations(annotations_json: str) -> dict[str, Any]:
    if os.path.isdir(annotations_json):
        raise IsADirectoryError(f"annotations {annotations_json} is a directory; give the COCO JSON file")
    if not os.path.isfile(annotations_json):
        raise FileNotFoundError(f"annotations file not found: {annotations_json}")
    try:
        with open(annotations_json, "r", encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"annotations file {annotations_json} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"annotations file {annotations_json} must hold a JSON object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"annotations file {annotations_json} has no '{key}' list (not COCO format)")
    return data


def _label_for(category: dict) -> str:
    # Natural prompt: an explicit "label" field if the file has one, else the name with '_' as spaces.
    label = category.get("label")
    return str(label) if label else str(category["name"]).replace("_", " ")


def load_coco(
    annotations_json: str | os.PathLike,
    images_dir: str | os.PathLike,
    categories: list[str] | None = None,
    max_images: int | None = None,
    log=None,
) -> list[ConceptData]:
    """Load a COCO instance-segmentation file as one ConceptData per category.

    categories: category names to load, in that order (None: every category that has masks, in file
        order; categories without masks are then skipped, each with a `log` line when log is given).
    max_images: cap on positives and, separately, on negatives per category (first images by id).
    Image ids returned are the COCO ``file_name`` strings; paths are ``images_dir/file_name``.
    Image files are neither opened nor checked here: a missing one raises FileNotFoundError when it is decoded.
    """
    annotations_json = os.fspath(annotations_json)
    images_dir = os.fspath(images_dir)
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    if os.path.isfile(images_dir):
        raise NotADirectoryError(f"images {images_dir} is a file; give the folder holding the images")
    if not os.path.isdir(images_dir):
        raise FileNotFoundError(f"images directory not found: {images_dir}")
    data = _read_annotations(annotations_json)

    cats_by_name: dict[str, dict] = {}
    for c in data["categories"]:
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise ValueError(f"{annotations_json}: every category needs an 'id' and a 'name', got {c!r}")
        cats_by_name.setdefault(str(c["name"]), c)
    if categories is None:
        wanted, explicit = list(cats_by_name), False
    else:
        wanted, explicit = list(categories), True
        for name in wanted:
            if name not in cats_by_name:
                valid = ", ".join(list(cats_by_name)[:8])
                more = f", ... ({len(cats_by_name)} in total)" if len(cats_by_name) > 8 else ""
                raise ValueError(f"unknown category '{name}' in {annotations_json}; valid ones include: {valid}{more}")

    images: dict[Any, dict] = {}
    for im in data["images"]:
        if not isinstance(im, dict) or not {"id", "file_name", "height", "width"} <= set(im):
            raise ValueError(f"{annotations_json}: every image needs id, file_name, height and width, got {im!r}")
        images[im["id"]] = im
    image_order = sorted(images, key=lambda k: (str(type(k)), k))

    # category id -> image id -> list of RLEs of its instances
    wanted_ids = {cats_by_name[n]["id"] for n in wanted}
    per_cat: dict[Any, dict[Any, list[dict]]] = {cid: {} for cid in wanted_ids}
    # Images where the category is annotated at all (even box-only): never usable as negatives.
    present: dict[Any, set] = {cid: set() for cid in wanted_ids}
    for ann in data["annotations"]:
        cid = ann.get("category_id")
        if cid not in wanted_ids:
            continue
        im = images.get(ann.get("image_id"))
        if im is None:
            raise ValueError(f"{annotations_json}: annotation {ann.get('id')} refers to unknown image_id {ann.get('image_id')}")
        present[cid].add(im["id"])
        if not ann.get("segmentation"):
            continue  # box-only annotation: no mask to score against
        try:
            rle = annotation_rle(ann, im["height"], im["width"])
        except ValueError as e:
            raise ValueError(f"{annotations_json}: annotation {ann.get('id')} ({im['file_name']}): {e}") from None
        per_cat[cid].setdefault(im["id"], []).append(rle)

    def path_of(im: dict) -> str:
        # not checked here: a missing file is found when the run decodes the images it uses (`check_images`,
        # which with --skip-bad-images leaves it out), so an unused image never stops a run
        return os.path.join(images_dir, str(im["file_name"]))

    out: list[ConceptData] = []
    for name in wanted:
        cat = cats_by_name[name]
        pos_ids, rles = [], []
        for iid in image_order:
            inst = per_cat[cat["id"]].get(iid)
            if not inst:
                continue
            merged = mask_utils.merge(inst) if len(inst) > 1 else inst[0]
            if mask_utils.area(merged) == 0:
                continue  # only degenerate polygons: no mask to score against
            pos_ids.append(iid)
            rles.append(merged)
            if max_images is not None and len(pos_ids) >= max_images:
                break
        if not pos_ids:
            if explicit:
                raise ValueError(f"category '{name}' has no segmentation masks in {annotations_json}")
            if log is not None:
                log(f"warning: category '{name}' has no segmentation masks in {annotations_json}: skipped")
            continue
        neg_ids = [iid for iid in image_order if iid not in present[cat["id"]]]
        if max_images is not None:
            neg_ids = neg_ids[:max_images]
        out.append(
            ConceptData(
                name=name,
                label=_label_for(cat),
                images=[path_of(images[i]) for i in pos_ids],
                masks=RLEMasks(rles),
                image_ids=[str(images[i]["file_name"]) for i in pos_ids],
                negatives=[path_of(images[i]) for i in neg_ids],
                negative_ids=[str(images[i]["file_name"]) for i in neg_ids],
            )
        )
    if not out:
        raise ValueError(f"no category in {annotations_json} has segmentation masks")
    return out
