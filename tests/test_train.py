"""Training the small SAM3 (jalias/train): the loss goes down, resume equals an uninterrupted run, the matching is
optimal, and OOD concepts never reach the training data (by construction, checked here)."""

from __future__ import annotations

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalias.data import world
from jalias.model.init import random_params
from jalias.tokenizer import encode
from jalias.train import TrainConfig, TrainError, train
from jalias.train import batches, loop
from jalias.train.config import CONFIGS
from jalias.train.loss import _hungarian

TINY = TrainConfig(config="tiny", steps=4, stage2_steps=3, images_per_step=2, prompts_per_image=4, pool_size=12,
                   warmup=2, checkpoint_every_s=1e9)


def test_training_steps_lower_the_loss_on_a_fixed_batch():
    cfg = CONFIGS["tiny"]()
    tc = TrainConfig(config="tiny", images_per_step=2, prompts_per_image=4, lr=2e-3, warmup=1, steps=40)
    pool = batches.build_pool(cfg, tc, n=4)
    batch = {k: jnp.asarray(v) for k, v in batches.sample_batch(pool, tc, 0, batches.reserved_tokens()).items()}
    opt = loop.optimizer(tc)
    params = jax.tree_util.tree_map(jnp.asarray, random_params(cfg, 0))
    state = opt.init(params)
    step = loop.make_step(cfg, tc, opt)
    losses = []
    for i in range(25):
        passed = jax.tree_util.tree_leaves((params, state))
        params, state, loss, _ = step(params, state, batch)
        losses.append(float(loss))
        if i == 0:  # donated: the step wrote the new params and AdamW moments over the ones passed in
            assert all(x.is_deleted() for x in passed)
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses


def test_resume_equals_uninterrupted(tmp_path):
    """Killed in stage 1, at the stage boundary and inside stage 2: the resumed run ends on the same weights."""
    full = train(TINY, out=tmp_path / "a", progress=False, log=lambda s: None)
    part = train(TINY, out=tmp_path / "b", progress=False, stop_after=2, log=lambda s: None)
    assert part.step == 2
    with pytest.raises(TrainError, match="--resume"):
        train(TINY, out=tmp_path / "b", progress=False, log=lambda s: None)
    for stop, at in ((2, 4), (1, 5)):  # stop exactly at the boundary, then one step into stage 2
        part = train(TINY, out=tmp_path / "b", resume=True, progress=False, stop_after=stop, log=lambda s: None)
        assert part.step == at
    rest = train(TINY, out=tmp_path / "b", resume=True, progress=False, log=lambda s: None)
    assert rest.step == full.step == 7
    for a, b in zip(jax.tree_util.tree_leaves(full.params), jax.tree_util.tree_leaves(rest.params)):
        np.testing.assert_array_equal(a, b)


def test_stage_two_is_the_documented_recipe(tmp_path):
    """Two-stage training equals stage 1 alone followed by the recipe TrainConfig documents, spelled out here:
    fresh AdamW at constant stage2_lr, IoU-aware targets, class loss on present phrases only, batches from
    stage2_batch_offset."""
    from dataclasses import replace

    both = train(TINY, out=tmp_path / "a", progress=False, log=lambda s: None)
    first = train(replace(TINY, stage2_steps=0), out=tmp_path / "b", progress=False, log=lambda s: None)
    cfg = CONFIGS["tiny"]()
    ft = TrainConfig(**{**TINY.to_dict(), "lr": TINY.stage2_lr, "warmup": 1, "final_lr_fraction": 1.0,
                        "steps": TINY.stage2_steps, "colour_only_steps": 0, "class_on_absent": False,
                        "class_target": "iou", "stage2_steps": 0})
    opt = loop.optimizer(ft)
    params = jax.tree_util.tree_map(jnp.asarray, first.params)
    state, fn = opt.init(params), loop.make_step(cfg, ft, opt)
    pool = batches.build_pool(cfg, ft)
    for i in range(TINY.stage2_steps):
        batch = batches.sample_batch(pool, ft, TINY.stage2_batch_offset + i, batches.reserved_tokens())
        params, state, _, _ = fn(params, state, {k: jnp.asarray(v) for k, v in batch.items()})
    for a, b in zip(jax.tree_util.tree_leaves(both.params), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(both.params),
                                                        jax.tree_util.tree_leaves(first.params)))


