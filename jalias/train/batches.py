"""Training batches: a pool of rendered training scenes, and (image, prompt) pairs with their instance targets.

A batch holds B images and P prompts per image (B*P pairs). About half the prompts name something in the image
(a "<colour> <shape>" combination, a shape or a colour present); the rest name something absent, or are 1-4
random tokens, and train presence to 0. Targets are the referred instances: masks area-resized to the mask head's
resolution, boxes xyxy in [0, 1].
"""

from __future__ import annotations

import numpy as np

from ..data import world
from ..engine.scoring import area_resize, layout_prompts
from ..model.config import Sam3Config
from ..model.preprocess import preprocess
from ..tokenizer import START_ID, encode
from .config import TrainConfig

MAX_TARGETS = 4  # training scenes hold at most 4 objects


class Pool:
    """The training images: scene k is `world.training_scene(seed, k, size)`, rendered on first use and kept (a run
    touches each scene once it is drawn, so nothing is rendered up front and a resumed run renders only what it
    draws). `get(k)` -> (pixel_values float32[1, 3, S, S], scene, masks float32[n, m, m] area-resized to the mask
    head, boxes float32[n, 4] xyxy in [0, 1])."""

    def __init__(self, cfg: Sam3Config, seed: int, n: int):
        self.size, self.m, self.seed, self.n = cfg.image_size, 4 * cfg.vision.backbone.grid, seed, n
        self._cache: dict[int, tuple] = {}

    def __len__(self) -> int:
        return self.n

    def get(self, k: int) -> tuple:
        if k not in self._cache:
            s = world.training_scene(self.seed, k, self.size)
            masks = np.stack([area_resize(x, self.m) for x in s.masks]).astype(np.float32)
            self._cache[k] = (preprocess(s.image, self.size), s, masks, np.stack([mask_box(x) for x in s.masks]))
        return self._cache[k]


def mask_box(mask: np.ndarray) -> np.ndarray:
    """bool[H, W] -> float32[4] xyxy box of its pixels, normalised to [0, 1] (pixel edges, as SAM3's boxes)."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    return np.array([xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h], np.float32)


def build_pool(cfg: Sam3Config, train: TrainConfig, n: int | None = None) -> Pool:
    return Pool(cfg, train.seed, train.pool_size if n is None else n)


def _phrase_ids() -> dict:
    return {p: encode(world.phrase_text(p)) for p in world.training_phrases()}


_PHRASE_IDS: dict | None = None


def phrase_ids() -> dict:
    """Token ids (content only) of every training phrase."""
    global _PHRASE_IDS
    if _PHRASE_IDS is None:
        _PHRASE_IDS = _phrase_ids()
    return _PHRASE_IDS


def reserved_tokens() -> np.ndarray:
    """Token ids random negatives never use: every training phrase's and every OOD label's tokens."""
    ids = {t for v in phrase_ids().values() for t in v}
    ids |= {t for c in world.OOD_CONCEPTS for t in encode(c.label)}
    return np.array(sorted(ids))


def _present_phrases(scene: world.Scene) -> list[list]:
    combos = sorted({(t, s) for s, t in zip(scene.shapes, scene.colours)})
    shapes = sorted({(None, s) for s in scene.shapes})
    colours = sorted({(t, None) for t in scene.colours})
    return [combos, shapes, colours]


def _absent_phrase(rng: np.random.Generator, scene: world.Scene, colour_only: bool = False) -> tuple:
    kind = 2 if colour_only else rng.choice(3, p=[0.6, 0.2, 0.2])
    while True:
        if kind == 0:
            s, t = world.TRAIN_COMBOS[int(rng.integers(len(world.TRAIN_COMBOS)))]
            p = (t, s)
        elif kind == 1:
            p = (None, world.TRAIN_SHAPES[int(rng.integers(len(world.TRAIN_SHAPES)))])
        else:
            p = (world.COLOUR_NAMES[int(rng.integers(len(world.COLOUR_NAMES)))], None)
        if not world.phrase_targets(scene, p):
            return p


def layout_ragged(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Content ids of varying length -> (input_ids, attention_mask) int32[N, 32], each row laid out as
    `layout_prompts` lays out one: [START, ids..., END, PAD...]."""
    out, mask = [], []
    for r in rows:
        i, m = layout_prompts(np.asarray([r], np.int64).reshape(1, len(r)))
        out.append(i[0])
        mask.append(m[0])
    return np.stack(out), np.stack(mask)


def sample_batch(pool: Pool, train: TrainConfig, step: int, reserved: np.ndarray) -> dict:
    """The batch of training step ``step`` (a pure function of (seed, step)):
    pixel_values [B, 3, S, S]; input_ids/attention_mask int32[B*P, 32]; tmask float32[B*P, M, m, m];
    tbox float32[B*P, M, 4]; tvalid bool[B*P, M]; present float32[B*P]. Pair b*P + j uses image b."""
    rng = np.random.default_rng([world.TRAIN_STREAM, train.seed, 7, step])
    b, p = train.images_per_step, train.prompts_per_image
    m = pool.m
    picks = rng.integers(0, len(pool), b)
    ids, tmask = [], np.zeros((b * p, MAX_TARGETS, m, m), np.float32)
    tbox = np.zeros((b * p, MAX_TARGETS, 4), np.float32)
    tvalid = np.zeros((b * p, MAX_TARGETS), bool)
    present = np.zeros(b * p, np.float32)
    vocab = np.setdiff1d(np.arange(START_ID), reserved)
    colour_only = step < train.colour_only_steps  # curriculum: ground colour words first
    pixels = []
    for i, k in enumerate(picks):
        px, scene, masks, boxes = pool.get(int(k))
        pixels.append(px)
        groups = [g for g in _present_phrases(scene)]
        n_pos = p // 2
        for j in range(p):
            row = i * p + j
            if j < n_pos:
                kind = 2 if colour_only else int(rng.choice(3, p=[0.5, 0.25, 0.25]))
                g = groups[kind]
                phrase = g[int(rng.integers(len(g)))]
            elif rng.random() < train.random_token_negatives:
                ids.append(list(rng.choice(vocab, int(rng.integers(1, 5)))))
                continue
            else:
                phrase = _absent_phrase(rng, scene, colour_only)
            ids.append(phrase_ids()[phrase])
            tg = world.phrase_targets(scene, phrase)
            for slot, obj in enumerate(tg):
                tmask[row, slot] = masks[obj]
                tbox[row, slot] = boxes[obj]
                tvalid[row, slot] = True
            present[row] = float(bool(tg))
    input_ids, mask = layout_ragged(ids)
    return {"pixel_values": np.concatenate(pixels), "input_ids": input_ids, "attention_mask": mask,
            "tmask": tmask, "tbox": tbox, "tvalid": tvalid, "present": present}
