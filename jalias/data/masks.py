"""Masks: the one IoU definition, instance unions, COCO polygon/RLE decoding and GT checks (numpy).

IoU definition (the engine's jax twin must implement exactly this):

    For boolean masks P and G over the last two axes (H, W):
        inter = count(P AND G),  union = count(P OR G)        (integer pixel counts)
        IoU   = 1.0                              if union == 0   (both empty: a correct "nothing here")
              = float32(inter) / float32(union)  otherwise       (division done in float32)
    Leading axes broadcast with numpy rules; the result is float32[broadcast(leading axes)].

So empty vs non-empty is 0.0, identical non-empty masks are 1.0. Counts up to 2**24 pixels are exact in
float32, so for any image up to 4096x4096 a float32 twin gives bit-identical values.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np
from pycocotools import mask as mask_utils


def rle_to_mask(rle: dict) -> np.ndarray:
    """Compressed RLE dict (bytes or str counts) -> bool[H, W] via pycocotools."""
    with warnings.catch_warnings():
        # pycocotools' decode trips numpy 2's __array__(copy=...) deprecation; harmless, just noisy.
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle).astype(bool)


def iou(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU of bool[..., H, W] masks -> float32[...]; empty/empty = 1.0 (see module docstring)."""
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    for name, m in (("pred", pred), ("gt", gt)):
        if m.dtype != np.bool_:
            raise ValueError(f"iou: {name} must be a bool mask, got {m.dtype} (threshold logits first, e.g. logits > 0)")
        if m.ndim < 2:
            raise ValueError(f"iou: {name} must have shape [..., H, W], got {list(m.shape)}")
    if pred.shape[-2:] != gt.shape[-2:]:
        raise ValueError(f"iou: mask sizes differ: pred {list(pred.shape)} vs gt {list(gt.shape)}")
    inter = np.logical_and(pred, gt).sum(axis=(-2, -1), dtype=np.int64)
    union = np.logical_or(pred, gt).sum(axis=(-2, -1), dtype=np.int64)
    safe = np.where(union == 0, 1, union)
    out = np.where(union == 0, np.float32(1.0), inter.astype(np.float32) / safe.astype(np.float32))
    return np.asarray(out, dtype=np.float32)


def union_of_instances(masks: Sequence[np.ndarray], shape: tuple[int, int] | None = None) -> np.ndarray:
    """Union of instance masks bool[H, W] -> bool[H, W].

    ``shape`` (H, W) is required when ``masks`` is empty (the result is then all False) and, when given,
    every mask must have that shape.
    """
    masks = list(masks)
    if not masks:
        if shape is None:
            raise ValueError("union_of_instances: no masks given and no shape to build an empty mask")
        return np.zeros(tuple(shape), dtype=bool)
    ref = tuple(shape) if shape is not None else np.asarray(masks[0]).shape
    out = np.zeros(ref, dtype=bool)
    for i, m in enumerate(masks):
        m = np.asarray(m)
        if m.dtype != np.bool_:
            raise ValueError(f"union_of_instances: mask {i} must be bool, got {m.dtype}")
        if m.shape != ref:
            raise ValueError(f"union_of_instances: mask {i} has shape {list(m.shape)}, expected {list(ref)}")
        out |= m
    return out


def _is_rle(seg: Any) -> bool:
    return isinstance(seg, dict) and "counts" in seg and "size" in seg