def test_resume_refuses_other_settings(tmp_path):
    train(TINY, out=tmp_path / "a", progress=False, stop_after=1, log=lambda s: None)
    other = TrainConfig(**{**TINY.to_dict(), "lr": TINY.lr * 2})
    with pytest.raises(TrainError, match="lr"):
        train(other, out=tmp_path / "a", resume=True, progress=False, log=lambda s: None)


def test_hungarian_is_optimal_against_brute_force():
    rng = np.random.default_rng(0)
    cost = rng.normal(size=(5, 6, 3)).astype(np.float32)
    valid = np.array([[1, 1, 1], [1, 0, 0], [0, 0, 0], [1, 1, 0], [1, 0, 1]], bool)
    got = _hungarian(cost, valid)
    for i in range(5):
        cols = np.nonzero(valid[i])[0]
        if not cols.size:
            continue
        assert len(set(got[i, cols])) == cols.size  # one query per target
        best = min(sum(cost[i, q, c] for q, c in zip(perm, cols))
                   for perm in itertools.permutations(range(6), cols.size))
        assert np.isclose(sum(cost[i, got[i, c], c] for c in cols), best)


def test_ood_concepts_never_reach_training_data():
    held = {(c.shape, c.colour) for c in world.OOD_CONCEPTS}
    new_shapes = {c.shape for c in world.OOD_CONCEPTS if c.kind == "new-shape"}
    assert held.isdisjoint(world.TRAIN_COMBOS)
    assert new_shapes.isdisjoint(world.TRAIN_SHAPES)
    for i in range(300):  # rendered training scenes hold trained combinations only
        sc = world.training_scene(0, i, 56)
        assert set(zip(sc.shapes, sc.colours)) <= set(world.TRAIN_COMBOS)
    # no training prompt and no random negative uses a token of an OOD label that is not a trained word
    trained = {t for p in world.training_phrases() for t in encode(world.phrase_text(p))}
    ood_only = {t for c in world.OOD_CONCEPTS for t in encode(c.label)} - trained
    assert ood_only, "the new-name / new-shape labels should hold words the model never trains on"
    reserved = set(batches.reserved_tokens().tolist())
    assert ood_only <= reserved
    tc = TrainConfig(config="tiny", images_per_step=4, prompts_per_image=6, random_token_negatives=0.5)
    pool = batches.build_pool(CONFIGS["tiny"](), tc, n=16)
    seen = set()
    for step in range(30):
        b = batches.sample_batch(pool, tc, step, batches.reserved_tokens())
        seen |= set(b["input_ids"][b["attention_mask"] == 1].tolist())
    assert seen.isdisjoint(ood_only)
    # evaluation images come from another seed stream than training images
    assert world.TRAIN_STREAM != world.EVAL_STREAM


def test_batch_targets_follow_the_phrase():
    tc = TrainConfig(config="tiny", images_per_step=4, prompts_per_image=4, random_token_negatives=0.0)
    cfg = CONFIGS["tiny"]()
    pool = batches.build_pool(cfg, tc, n=8)
    b = batches.sample_batch(pool, tc, 5, batches.reserved_tokens())
    # positives (first half of each image's prompts) have targets and present=1; negatives have none
    rows = np.arange(16).reshape(4, 4)
    assert np.all(b["present"][rows[:, :2]] == 1) and np.all(b["tvalid"][rows[:, :2]].any(-1))
    assert np.all(b["present"][rows[:, 2:]] == 0) and not b["tvalid"][rows[:, 2:]].any()
    assert np.all(b["tmask"][b["tvalid"]].sum((-1, -2)) > 0)


