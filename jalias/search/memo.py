"""Search memory: the exact per-image IoUs of the sequences a search has scored, so that `Budget.score` never
pays twice for the same (sequence, image) pair, whichever method, step or halving rung asks again.

A bounded LRU of at most `capacity` sequences. Each entry holds one IoU per engine image (NaN where that image
was never scored for it), so successive halving reuses a sequence's score on image j whichever subset asks. The
state is plain JSON (base64 of little-endian arrays, exact for float32), part of the Budget's checkpoint, so a
resumed search remembers what the interrupted one had paid for and equals an uninterrupted run.
"""
from __future__ import annotations

import base64
from collections import OrderedDict
from typing import Optional

import numpy as np


def _b64(a: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype=dtype).tobytes()).decode("ascii")


def _unb64(s: str, dtype: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype=dtype).astype(dtype[1:]).copy()


def _grown(a: np.ndarray, rows: int, cols: Optional[int], fill) -> np.ndarray:
    """a copy of a (2-D [r, c], or 1-D when cols is None) padded with `fill` to rows (x cols)."""
    out = np.full((rows,) if cols is None else (rows, cols), fill, a.dtype)
    out[tuple(slice(0, n) for n in a.shape)] = a
    return out


class ScoreMemo:
    """LRU memory of exact IoUs float32[K] per content-id sequence (a tuple of ints), at most `capacity` of them.

    lookup(keys, images) -> float32[N, k] (NaN where unknown); store(keys, iou, images) records scores and marks
    every key as just used; the least recently used sequences are forgotten beyond capacity.
    """

    def __init__(self, capacity: int, n_images: int):
        if capacity < 1:
            raise ValueError(f"a ScoreMemo needs capacity >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.n_images = int(n_images)
        self._slot: OrderedDict[tuple[int, ...], int] = OrderedDict()  # least recently used first
        self._iou = np.full((0, self.n_images), np.nan, np.float32)  # grown up to capacity rows
        self._ids = np.full((0, 0), -1, np.int32)  # per slot its key, -1 padded (token ids are >= 0)
        self._used = 0  # slots handed out so far
        self._stamp = np.zeros(0, np.int64)  # last use per slot, so the LRU order serialises without a Python loop
        self._clock = 0

    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, key) -> bool:
        return tuple(key) in self._slot

    def lookup(self, keys: list[tuple[int, ...]], images: np.ndarray) -> np.ndarray:
        """float32[N, k] the remembered IoU of each key on each of images int[k]; NaN where unknown. Does not
        count as a use (store does)."""
        out = np.full((len(keys), images.size), np.nan, np.float32)
        for i, key in enumerate(keys):
            s = self._slot.get(key)
            if s is not None:
                out[i] = self._iou[s, images]
        return out

    def store(self, keys: list[tuple[int, ...]], iou: np.ndarray, images: np.ndarray) -> None:
        """Merge iou float32[N, k] (NaN: unknown) on images int[k] into each key's entry, in row order, each key
        becoming the most recently used; forgets the least recently used beyond capacity."""
        for key, row in zip(keys, iou):
            s = self._slot.get(key)
            if s is None:
                s = self._new_slot(key)
            else:
                self._slot.move_to_end(key)
            known = ~np.isnan(row)
            self._iou[s, images[known]] = row[known]
            self._stamp[s] = self._clock
            self._clock += 1

    def _new_slot(self, key: tuple[int, ...]) -> int:
        if len(self._slot) >= self.capacity:
            _, s = self._slot.popitem(last=False)
        else:
            s = self._used
            self._used += 1
            if s >= self._iou.shape[0]:  # grow geometrically, never past capacity
                rows = min(self.capacity, max(64, 2 * self._iou.shape[0]))
                self._iou = _grown(self._iou, rows, self.n_images, np.nan)
                self._ids = _grown(self._ids, rows, self._ids.shape[1], -1)
                self._stamp = _grown(self._stamp, rows, None, 0)
        if len(key) > self._ids.shape[1]:
            self._ids = _grown(self._ids, self._ids.shape[0], len(key), -1)
        self._ids[s] = -1
        self._ids[s, : len(key)] = key
        self._iou[s] = np.nan
        self._slot[key] = s
        return s

    # ---- checkpointing ----
    def state_dict(self) -> dict:
        """JSON types: the entries (ids, IoUs, last use) in slot order; exact for float32."""
        n, width = self._used, self._ids.shape[1]
        return {"capacity": self.capacity, "n": n, "width": width, "clock": self._clock,
                "ids": _b64(self._ids[:n], "<i4"), "iou": _b64(self._iou[:n], "<f4"), "stamp": _b64(self._stamp[:n], "<i8")}

    def load_state_dict(self, d: dict) -> None:
        n, width = int(d["n"]), int(d["width"])
        if n > self.capacity:
            raise ValueError(f"saved search memory holds {n} sequences, more than its capacity {self.capacity}")
        ids = _unb64(d["ids"], "<i4").reshape(n, width)
        iou = _unb64(d["iou"], "<f4").reshape(n, self.n_images)
        stamp = _unb64(d["stamp"], "<i8").reshape(n)
        keys = [tuple(t for t in row if t >= 0) for row in ids.tolist()]
        self._ids, self._iou, self._stamp, self._used = ids, iou, stamp, n
        self._slot = OrderedDict((keys[s], int(s)) for s in np.argsort(stamp, kind="stable"))
        self._clock = int(d["clock"])