def annotation_rle(ann: Any, h: int, w: int) -> dict:
    """COCO segmentation (polygons, uncompressed RLE or compressed RLE) -> one compressed RLE dict.

    ``ann`` is a COCO annotation dict (its ``"segmentation"`` is used) or the segmentation itself.
    Polygons with fewer than 3 points have no area and are dropped (pycocotools would misread a
    4-number polygon as a box). Raises ValueError on malformed input or an RLE whose size is not (h, w).
    """
    seg = ann["segmentation"] if isinstance(ann, dict) and "segmentation" in ann else ann
    h, w = int(h), int(w)
    if _is_rle(seg):
        size = [int(v) for v in seg["size"]]
        if size != [h, w]:
            raise ValueError(f"RLE size {size} does not match image size [{h}, {w}]")
        counts = seg["counts"]
        if isinstance(counts, list):
            return mask_utils.frPyObjects(seg, h, w)  # uncompressed -> compressed
        if isinstance(counts, (str, bytes)):
            return {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        raise ValueError(f"RLE counts must be a list, str or bytes, got {type(counts).__name__}")
    if isinstance(seg, list):
        polys = []
        for p in seg:
            if not isinstance(p, (list, tuple)) or not all(isinstance(v, (int, float)) for v in p):
                raise ValueError("polygon segmentation must be a list of [x1, y1, x2, y2, ...] number lists")
            if len(p) % 2:
                raise ValueError(f"polygon has an odd number of coordinates ({len(p)})")
            if len(p) >= 6:
                polys.append([float(v) for v in p])
        if not polys:
            return mask_utils.encode(np.zeros((h, w), dtype=np.uint8, order="F"))
        return mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
    raise ValueError(f"unrecognised COCO segmentation of type {type(seg).__name__}")


def decode_rle(rle: dict) -> np.ndarray:
    """Compressed or uncompressed RLE dict -> bool[H, W]."""
    if not _is_rle(rle):
        raise ValueError("decode_rle expects a dict with 'size' and 'counts'")
    h, w = (int(v) for v in rle["size"])
    return rle_to_mask(annotation_rle(rle, h, w))


def decode_annotation(ann: Any, h: int, w: int) -> np.ndarray:
    """COCO annotation (or bare segmentation: polygons / uncompressed RLE / compressed RLE) -> bool[h, w]."""
    return rle_to_mask(annotation_rle(ann, h, w))


def encode_rle(mask: np.ndarray, compressed: bool = True) -> dict:
    """bool[H, W] -> COCO RLE dict. Compressed: ``counts`` is an ASCII str (JSON-ready); uncompressed:
    ``counts`` is a list of run lengths in column-major order starting with a run of zeros."""
    mask = np.asarray(mask)
    if mask.dtype != np.bool_ or mask.ndim != 2:
        raise ValueError(f"encode_rle expects bool[H, W], got {mask.dtype}{list(mask.shape)}")
    h, w = mask.shape
    if compressed:
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": [int(h), int(w)], "counts": rle["counts"].decode("ascii")}
    flat = mask.ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0] + runs  # counts always start with the length of the leading zero run
    return {"size": [int(h), int(w)], "counts": [int(r) for r in runs]}


def check_mask(mask: Any, shape: tuple[int, int], *, negative: bool = False, where: str = "mask") -> np.ndarray:
    """Validate a ground-truth mask and return it as bool[H, W].

    ``shape`` is the (H, W) of its image. Accepts bool arrays, or integer arrays holding only 0/1.
    An empty mask is only allowed when ``negative`` is True (an image declared not to contain the
    concept), and a negative must be empty. ``where`` names the mask in error messages.
    """
    m = np.asarray(mask)
    if m.dtype != np.bool_:
        if not np.issubdtype(m.dtype, np.integer) or (m.size and not np.isin(m, (0, 1)).all()):
            raise ValueError(f"{where}: expected a bool (or 0/1 integer) mask, got {m.dtype}")
        m = m.astype(bool)
    if m.ndim != 2:
        raise ValueError(f"{where}: expected a 2-D mask [H, W], got shape {list(m.shape)}")
    if tuple(m.shape) != tuple(int(v) for v in shape):
        raise ValueError(f"{where}: mask shape {list(m.shape)} does not match image shape {list(shape)}")
    has_pixels = bool(m.any())
    if negative and has_pixels:
        raise ValueError(f"{where}: declared negative but the mask has {int(m.sum())} foreground pixels")
    if not negative and not has_pixels:
        raise ValueError(f"{where}: ground-truth mask is empty (only images declared negative may have empty masks)")
    return m