def test_train_command_writes_a_loadable_checkpoint_and_resumes(tmp_path):
    """`jalias train`: a killed run resumes; the final checkpoint loads and gives the outputs of the trained params."""
    from typer.testing import CliRunner

    from jalias.cli import app
    from jalias.weights import load

    out = tmp_path / "t"
    args = ["train", "--config", "tiny", "--steps", "2", "--stage2-steps", "1", "--out", str(out), "--no-progress", "--eval-images", "1",
            "--dtype", "float32"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["recipe"]["config"] == "tiny"
    assert set(metrics["skill"]) >= {"id_iou", "id_empty_rate", "ood_iou"}
    model = load(out / "final")
    recipe = TrainConfig(**metrics["recipe"])
    like = random_params(CONFIGS["tiny"](), 0)
    params, _, step, _ = loop.load_state(out / "state", (like, loop.optimizer(recipe).init(like)), recipe)
    assert step == 3
    ref = jax.tree_util.tree_leaves(params)
    got = jax.tree_util.tree_leaves(model.params)
    assert len(ref) == len(got) and all(np.array_equal(a, b) for a, b in zip(ref, got))
    # a second run into the same folder without --resume is refused with one line, the run is untouched
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 1 and "already holds a training run" in r.output
    assert (out / "final").exists()


def test_iou_aware_class_targets_follow_mask_quality():
    """loss.query_quality against a per-pair numpy IoU: 1 from IoU 0.5 up, else the best IoU; padding ignored."""
    from jalias.train.loss import query_quality

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 8, 8)).astype(np.float32)
    tmask = (rng.random((2, 3, 8, 8)) < 0.4).astype(np.float32)
    tvalid = np.array([[True, True, False], [True, False, False]])
    logits[0, 1] = np.where(tmask[0, 0] > 0, 5.0, -5.0)  # a perfect query for instance 0 of pair 0
    logits[1, 2] = np.where(tmask[1, 2] > 0, 5.0, -5.0)  # perfect only for a padded slot: must not count
    got = np.asarray(query_quality(jnp.asarray(logits), jnp.asarray(tmask), jnp.asarray(tvalid)))
    for n in range(2):
        for q in range(5):
            p = logits[n, q] > 0
            ious = [(p & (tmask[n, m] > 0)).sum() / max((p | (tmask[n, m] > 0)).sum(), 1)
                    for m in range(3) if tvalid[n, m]]
            want = 1.0 if max(ious) >= 0.5 else max(ious)
            assert got[n, q] == pytest.approx(want, abs=1e-6), (n, q)
    assert got[0, 1] == 1.0 and got[1, 2] < 1.0


def test_ood_dataset_holds_only_its_concepts_and_never_training_images():
    ds = world.ood_dataset(["tomato", "heart"], 3, 56, seed=0)
    assert [c.label for c in ds.concepts] == ["tomato", "heart"]
    assert [s.image_id for s in ds.samples] == [f"{n}_{k:03d}" for n in ("tomato", "heart") for k in range(3)]
    for s in ds.samples:
        own = s.image_id.rsplit("_", 1)[0]
        assert s.masks[own].any()
        assert not any(s.masks[n].any() for n in s.masks if n != own)
        assert not s.image_id.startswith("train_")
    with pytest.raises(ValueError, match="unknown OOD concept"):
        world.ood_dataset(["red_star"], 1, 56)


