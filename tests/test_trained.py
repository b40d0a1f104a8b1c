"""The shipped trained small SAM3 (weights/small): torch parity of its trained weights, its stored metrics
reproduce, and it is really trained (torch's forward with the same weights segments concepts from their names).

The checkpoint is written by `jalias train` (weights/README.md); these tests load it through the same
`jalias.weights.load` path every command uses."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from jalias.data import world
from jalias.data.masks import iou
from jalias.model.preprocess import preprocess
from jalias.tokenizer import tokenize
from jalias.train.evaluate import skill
from jalias.weights import load

from parity_utils import jax_forward, torch_forward, torch_model_of
from test_parity import assert_outputs_match

SMALL = Path(__file__).resolve().parents[1] / "weights" / "small"


@pytest.fixture(scope="module")
def model():
    return load(SMALL, dtype="float32")


@pytest.fixture(scope="module")
def stored():
    return json.loads((SMALL / "metrics.json").read_text())


def _scene_batch(size: int):
    """Two evaluation images (never training images) with the labels of concepts in them, and one with a colour
    word. The concepts are two the card lists among the best (purple triangle, white square)."""
    a, b = (next(c for c in world.ID_CONCEPTS if c.name == n) for n in ("purple_triangle", "white_square"))
    scenes = [world.concept_scene(0, a, 0, size), world.concept_scene(0, b, 0, size),
              world.concept_scene(0, a, 1, size)]
    px = np.concatenate([preprocess(s.image, size) for s in scenes]).astype(np.float32)
    ids, mask = tokenize([a.label, b.label, "green"])
    return scenes, (a, b), px, np.asarray(ids), np.asarray(mask)


def _rule_iou(out: dict, row: int, gt: np.ndarray) -> float:
    """IoU with `gt` of the prediction rule on torch's outputs: the union of the masks (upsampled bilinearly to
    the image, threshold 0) of the queries whose sigmoid(score) x sigmoid(presence) passes 0.5."""
    prob = torch.sigmoid(torch.tensor(out["pred_logits"][row])) * torch.sigmoid(torch.tensor(
        out["presence_logits"][row]).reshape(()))
    keep = np.nonzero(prob.numpy() > 0.5)[0]
    if keep.size == 0:
        return 0.0
    logits = torch.nn.functional.interpolate(torch.tensor(out["pred_masks"][row, keep][None]), size=gt.shape,
                                             mode="bilinear", align_corners=False)[0]
    return float(iou((logits.numpy() > 0).any(0), gt))


def test_shipped_checkpoint_is_small_and_bf16(stored):
    meta = json.loads((SMALL / "jalias.json").read_text())
    size = sum(f.stat().st_size for f in SMALL.rglob("*") if f.is_file())
    assert meta["dtype"] == "bfloat16" and size <= 10 * 2 ** 20, size
    assert stored["fingerprint"] == meta["fingerprint"] and stored["param_count"] == meta["param_count"]


def test_trained_weights_match_torch(model):
    """Load the trained params into transformers' Sam3Model; full forward on evaluation scenes within the
    parity tests' tolerances (SCORE_ATOL, MASK_ATOL, MIN_IOU). The reference is not degenerate: it segments
    the named concepts (the prediction rule's IoU with the ground truth > 0.5)."""
    cfg = model.config
    hm = torch_model_of(model)
    scenes, concepts, px, ids, mask = _scene_batch(cfg.image_size)
    with jax.default_matmul_precision("highest"):
        got = jax_forward(model.with_prompt_mode("hf"), px, ids, mask)
    ref = torch_forward(hm, px, ids, mask)
    assert_outputs_match(got, ref, "weights/small")
    for row, (scene, concept) in enumerate(zip(scenes[:2], concepts)):
        gt = np.any([i.mask for i in scene.instances if i.concept == concept.name], axis=0)
        assert _rule_iou(ref, row, gt) > 0.5, concept.name


def test_stored_metrics_reproduce(model, stored):
    """metrics.json's skill (written by `jalias train`) is what the shipped checkpoint measures: the issue asks for
    0.02; measured identical on the CPU box (2026-12-07), so 0.005 (a flip of one kept query in one of the 448 ID
    evaluation images moves id_iou by up to 1/448)."""
    s = stored["skill"]
    got = skill(model, n_images=s["n_images"], seed=s["seed"])
    for key in ("id_iou", "id_empty_rate", "ood_iou"):
        assert abs(got[key] - s[key]) <= 0.005, (key, got[key], s[key])


def test_search_from_a_zero_iou_label_starts_from_random_tokens(tmp_path):
    """On the trained model "tomato" (a name it never learned) scores IoU 0 on every image: around the label the
    objective is flat, so the run searches from random tokens (logged, recorded as search_init) and keeps the
    label as the baseline; a label that scores > 0 keeps init='label'."""
    from jalias.run.api import demo

    demo(out=tmp_path / "d", budget=40, concepts=["tomato", "purple_cross"], images_per_concept=6, negatives=1,
         weights=str(SMALL), progress=False)
    tomato = json.loads((tmp_path / "d" / "tomato.json").read_text())
    cross = json.loads((tmp_path / "d" / "purple_cross.json").read_text())
    assert tomato["label_iou_search"] == 0.0 and tomato["search_init"] == "random"
    assert cross["label_iou_search"] > 0.0 and cross["search_init"] == "label"
    assert "objective is flat" in (tmp_path / "d" / "log.txt").read_text()
