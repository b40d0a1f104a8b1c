"""Procedural out-of-distribution concepts: textured shapes on cluttered backgrounds (numpy + PIL).

Each concept is a shape family plus a surface texture ("striped blob", "checkered star", ...). An image
of a concept holds 1-3 instances of it at random position / scale / rotation / colours and, half the
time, 1-2 distractor objects of other concepts, over a textured, cluttered background. Objects never
overlap, so each instance mask is exactly its visible pixels.

Instance masks are rasterised with pycocotools' polygon rasteriser, so the polygon written to COCO by
``write_coco`` decodes to exactly the same mask. Everything is a pure function of the seed: the image
for (seed, concept, k) does not depend on which other concepts were asked for.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from .coco import ConceptData
from .masks import encode_rle, rle_to_mask, union_of_instances


@dataclass(frozen=True)
class Concept:
    """name: identifier (also the COCO category name); label: its natural text prompt."""

    name: str
    label: str


@dataclass
class Instance:
    """One drawn object. polygons: COCO polygons ([x1, y1, x2, y2, ...] lists) rasterising exactly to
    ``mask``, or None when the shape has a hole (ring, crescent) and only an RLE can describe it."""

    concept: str
    mask: np.ndarray
    polygons: list[list[float]] | None


@dataclass
class Sample:
    """image: uint8[H, W, 3]; masks: concept name -> bool[H, W] union of its instances (empty if absent),
    one entry per concept of the dataset; instances: every object drawn, distractors included."""

    image: np.ndarray
    masks: dict[str, np.ndarray]
    image_id: str
    instances: list[Instance] = field(default_factory=list)


@dataclass
class Dataset:
    samples: list[Sample]
    concepts: list[Concept]

    def concept_data(self) -> list[ConceptData]:
        """One ConceptData per concept: images where its mask is non-empty are positives, the rest
        negatives (in-memory arrays)."""
        out = []
        for c in self.concepts:
            pos = [s for s in self.samples if s.masks[c.name].any()]
            neg = [s for s in self.samples if not s.masks[c.name].any()]
            out.append(
                ConceptData(
                    name=c.name,
                    label=c.label,
                    images=[s.image for s in pos],
                    masks=[s.masks[c.name] for s in pos],
                    image_ids=[s.image_id for s in pos],
                    negatives=[s.image for s in neg],
                    negative_ids=[s.image_id for s in neg],
                )
            )
        return out


# ---------------------------------------------------------------------------------------------------
# Shapes: (outer polygons, hole polygons) as float[N, 2] in a unit frame (fits in the unit disk).

Shape = tuple[list[np.ndarray], list[np.ndarray]]


def _circle(r: float, n: int = 40, cx: float = 0.0, cy: float = 0.0) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _blob(rng: np.random.Generator) -> Shape:
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    r = np.ones_like(t)
    for k in (2, 3, 4):
        r += rng.uniform(0.05, 0.18) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    pts = np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
    return [pts / np.abs(r).max()], []


def _star(rng: np.random.Generator) -> Shape:
    n = int(rng.integers(5, 8))
    inner = rng.uniform(0.42, 0.55)
    t = np.arange(2 * n) * np.pi / n
    r = np.where(np.arange(2 * n) % 2 == 0, 1.0, inner)
    return [np.stack([r * np.cos(t), r * np.sin(t)], axis=1)], []


def _ring(rng: np.random.Generator) -> Shape:
    return [_circle(1.0)], [_circle(rng.uniform(0.45, 0.6))]


def _crescent(rng: np.random.Generator) -> Shape:
    d = rng.uniform(0.4, 0.55)
    return [_circle(1.0)], [_circle(rng.uniform(0.8, 0.92), cx=d, cy=0.0)]


def _hexagon(rng: np.random.Generator) -> Shape:
    return [_circle(1.0, n=6)], []


def _cross(rng: np.random.Generator) -> Shape:
    a = rng.uniform(0.3, 0.42)  # half arm width
    q = [(a, 1), (a, a), (1, a), (1, -a), (a, -a), (a, -1), (-a, -1), (-a, -a), (-1, -a), (-1, a), (-a, a), (-a, 1)]
    return [np.asarray(q, dtype=np.float64)], []


# ---------------------------------------------------------------------------------------------------
# Textures: bool pattern from object-frame coordinates u, v (in object radii) -> which of 2 colours.


def _tri(x: np.ndarray) -> np.ndarray:
    return np.abs((x % 1.0) - 0.5) * 2.0  # triangle wave in [0, 1]


def _stripes(u, v, rng):
    return (u * rng.uniform(1.6, 2.4)) % 1.0 < 0.5


def _checker(u, v, rng):
    f = rng.uniform(1.6, 2.4)
    return (np.floor(u * f) + np.floor(v * f)) % 2 == 0


def _dots(u, v, rng):
    f = rng.uniform(2.0, 2.8)
    du, dv = (u * f) % 1.0 - 0.5, (v * f) % 1.0 - 0.5
    return du * du + dv * dv < 0.32**2


def _zigzag(u, v, rng):
    return (v * rng.uniform(1.6, 2.4) + 0.6 * _tri(u * 1.5)) % 1.0 < 0.5


def _grid(u, v, rng):
    f = rng.uniform(1.8, 2.6)
    return np.minimum((u * f) % 1.0, (v * f) % 1.0) < 0.28


def _speckled(u, v, rng):
    return rng.random(u.shape) < 0.5


def _plain(u, v, rng):
    return np.ones(u.shape, bool)  # one colour: the second of the pair never shows


def _triangle(rng: np.random.Generator) -> Shape:
    return [_circle(1.0, n=3)], []


def _square(rng: np.random.Generator) -> Shape:
    t = np.pi / 4 + np.arange(4) * np.pi / 2
    return [np.stack([np.cos(t), np.sin(t)], axis=1)], []


def _heart(rng: np.random.Generator) -> Shape:
    t = np.linspace(0, 2 * np.pi, 56, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y + 2.5], axis=1)
    return [pts / np.abs(pts).max()], []


def _arrow(rng: np.random.Generator) -> Shape:
    a = rng.uniform(0.18, 0.26)  # half shaft width
    head = rng.uniform(0.1, 0.3)  # where the head starts (x)
    q = [(-1, -a), (head, -a), (head, -0.62), (1, 0), (head, 0.62), (head, a), (-1, a)]
    return [np.asarray(q, dtype=np.float64)], []


def _diamond(rng: np.random.Generator) -> Shape:
    w = rng.uniform(0.5, 0.62)  # a rhombus taller than wide
    return [np.asarray([(0, -1), (w, 0), (0, 1), (-w, 0)], dtype=np.float64)], []


# Every shape and texture the generators know, by the word that names it.
SHAPES: dict[str, Callable] = {"blob": _blob, "star": _star, "ring": _ring, "crescent": _crescent,
                               "hexagon": _hexagon, "cross": _cross, "triangle": _triangle, "square": _square,
                               "heart": _heart, "arrow": _arrow, "diamond": _diamond}
TEXTURES: dict[str, Callable] = {"striped": _stripes, "checkered": _checker, "dotted": _dots, "zigzag": _zigzag,
                                 "gridded": _grid, "speckled": _speckled, "plain": _plain}


# name -> (label, shape, texture). Order fixes each concept's seed stream: append, don't reorder.
_REGISTRY: dict[str, tuple[str, Callable, Callable]] = {
    "striped_blob": ("striped blob", _blob, _stripes),
    "checkered_star": ("checkered star", _star, _checker),
    "dotted_ring": ("dotted ring", _ring, _dots),
    "zigzag_crescent": ("zigzag crescent", _crescent, _zigzag),
    "gridded_hexagon": ("gridded hexagon", _hexagon, _grid),
    "speckled_cross": ("speckled cross", _cross, _speckled),
}
CONCEPT_NAMES: list[str] = list(_REGISTRY)


def _raster(polys: list[np.ndarray], h: int, w: int) -> np.ndarray:
    """Union of polygons (float[N, 2] pixel coords) -> bool[h, w] via pycocotools (matches COCO decode)."""
    flat = [p.ravel().tolist() for p in polys]
    return rle_to_mask(mask_utils.merge(mask_utils.frPyObjects(flat, h, w)))


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, 3).astype(np.float64)


def _colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    # Two colours far enough apart that the texture stays visible.
    a = _random_colour(rng)
    for _ in range(50):
        b = _random_colour(rng)
        if np.abs(a - b).sum() > 220:
            break
    return a, b


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Cluttered textured background, uint8[size, size, 3]."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    ang = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(ang) * xx + np.sin(ang) * yy)[..., None]
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    c0, c1 = _random_colour(rng), _random_colour(rng)
    img = c0 * (1 - ramp) + c1 * ramp
    # Smooth colour noise: a coarse random grid upsampled by PIL.
    g = max(2, size // 8)
    coarse = rng.integers(0, 256, (g, g, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR), dtype=np.float64)
    img = 0.6 * img + 0.4 * smooth
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(6, 14))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x0, y0, x1, y1 = (float(v) for v in rng.uniform(-0.1, 1.1, 4) * size)
        box = [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]
        kind = int(rng.integers(0, 3))
        width = max(1, int(rng.integers(1, max(2, size // 20) + 1)))
        if kind == 0:
            draw.line([(x0, y0), (x1, y1)], fill=colour, width=width)
        elif kind == 1:
            draw.ellipse(box, outline=colour, width=width)
        else:
            draw.rectangle(box, outline=colour, width=width)
    out = np.asarray(canvas, dtype=np.float64)
    out += rng.normal(0, 6, out.shape)  # fine grain
    return np.clip(out, 0, 255).astype(np.uint8)


def _draw_object(
    rng: np.random.Generator, img: np.ndarray, concept: str, cx: float, cy: float, radius: float
) -> Instance:
    """Paint one object of ``concept`` into ``img`` (in place); return its Instance."""
    _, shape_fn, texture_fn = _REGISTRY[concept]
    return draw_shape(rng, img, concept, shape_fn, texture_fn, cx, cy, radius)


def draw_shape(rng: np.random.Generator, img: np.ndarray, concept: str, shape_fn: Callable, texture_fn: Callable,
               cx: float, cy: float, radius: float, colour: np.ndarray | None = None) -> Instance:
    """Paint one ``shape_fn`` object with ``texture_fn`` at (cx, cy), radius in pixels, into ``img`` (uint8[H, W, 3],
    in place); return its Instance (tagged ``concept``). colour: RGB float[3] of a one-colour object (jittered by
    +-20 per channel); default a random pair far enough apart for the texture to show."""
    h, w = img.shape[:2]
    outer, holes = shape_fn(rng)
    rot = rng.uniform(0, 2 * np.pi)
    c, s = np.cos(rot), np.sin(rot)
    rotm = np.array([[c, -s], [s, c]])

    def place(p: np.ndarray) -> np.ndarray:
        return p @ rotm.T * radius + np.array([cx, cy])

    outer_px = [place(p) for p in outer]
    mask = _raster(outer_px, h, w)
    if holes:
        mask &= ~_raster([place(p) for p in holes], h, w)
    # Object-frame coordinates so the texture rotates and scales with the object.
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    dx, dy = (xx + 0.5 - cx) / radius, (yy + 0.5 - cy) / radius
    u, v = c * dx + s * dy, -s * dx + c * dy
    pattern = texture_fn(u, v, rng)
    if colour is None:
        ca, cb = _colour_pair(rng)
    else:
        ca = cb = np.clip(np.asarray(colour, np.float64) + rng.uniform(-20, 20, 3), 0, 255)
    shade = 0.85 + 0.3 * rng.random()  # mild brightness change per object
    painted = np.where(pattern[..., None], ca, cb) * shade
    img[mask] = np.clip(painted[mask], 0, 255).astype(np.uint8)
    polygons = None if holes else [[float(x) for x in p.ravel()] for p in outer_px]
    return Instance(concept=concept, mask=mask, polygons=polygons)


def place_object(rng: np.random.Generator, size: int, placed: list[tuple[float, float, float]],
                 radius: tuple[float, float] = (0.13, 0.24)):
    """Random (cx, cy, r) inside the image not overlapping earlier objects, or None after many tries;
    r is drawn from ``radius`` (fractions of the image side)."""
    for _ in range(200):
        r = rng.uniform(*radius) * size
        cx, cy = rng.uniform(r, size - r, 2)
        if all(np.hypot(cx - px, cy - py) > r + pr + 1.5 for px, py, pr in placed):
            return float(cx), float(cy), float(r)
    return None


def _make_sample(seed: int, concept: str, k: int, size: int, names: list[str]) -> Sample:
    rng = np.random.default_rng([seed, CONCEPT_NAMES.index(concept), k])
    img = background(rng, size)
    targets = int(rng.integers(1, 4))
    others = [n for n in CONCEPT_NAMES if n != concept]
    distractors = list(rng.choice(others, size=int(rng.integers(1, 3)), replace=True)) if rng.random() < 0.5 else []
    placed: list[tuple[float, float, float]] = []
    instances = []
    for i, name in enumerate([concept] * targets + [str(d) for d in distractors]):
        spot = place_object(rng, size, placed)
        if spot is None:
            continue  # image is full; fewer objects is fine (the first one always fits)
        placed.append(spot)
        inst = _draw_object(rng, img, name, *spot)
        if inst.mask.any():
            instances.append(inst)
    masks = {
        n: union_of_instances([i.mask for i in instances if i.concept == n], shape=(size, size)) for n in names
    }
    return Sample(image=img, masks=masks, image_id=f"{concept}_{k:03d}", instances=instances)


def make_dataset(
    n_images_per_concept: int = 8, image_size: int = 64, concepts: list[str] | None = None, seed: int = 0
) -> Dataset:
    """Build the synthetic dataset: ``n_images_per_concept`` images per concept, uint8[S, S, 3] with
    S = ``image_size``, concept-major order, image ids "<concept>_<k:03d>".

    concepts: names from ``CONCEPT_NAMES`` (default: all). Deterministic in ``seed``.
    """
    names = list(CONCEPT_NAMES) if concepts is None else list(concepts)
    for n in names:
        if n not in _REGISTRY:
            raise ValueError(f"unknown synthetic concept '{n}'; choose from: {', '.join(CONCEPT_NAMES)}")
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"concepts must be a non-empty list without repeats, got {names}")
    if n_images_per_concept < 1:
        raise ValueError(f"n_images_per_concept must be >= 1, got {n_images_per_concept}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 for the shapes to be drawable, got {image_size}")
    samples = [_make_sample(seed, c, k, int(image_size), names) for c in names for k in range(n_images_per_concept)]
    return Dataset(samples=samples, concepts=[Concept(n, _REGISTRY[n][0]) for n in names])


def write_coco(dataset: Dataset, out_dir: str | os.PathLike) -> tuple[str, str]:
    """Write PNGs to ``out_dir/images/<image_id>.png`` and COCO annotations to
    ``out_dir/annotations.json``; returns (annotations_json_path, images_dir).

    One annotation per instance of a dataset concept (distractors of concepts outside the dataset
    are background). Formats rotate so every decoder path is exercised: polygons where the shape
    allows, compressed RLE, uncompressed RLE; the second annotation is ``iscrowd=1`` (uncompressed
    RLE, as COCO does for crowds). Categories carry a "label" field with the natural prompt.
    """
    out_dir = os.fspath(out_dir)
    images_dir = os.path.join(out_dir, "images")
    os.makedirs(images_dir, exist_ok=True)
    cat_ids = {c.name: i + 1 for i, c in enumerate(dataset.concepts)}
    images, annotations = [], []
    for img_idx, sample in enumerate(dataset.samples):
        h, w = sample.image.shape[:2]
        file_name = f"{sample.image_id}.png"
        Image.fromarray(sample.image).save(os.path.join(images_dir, file_name))
        images.append({"id": img_idx + 1, "file_name": file_name, "height": int(h), "width": int(w)})
        for inst in sample.instances:
            if inst.concept not in cat_ids:
                continue
            n = len(annotations)
            crowd = n == 1
            if crowd or n % 3 == 2:
                seg = encode_rle(inst.mask, compressed=False)
            elif inst.polygons is not None and n % 3 == 0:
                seg = inst.polygons
            else:
                seg = encode_rle(inst.mask, compressed=True)
            rle = mask_utils.encode(np.asfortranarray(inst.mask.astype(np.uint8)))
            annotations.append(
                {
                    "id": n + 1,
                    "image_id": img_idx + 1,
                    "category_id": cat_ids[inst.concept],
                    "segmentation": seg,
                    "area": float(mask_utils.area(rle)),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": int(crowd),
                }
            )
    categories = [
        {"id": cat_ids[c.name], "name": c.name, "label": c.label, "supercategory": "synthetic"}
        for c in dataset.concepts
    ]
    ann_path = os.path.join(out_dir, "annotations.json")
    with open(ann_path, "w", encoding="utf-8") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return ann_path, images_dir