def test_locality_prior_makes_each_query_look_inside_its_box():
    """train.init: with rpb_locality > 0 the decoder's box position bias starts lower outside each query's box than
    inside it, by more than 3, for every head and query (a plain random init: under 0.5); rpb_locality 0 is random_params exactly."""
    from dataclasses import replace

    from jalias.model.sam3 import Sam3Module
    from jalias.train.init import initial_params

    cfg = CONFIGS["tiny"]()
    plain = initial_params(cfg, replace(TINY, rpb_locality=0.0))
    for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(random_params(cfg, TINY.seed))):
        np.testing.assert_array_equal(a, b)
    g = 8
    rng = np.random.default_rng(0)
    centre, size = rng.uniform(0.3, 0.7, (1, 6, 2)), rng.uniform(0.25, 0.5, (1, 6, 2))
    boxes = np.concatenate([centre, size], -1).astype(np.float32)  # cxcywh
    lo, hi = centre - size / 2, centre + size / 2
    pix = np.arange(g) / g  # the RPB's pixel coordinates
    inside_x = (pix[None, None, :] >= lo[..., 0:1]) & (pix[None, None, :] <= hi[..., 0:1])  # [1, Q, W]
    inside_y = (pix[None, None, :] >= lo[..., 1:2]) & (pix[None, None, :] <= hi[..., 1:2])
    inside = (inside_y[:, :, :, None] & inside_x[:, :, None, :]).reshape(1, 6, g * g)

    def gaps(params):
        bias = Sam3Module(cfg).apply({"params": params}, jnp.asarray(boxes), g, g,
                                     method=lambda m, b, h, w: m.detr_decoder.rpb(b, h, w))
        bias = np.asarray(bias)[0, :, 1:]  # [heads, Q, HW], presence row dropped
        return np.array([[bias[h, q][inside[0, q]].mean() - bias[h, q][~inside[0, q]].mean()
                          for q in range(6)] for h in range(bias.shape[0])])

    assert gaps(initial_params(cfg, replace(TINY, rpb_locality=8.0))).min() > 3.0  # measured 4.5
    assert np.abs(gaps(plain)).max() < 0.5  # measured 0.24: no locality without the prior


def test_anchor_cost_matches_collapsed_queries_to_the_nearest_anchor():
    """With identical predictions for every query (a collapsed decoder), the matching cost's anchor term decides:
    each target goes to the query whose anchor centre is nearest its box centre (anchors far apart, so the
    nearest is unique); without the term every query costs the same."""
    from dataclasses import replace

    from jalias.train.loss import hungarian, match_costs

    rng = np.random.default_rng(1)
    q, m, side = 9, 3, 8
    grid = (np.arange(3) + 0.5) / 3
    anchors = np.array([[x, y, 0.2, 0.2] for y in grid for x in grid], np.float32)  # 3 x 3 anchor centres
    out = {"pred_logits": np.zeros((1, q), np.float32), "pred_boxes": np.tile([[[0.2, 0.2, 0.6, 0.6]]], (1, q, 1)),
           "pred_masks": np.tile(rng.normal(size=(1, 1, side, side)), (1, q, 1, 1)).astype(np.float32)}
    centres = anchors[[7, 0, 5], :2] + rng.uniform(-0.1, 0.1, (3, 2))
    tbox = np.concatenate([centres - 0.1, centres + 0.1], -1)[None].astype(np.float32)
    tmask = (rng.uniform(size=(1, m, side, side)) > 0.5).astype(np.float32)
    valid = np.ones((1, m), bool)
    w = replace(TINY, w_anchor=5.0)
    cost = np.asarray(match_costs(out, tmask, tbox, valid, w, jnp.asarray(anchors)))
    nearest = np.abs(anchors[:, None, :2] - centres[None]).sum(-1).argmin(0)
    np.testing.assert_array_equal(np.asarray(hungarian(jnp.asarray(cost), jnp.asarray(valid)))[0], nearest)
    assert nearest.tolist() == [7, 0, 5]
    flat = np.asarray(match_costs(out, tmask, tbox, valid, replace(w, w_anchor=0.0), jnp.asarray(anchors)))
    assert np.allclose(flat, flat[:, :1])  # no anchor term: all queries alike
