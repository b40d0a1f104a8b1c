"""The one image preprocessing path: uint8 RGB images -> SAM3 ``pixel_values``.

It reproduces what ``transformers.Sam3ImageProcessor`` (a ``TorchvisionBackend`` processor) does to an
image for ``Sam3Model`` when run on CPU:

1. resize to (S, S) with bilinear interpolation *with antialiasing* on the uint8 image
   (``torchvision.transforms.v2.functional.resize`` -> ``torch.nn.functional.interpolate(...,
   mode="bilinear", antialias=True)`` on the uint8 tensor, which uses torch's fixed-point uint8 kernel
   ported from Pillow-SIMD: int16 weights, horizontal pass then vertical pass, each rounded back to uint8);
2. rescale by 1/255 and normalize with mean = std = (0.5, 0.5, 0.5), fused the way transformers fuses
   them: ``(x - 127.5) / 127.5`` in float32.

The resize is re-implemented here in numpy with the same integer arithmetic, so on CPU the result is
bit-identical to the transformers processor (tests/test_data.py checks this, also without torchvision).
S comes from the model config (1008 for the released SAM3 checkpoint).
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Sam3ImageProcessor defaults (IMAGENET_STANDARD_MEAN / _STD, rescale_factor=1/255, size 1008x1008).
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
RESCALE_FACTOR = 1.0 / 255.0
DEFAULT_IMAGE_SIZE = 1008


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as uint8[H, W, 3] RGB.

    EXIF orientation is applied (as ``transformers.image_utils.load_image`` does). Images with
    transparency are composited onto white, which is what the SAM3 processor does to a PIL image with
    alpha; grayscale / palette / CMYK images are converted to RGB.
    Raises FileNotFoundError if the file is missing, ValueError if it cannot be decoded.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            if "A" in im.getbands() or im.info.get("transparency") is not None:
                rgba = im.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(white, rgba)
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image file {path}: {e}") from None
    return np.ascontiguousarray(rgb)


def _aa_bilinear_int16_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Fixed-point weights of torch's uint8 antialiased bilinear resize along one axis.

    Returns (xmin int64[out], xsize int64[out], weights int32[out, K], precision) where output pixel i is
    ``(2**(precision-1) + sum_k in[xmin[i] + k] * weights[i, k]) >> precision`` for k < xsize[i].
    The float arithmetic follows torch's ``_compute_weights_aa`` operation by operation so the rounded
    int16 weights come out identical.
    """
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0  # bilinear filter support 1, widened when downsampling
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    kmax = int(math.ceil(support)) * 2 + 1

    center = scale * (np.arange(out_size, dtype=np.float64) + 0.5)
    # C++ casts truncate toward zero; np.trunc reproduces that for the (possibly negative) lower bound.
    xmin = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size)
    xsize = xmax - xmin

    taps = np.arange(kmax, dtype=np.int64)
    pos = (taps[None, :] + xmin[:, None]).astype(np.float64)
    x = (pos - center[:, None] + 0.5) * invscale
    w = np.maximum(1.0 - np.abs(x), 0.0)
    w = np.where(taps[None, :] < xsize[:, None], w, 0.0)
    # Sum taps left to right like the C++ loop, so the normalisation rounds the same way.
    total = np.zeros(out_size, dtype=np.float64)
    for k in range(kmax):
        total = total + w[:, k]
    w = np.where(total[:, None] != 0.0, w / np.where(total == 0.0, 1.0, total)[:, None], w)

    w_max = float(w.max())
    precision = 0
    while precision < 22 and int(0.5 + w_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    w_int = np.trunc(0.5 + w * (1 << precision)).astype(np.int32)  # bilinear weights are never negative
    return xmin, xsize, w_int, precision


def _resize_axis(image: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """One separable antialiased-bilinear pass over ``axis`` of a uint8 array; returns uint8."""
    in_size = image.shape[axis]
    if in_size == out_size:
        return image
    xmin, xsize, w, precision = _aa_bilinear_int16_weights(in_size, out_size)
    src = np.moveaxis(image, axis, 0)
    acc = np.full((out_size,) + src.shape[1:], 1 << (precision - 1), dtype=np.int32)
    extra = (slice(None),) + (None,) * (src.ndim - 1)
    for k in range(w.shape[1]):
        # Taps past xsize carry weight 0; clamp their index so the gather stays in bounds.
        idx = np.minimum(xmin + k, in_size - 1)
        wk = np.where(k < xsize, w[:, k], 0)
        acc += src[idx].astype(np.int32) * wk[extra]
    out = np.clip(acc >> precision, 0, 255).astype(np.uint8)
    return np.moveaxis(out, 0, axis)


def resize_image(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize uint8[H, W, C] to uint8[h, w, C] exactly like torch's uint8 antialiased bilinear resize.

    ``size`` is an int (square) or (h, w). Horizontal pass first, then vertical, as torch (and PIL) do.
    """
    h, w = (size, size) if isinstance(size, (int, np.integer)) else size
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"resize_image expects uint8[H, W, C], got {image.dtype}{list(image.shape)}")
    if h < 1 or w < 1:
        raise ValueError(f"resize size must be positive, got {(h, w)}")
    out = _resize_axis(image, int(w), axis=1)
    return _resize_axis(out, int(h), axis=0)


def _check_rgb_uint8(image: object, where: str) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{where}: expected a numpy uint8[H, W, 3] array, got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"{where}: expected uint8[H, W, 3] RGB, got {image.dtype}{list(image.shape)} "
            "(use jalias.data.images.load_image to read files)"
        )
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"{where}: image is empty, shape {list(image.shape)}")
    return image


def preprocess(images: np.ndarray | Sequence[np.ndarray], image_size: int) -> np.ndarray:
    """uint8[H, W, 3] image (or a list of them, or uint8[B, H, W, 3]) -> float32[B, 3, S, S] pixel_values.

    S = ``image_size`` (from the model config; 1008 for released SAM3). Each image is resized to (S, S)
    ignoring aspect ratio, then mapped to [-1, 1] via ``(x - 127.5) / 127.5``, channels first.
    """
    if isinstance(images, np.ndarray) and images.ndim == 3:
        batch = [images]
    elif isinstance(images, np.ndarray) and images.ndim == 4:
        batch = list(images)
    elif isinstance(images, (list, tuple)):
        batch = list(images)
    else:
        raise ValueError(
            "preprocess expects uint8[H, W, 3], uint8[B, H, W, 3] or a list of uint8[H, W, 3], got "
            f"{type(images).__name__}{list(getattr(images, 'shape', []))}"
        )
    if not batch:
        raise ValueError("preprocess got an empty list of images")
    if int(image_size) != image_size or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    size = int(image_size)

    # transformers fuses rescale+normalize as normalize(x, mean/rescale, std/rescale) in float32.
    mean = (np.asarray(IMAGE_MEAN, np.float32) * np.float32(1.0 / RESCALE_FACTOR)).reshape(3, 1, 1)
    std = (np.asarray(IMAGE_STD, np.float32) * np.float32(1.0 / RESCALE_FACTOR)).reshape(3, 1, 1)
    out = np.empty((len(batch), 3, size, size), dtype=np.float32)
    for i, image in enumerate(batch):
        image = _check_rgb_uint8(image, f"preprocess image {i}")
        resized = resize_image(image, size).transpose(2, 0, 1).astype(np.float32)
        out[i] = (resized - mean) / std
    return out


def resize_mask(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """bool[..., H, W] -> bool[..., h, w] by nearest neighbour, matching torch ``mode="nearest-exact"``.

    This is how Sam3ImageProcessor resizes segmentation maps to its 288x288 ``labels`` (PIL NEAREST maps
    to torchvision NEAREST_EXACT): source index ``min(floor((i + 0.5) * (in / out)), in - 1)``, with the
    scale in float32 as torch computes it.
    """
    mask = np.asarray(mask)
    if mask.dtype != np.bool_ or mask.ndim < 2:
        raise ValueError(f"resize_mask expects bool[..., H, W], got {mask.dtype}{list(mask.shape)}")
    h, w = (size, size) if isinstance(size, (int, np.integer)) else size
    if h < 1 or w < 1:
        raise ValueError(f"resize size must be positive, got {(h, w)}")

    def src_index(in_size: int, out_size: int) -> np.ndarray:
        scale = np.float32(in_size) / np.float32(out_size)
        pos = ((np.arange(out_size) + 0.5) * np.float64(scale)).astype(np.float32)
        return np.minimum(np.floor(pos).astype(np.int64), in_size - 1)

    rows = src_index(mask.shape[-2], int(h))
    cols = src_index(mask.shape[-1], int(w))
    return mask[..., rows[:, None], cols[None, :]]
