"""How a batch of candidates is cut into compiled chunks: padded row buckets and shared text prefixes."""

from __future__ import annotations

import math

import numpy as np

MIN_BUCKET = 16


def shared_prefix(ids: np.ndarray, mask: np.ndarray, ref: np.ndarray, ref_mask: np.ndarray) -> np.ndarray:
    """Per row: how many leading positions (ids and mask) equal the reference's, counting only real tokens
    before the reference's END (so a cached prefix never includes END or padding)."""
    same = (ids == ref[None]) & (mask == ref_mask[None])
    first_diff = np.where(same.all(1), ids.shape[1], np.argmin(same, axis=1))
    ref_len = int(ref_mask.sum()) - 1  # START + content tokens
    return np.minimum(first_diff, ref_len)


def prefix_bucket(p: int) -> int:
    """Round cached-prefix lengths down to a multiple of 4 (bounds the number of compiled variants)."""
    return (p // 4) * 4


def row_bucket(n: int, chunk: int, devices: int) -> int:
    """Rows a chunk of n candidates is padded to: a power of two, at least MIN_BUCKET (few compiled programs: one
    prompt or sixteen run the same program), at most the chunk size, a multiple of the device count."""
    b = max(devices, MIN_BUCKET, 1 << max(0, (n - 1).bit_length()))
    b = min(b, chunk) if n <= chunk else b
    return int(math.ceil(b / devices) * devices)
