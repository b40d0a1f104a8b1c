"""`jalias adapt`: embed / LoRA adapters trained from a run's alias (alias teacher) or its ground truth (gt teacher).

Everything runs on the embedded tiny model and one small search run (one category, 64x64 images); the embed tests
share one config so one training step is compiled. References are independent of the code under test: token
embeddings rebuilt by hand from the table, LoRA kernels merged in numpy, the loss restated in numpy, IoUs from
the engine.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from typer.testing import CliRunner

import jalias
from jalias.adapt import (AdaptConfig, AdaptedSam3, AdaptError, alias_targets, apply_adapters, gt_targets,
                          image_contexts, load_adapter, make_step, save_adapter, teacher_outputs, train_adapter)
from jalias.adapt.adapters import Adapter, fresh_lora, lora_targets, model_fingerprint
from jalias.adapt.trainer import feature_args, fresh_params, label_layout
from jalias.cli import app
from jalias.data import iou, load_coco, make_dataset, write_coco
from jalias.engine import Engine
from jalias.engine.predict import layout
from jalias.model.sam3 import Sam3
from jalias.run.model import load_model
from jalias.run.rundir import RunDir
from jalias.run.splits import rebuild_inputs
from jalias.tokenizer import encode

from test_cli import error_line  # noqa: E402 (one definition of the one-line-error check)

RUNNER = CliRunner()
STEPS = 30
CFG = AdaptConfig(steps=STEPS)  # the CLI's defaults with --steps 30: one compiled step for every embed test


def invoke(*args):
    return RUNNER.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished one-category search run on the tiny model (its alias beats the label)."""
    root = tmp_path_factory.mktemp("adapt")
    ann, images = write_coco(make_dataset(5, 64, ["striped_blob"], seed=1), root / "coco")
    out = root / "run"
    result = invoke("search", "--weights", "tiny", "--annotations", ann, "--images", images, "--out", out,
                    "--method", "local", "--budget", "120", "--length", "3", "--max-images", "4", "--heldout",
                    "0.25", "--negatives", "2", "--set", "n_candidates=16", "--no-progress")
    assert result.exit_code == 0, result.output
    (res,) = RunDir(out).finished_results()
    assert res["alias_beat_label"]
    return {"dir": out, "ann": Path(ann), "images": Path(images), "res": res}


@pytest.fixture(scope="module")
def model():
    return load_model("tiny")[0]


@pytest.fixture(scope="module")
def data(run, model):
    inputs = rebuild_inputs(RunDir(run["dir"]).read_settings(), run["res"])
    s = np.asarray(inputs["split"]) == "search"
    pick = lambda key, sel: [x for x, k in zip(inputs[key], sel) if k]  # noqa: E731
    ctx = image_contexts(model, pick("images", s))
    neg = np.asarray(inputs["is_negative"], bool)
    return {"ctx": ctx, "label": run["res"]["label_ids"], "alias": run["res"]["alias_ids"],
            "outputs": teacher_outputs(model, run["res"]["alias_ids"], ctx), "gts": pick("gts", s),
            "neg": neg[s], "images": inputs["images"], "all_gts": inputs["gts"], "all_neg": neg, "search_mask": s}


@pytest.fixture(scope="module")
def trained(model, data):
    return train_adapter(model, data["label"], alias_targets(data["ctx"], data["outputs"], CFG), CFG,
                         label="striped blob", category="striped_blob", progress=False,
                         alias_length=len(data["alias"]))  # as `jalias adapt` does


def _outputs(m: Sam3, prompts, ctx):
    """encode_text + detect of content-id prompts on the first image: {key: numpy}."""
    ids, mask = layout(prompts, m.config.context_length)
    prompt = m.encode_text(ids, mask)
    one = jax.tree_util.tree_map(lambda x: x[:1], ctx)
    out = m.detect(one, prompt, m.prompt_mask(ids, mask))
    return {"features": np.asarray(prompt), **{k: np.asarray(v) for k, v in out.items()}}


# ---- embed ------------------------------------------------------------------------------------------------------
def test_embed_leaves_other_prompts_bit_identical(model, data):
    label = data["label"]
    rows = np.random.default_rng(0).normal(0, 0.5, (len(label), model.config.text.hidden_size)).astype(np.float32)
    adapter = Adapter("embed", "striped blob", tuple(label), {"rows": rows}, model_fingerprint(model))
    adapted = apply_adapters(model, [adapter])
    others = [encode("striped star"), encode("blob"), label[:1], label + label[-1:], [label[-1], label[0]],
              data["alias"], encode("a striped blob")]
    base, new = _outputs(model, others, data["ctx"]), _outputs(adapted, others, data["ctx"])
    for k in base:
        np.testing.assert_array_equal(new[k], base[k], err_msg=k)
    # the label itself: the features of hand-built embeddings (table rows, positions 1..Ll replaced)
    ids, mask = layout([label], model.config.context_length)
    table = np.asarray(model.apply("token_table"))
    emb = table[ids]
    emb[0, 1:1 + len(label)] = rows
    want = np.asarray(model.apply("encode_text", emb, mask)[0])
    got = np.asarray(adapted.encode_text(ids, mask))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert np.abs(got - np.asarray(model.encode_text(ids, mask))).max() > 1e-2
    # a second label's adapter composes: each label reads its own rows, everything else stays the base model's
    star = encode("striped star")
    rows2 = np.random.default_rng(1).normal(0, 0.5, (len(star), rows.shape[1])).astype(np.float32)
    both = apply_adapters(model, [adapter, Adapter("embed", "striped star", tuple(star), {"rows": rows2},
                                                   model_fingerprint(model))])
    lay = layout([label, star, encode("blob")], model.config.context_length)
    feats = np.asarray(both.encode_text(*lay))
    np.testing.assert_array_equal(feats[0], np.asarray(adapted.encode_text(*lay))[0])
    np.testing.assert_array_equal(feats[2], np.asarray(model.encode_text(*lay))[2])
    emb2 = table[lay[0][1:2]]
    emb2[0, 1:1 + len(star)] = rows2
    np.testing.assert_allclose(feats[1], np.asarray(model.apply("encode_text", emb2, lay[1][1:2])[0])[0],
                               rtol=0, atol=1e-6)
    # engines: no prefix cache for it, the same IoUs as the base model for every other prompt
    e_base = Engine(model, data["images"], data["all_gts"], negative=data["all_neg"], prefix_cache=False)
    e_new = Engine(adapted, data["images"], data["all_gts"], negative=data["all_neg"])
    assert not e_new.prefix_cache
    for p in others:
        np.testing.assert_array_equal(e_new.score(np.asarray([p])), e_base.score(np.asarray([p])))


def test_embed_with_more_rows_than_the_label_tokens(model, data):
    """An embed adapter of N != Ll rows: the label's prompt becomes START rows END (mask N + 2) everywhere a
    prompt is laid out. With the alias's own token embeddings as rows, the adapted label is the alias on the base
    model: features, detector outputs and engine IoUs; other prompts stay bit-identical, also when the rows need a
    longer text bucket than the engine would run (alias of 7 tokens: 9 positions > 8)."""
    label = data["label"]
    table = np.asarray(model.apply("token_table"))
    fp = model_fingerprint(model)
    alias = list(data["alias"]) + list(data["alias"]) + [int(data["alias"][0])]  # 7 tokens
    assert len(alias) != len(label)
    for cand in (list(data["alias"]), alias):
        adapted = apply_adapters(model, [Adapter("embed", "striped blob", tuple(label), {"rows": table[cand]}, fp)])
        got, want = _outputs(adapted, [label], data["ctx"]), _outputs(model, [cand], data["ctx"])
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-5, err_msg=k)
        args = (data["images"], data["all_gts"])
        e_new = Engine(adapted, *args, negative=data["all_neg"])
        e_base = Engine(model, *args, negative=data["all_neg"], prefix_cache=False)
        np.testing.assert_allclose(e_new.score(np.asarray([label])), e_base.score(np.asarray([cand])), atol=1e-6)
        for other in (encode("striped star"), label[:1], [label[-1], label[0]], list(data["alias"])):
            np.testing.assert_array_equal(e_new.score(np.asarray([other])), e_base.score(np.asarray([other])))
        assert not np.allclose(got["features"][0, :4], _outputs(model, [label], data["ctx"])["features"][0, :4])
    # trained with as many rows as the alias (AdaptConfig.length = -1): init = the label's rows, each repeated
    cfg = AdaptConfig(steps=8, length=-1)
    targets = alias_targets(data["ctx"], data["outputs"], cfg)
    no_alias = train_adapter(model, label, targets, dataclasses.replace(cfg, steps=0), progress=False)
    assert no_alias.params["rows"].shape == (len(label), table.shape[1])  # no alias given: the label's count
    ad = train_adapter(model, label, targets, cfg, progress=False, alias_length=len(alias))
    assert ad.params["rows"].shape == (len(alias), table.shape[1])
    assert ad.metrics["loss_last"] < ad.metrics["losses"][0]
    fresh = train_adapter(model, label, targets, dataclasses.replace(cfg, steps=0), progress=False,
                          alias_length=len(alias))
    spread = [label[(i * len(label)) // len(alias)] for i in range(len(alias))]
    np.testing.assert_array_equal(fresh.params["rows"], table[spread])
    for bad in (dict(length=-2), dict(length=31)):
        with pytest.raises(AdaptError, match="length"):
            AdaptConfig(**bad).validate()


def test_feature_term_pulls_the_label_to_the_alias_features(model, data):
    """w_features: the relative squared distance of the label's prompt features to the alias's, over the alias's
    valid positions; 0 at the alias's own embeddings; on only when the two prompts have the same length."""
    label, alias = data["label"], list(data["alias"])
    cfg = CFG  # the defaults: length -1 (the alias's), w_features 100
    targets = alias_targets(data["ctx"], data["outputs"], cfg)
    step = make_step(model, cfg, label)
    lay = label_layout(model, label, len(alias))
    feat = {**targets.feature_target(int(lay[1].sum())), "on": 1.0}
    table = np.asarray(model.apply("token_table"))
    ids, mask = layout([alias], model.config.context_length)
    want = np.asarray(model.encode_text(ids, mask), np.float64)[0]
    for rows, expect in ((table[alias], 0.0), (table[[label[0]] * len(alias)], None)):
        parts = np.asarray(step.loss({"rows": rows}, model.params, *lay, targets.ctx, targets.arrays(),
                                     targets.weights, None, feat)[1])
        lids, lmask = layout([[label[0]] * len(alias)], model.config.context_length)
        got = np.asarray(model.encode_text(lids, lmask), np.float64)[0] if expect is None else want
        m = mask[0, :, None]
        gap = ((got - want) ** 2 * m).sum() / (want ** 2 * m).sum()
        assert parts[4] == pytest.approx(gap, rel=1e-4, abs=1e-7)
    assert parts[4] > 0.01
    spread = table[[label[(i * len(label)) // len(alias)] for i in range(len(alias))]]  # the fresh adapter
    start = float(step.loss({"rows": spread}, model.params, *lay, targets.ctx, targets.arrays(), targets.weights,
                            None, feat)[1][4])
    ad = train_adapter(model, label, targets, cfg, progress=False, alias_length=len(alias))
    assert ad.metrics["feature_term"] and ad.metrics["loss_parts_last"][4] < 0.5 * start, (start, ad.metrics)
    # not applicable: the label keeps its own length (!= the alias's), or the gt teacher (no alias features)
    off = train_adapter(model, label, targets, dataclasses.replace(cfg, length=0, steps=1), progress=False)
    gt = gt_targets(data["ctx"], data["gts"], data["neg"], model.config.decoder.num_queries,
                    4 * model.config.vision.backbone.grid, cfg)
    off_gt = train_adapter(model, label, gt, dataclasses.replace(cfg, steps=1), progress=False,
                           alias_length=len(alias))
    assert not off.metrics["feature_term"] and not off_gt.metrics["feature_term"]


def test_training_lowers_the_distillation_loss(model, data, trained):
    losses = trained.metrics["losses"]
    assert len(losses) == STEPS and trained.metrics["loss_last"] < 0.97 * losses[0], losses
    # independent of the loss: the adapted label's predicted masks (the prediction rule) move towards the alias's
    teacher = data["outputs"]["union_logits"] > 0
    before = teacher_outputs(model, data["label"], data["ctx"])["union_logits"] > 0
    after = teacher_outputs(apply_adapters(model, [trained]), data["label"], data["ctx"])["union_logits"] > 0
    agree = lambda a: float(iou(a, teacher).mean())  # noqa: E731
    assert 1 - agree(after) < 0.9 * (1 - agree(before))  # disagreement: measured 0.089 -> 0.076 (x0.85)


def test_loss_matches_a_numpy_restatement(model, data):
    """The step's loss at the fresh adapter (= the plain label) against the documented formula in numpy."""
    targets = alias_targets(data["ctx"], data["outputs"], CFG)
    step = make_step(model, CFG, data["label"])
    ids, mask = layout([data["label"]], model.config.context_length)
    rows = np.asarray(model.apply("embed_tokens", ids[:, 1:1 + len(data["label"])]))[0]
    # the step sees the label's slot layout (START, slot ids, END) and reads the rows for the slots
    loss, _ = step.loss({"rows": rows}, model.params, *label_layout(model, data["label"], len(rows)), targets.ctx,
                        targets.arrays(), targets.weights)
    prompt = model.encode_text(ids, mask)
    sig = lambda x: 1 / (1 + np.exp(-x.astype(np.float64)))  # noqa: E731
    bce = lambda p, t: -(t * np.log(p) + (1 - t) * np.log(1 - p))  # noqa: E731
    per = []
    for i in range(targets.n_images):
        out = model.detect_fast(jax.tree_util.tree_map(lambda x: x[i:i + 1], data["ctx"]), prompt,
                                model.prompt_mask(ids, mask))
        lg, pr, mk = (np.asarray(out[k], np.float64)[0] for k in ("pred_logits", "presence_logits", "pred_masks"))
        s = sig(lg) * sig(pr[0])
        u = np.clip(1 - np.prod(1 - s[:, None, None] * sig(mk), axis=0), 1e-6, 1 - 1e-6)
        y = targets.union[i]
        dice = 1 - (2 * (u * y).sum() + 1) / (u.sum() + y.sum() + 1) if y.sum() > 0 else 0.0
        terms = [bce(sig(lg), targets.query[i]).mean(), bce(sig(pr[0]), targets.presence[i]),
                 bce(u, y).mean() + dice]
        per.append(float(np.dot(targets.weights, terms)))
    assert float(loss) == pytest.approx(np.mean(per), rel=2e-5)


def test_gt_and_alias_teachers_share_one_step(model, data, trained):
    gt = gt_targets(data["ctx"], data["gts"], data["neg"], model.config.decoder.num_queries,
                    4 * model.config.vision.backbone.grid, CFG)
    al = alias_targets(data["ctx"], data["outputs"], CFG)
    assert {k: (v.shape, v.dtype) for k, v in gt.arrays().items()} == {
        k: (v.shape, v.dtype) for k, v in al.arrays().items()}
    gcfg = AdaptConfig(steps=STEPS, teacher="gt")
    step = make_step(model, gcfg, data["label"])
    assert step is make_step(model, CFG, data["label"])
    adapter = train_adapter(model, data["label"], gt, gcfg, progress=False, alias_length=len(data["alias"]))
    assert not adapter.metrics["feature_term"]  # the gt teacher has no alias features: the term is switched off
    assert step.step._cache_size() == 1  # one compiled program served both teachers
    assert adapter.teacher == "gt" and adapter.metrics["loss_last"] < adapter.metrics["losses"][0]


def test_save_load_eval_equals_in_memory(model, data, trained, tmp_path):
    path = save_adapter(tmp_path / "ad", trained, CFG.to_dict())
    card = json.loads((path / "adapter.json").read_text())
    assert card["kind"] == "embed" and card["label"] == "striped blob" and card["teacher"] == "alias"
    assert card["steps"] == STEPS and card["model_fingerprint"] == model_fingerprint(model)
    loaded = jalias.load("tiny", adapter=path)
    assert isinstance(loaded, AdaptedSam3)
    args = (data["images"], data["all_gts"])
    ids = np.asarray([data["label"]])
    got = Engine(loaded, *args, negative=data["all_neg"]).score(ids)
    want = Engine(apply_adapters(model, [trained]), *args, negative=data["all_neg"]).score(ids)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(load_adapter(path).params["rows"], trained.params["rows"])


def test_resume_equals_uninterrupted(model, data, trained, tmp_path):
    targets = alias_targets(data["ctx"], data["outputs"], CFG)
    with pytest.raises(KeyboardInterrupt):
        train_adapter(model, data["label"], targets, CFG, state_dir=tmp_path / "st", progress=False, stop_after=11,
                      alias_length=len(data["alias"]))
    assert json.loads((tmp_path / "st" / "state.json").read_text())["step"] == 11
    resumed = train_adapter(model, data["label"], targets, CFG, state_dir=tmp_path / "st", resume=True,
                            progress=False, alias_length=len(data["alias"]))
    np.testing.assert_array_equal(resumed.params["rows"], trained.params["rows"])
    assert resumed.metrics["losses"] == trained.metrics["losses"]
    with pytest.raises(AdaptError, match="another teacher"):
        gt = gt_targets(data["ctx"], data["gts"], data["neg"], model.config.decoder.num_queries,
                        4 * model.config.vision.backbone.grid, CFG)
        train_adapter(model, data["label"], gt, CFG, state_dir=tmp_path / "st", resume=True, progress=False,
                      alias_length=len(data["alias"]))


def test_adapter_for_another_model_is_refused(model, trained):
    from jalias.model.init import random_params

    other = Sam3(model.config, random_params(model.config, seed=1))
    with pytest.raises(AdaptError, match="another model or config"):
        apply_adapters(other, [trained])
    with pytest.raises(AdaptError, match="two embed adapters"):
        apply_adapters(model, [trained, trained])


# ---- lora -------------------------------------------------------------------------------------------------------
def test_lora_merges_low_rank_updates_and_trains_adapter_params_only(model, data):
    cfg = AdaptConfig(kind="lora", steps=3, targets="text+fusion", w_preserve=1.0, preserve_prompts=8)
    paths = lora_targets(model, cfg.target_patterns())
    c = model.config  # CLIP layers x q,k,v,out + fusion encoder and decoder layers x k,v
    assert len(paths) == 4 * c.text.num_hidden_layers + 2 * c.encoder.num_layers + 2 * c.decoder.num_layers
    with pytest.raises(AdaptError, match="prompt side"):
        lora_targets(model, ["vision_encoder/*"])
    lora = fresh_lora(model, paths, 2, 0)
    rng = np.random.default_rng(1)
    lora = {p: {"a": np.asarray(v["a"]), "b": rng.normal(0, 0.1, v["b"].shape).astype(np.float32)}
            for p, v in lora.items()}
    adapted = AdaptedSam3(model, [Adapter("lora", "striped blob", tuple(data["label"]), lora,
                                          model_fingerprint(model), rank=2, alpha=2.0)])
    flat = {"/".join(k.key for k in p): v for p, v in jax.tree_util.tree_flatten_with_path(model.params)[0]}
    new = {"/".join(k.key for k in p): v for p, v in jax.tree_util.tree_flatten_with_path(adapted.params)[0]}
    for name, w in flat.items():
        mod = name.rsplit("/", 1)[0]
        if mod in lora and name.endswith("kernel"):
            want = np.asarray(w, np.float64) + 1.0 * lora[mod]["a"].astype(np.float64) @ lora[mod]["b"]
            np.testing.assert_allclose(np.asarray(new[name]), want, rtol=0, atol=1e-6)
        else:
            assert new[name] is w  # shared, untouched
    targets = alias_targets(data["ctx"], data["outputs"], cfg)
    trained = train_adapter(model, data["label"], targets, cfg, progress=False)
    n = trained.num_params
    assert n == sum(a.size for v in trained.params.values() for a in v.values())
    step = make_step(model, cfg, data["label"])
    from jalias.adapt.trainer import fresh_params, optimizer

    params, _ = fresh_params(model, cfg, data["label"])
    opt_size = sum(np.size(x) for x in jax.tree_util.tree_leaves(optimizer(cfg).init(params)))
    assert n <= opt_size <= 2 * n + 8  # Adam's two moments of the adapter params (and step counters), no base
    assert trained.metrics["loss_parts_last"][3] > 0  # other prompts' features moved, and the loss sees it
    assert step.step._cache_size() == 1


def test_state_term_pulls_a_loras_detector_states_to_the_alias(model, data):
    """w_states (lora): the mean over training images of the relative squared distance of the label's decoder
    query states and fused image tokens to the alias's; 0 against the label's own states; shrinks in training;
    off (on = 0, same compiled step) for the gt teacher; no argument at all when w_states is 0."""
    label = data["label"]
    cfg = AdaptConfig(kind="lora", steps=12, w_states=10.0, w_preserve=0.0)
    targets = alias_targets(data["ctx"], data["outputs"], cfg)
    step = make_step(model, cfg, label)
    lay = label_layout(model, label)
    ids, mask = layout([label], model.config.context_length)
    prompt = model.encode_text(ids, mask)
    mine = []  # the label's own states on each image, from the detector's parts (not the teacher code)
    for i in range(targets.n_images):
        c = jax.tree_util.tree_map(lambda x: x[i:i + 1], data["ctx"])
        _, parts = model.apply("detect_scores", c, prompt, jnp.asarray(model.prompt_mask(ids, mask)))
        mine.append({k: np.asarray(parts[k], np.float64)[0] for k in ("hidden", "enc")})
    alias_states = targets.states
    rel = lambda a, b: ((a - b) ** 2).sum() / (b ** 2).sum()  # noqa: E731
    want = np.mean([rel(m["hidden"], alias_states["hidden"][i]) + rel(m["enc"], alias_states["enc"][i])
                    for i, m in enumerate(mine)])
    fresh, _ = fresh_params(model, cfg, label)
    args = (model.params, *lay, targets.ctx, targets.arrays(), targets.weights, None)
    got = np.asarray(step.loss(fresh, *args, feature_args(model, cfg, targets, *lay[:2]))[1])
    assert got[5] == pytest.approx(want, rel=1e-4) and want > 0.01
    own = alias_targets(data["ctx"], teacher_outputs(model, label, data["ctx"]), cfg)  # the label as its own alias
    assert float(step.loss(fresh, *args, feature_args(model, cfg, own, *lay[:2]))[1][5]) < 1e-10
    ad = train_adapter(model, label, targets, cfg, progress=False)
    assert ad.metrics["feature_term"] and ad.metrics["loss_parts_last"][5] < 0.9 * want, (want, ad.metrics)
    gt = gt_targets(data["ctx"], data["gts"], data["neg"], model.config.decoder.num_queries,
                    4 * model.config.vision.backbone.grid, cfg)
    off = train_adapter(model, label, gt, dataclasses.replace(cfg, teacher="gt"), progress=False)
    assert not off.metrics["feature_term"] and step.step._cache_size() == 1
    assert feature_args(model, dataclasses.replace(cfg, w_states=0.0), targets, *lay[:2]) is None
    lean = teacher_outputs(model, label, data["ctx"], states=False)  # what an embed / stateless teacher holds
    assert "query_states" not in lean and alias_targets(data["ctx"], lean, cfg).states is None


def test_preservation_set_holds_the_labels_neighbours(model):
    """A lora's preservation prompts: first neighbours sharing a two-token label's tokens without containing it
    (each token alone, then the label with one token swapped for a common word), then the random common-word
    prompts, the same ones with or without neighbours. A one-token label has no neighbours; an embed adapter needs
    no preservation set. Every base feature is the base model's."""
    from jalias.adapt.trainer import label_neighbours, preserve_batch
    from jalias.data.planted import planted_vocab

    vocab = planted_vocab(2000)
    two = [int(t) for t in encode("blue triangle")]
    near = label_neighbours(two, vocab, 12, np.random.default_rng(0))
    assert len(near) == 12 and near[:2] == [[two[0]], [two[1]]]
    for p in near[2:]:
        assert len(p) == 2 and p != two and sum(a == b for a, b in zip(p, two)) == 1
        assert all(t in two or t in vocab for t in p)
    assert {p[0] == two[0] for p in near[2:]} == {True, False}  # both positions get swapped
    assert label_neighbours(encode("heart"), vocab, 8, np.random.default_rng(0)) == []
    cfg = AdaptConfig(kind="lora", w_preserve=1.0, preserve_prompts=8, preserve_neighbours=4)
    keep = preserve_batch(model, cfg, two)
    ids, mask = np.asarray(keep["ids"]), np.asarray(keep["mask"]).astype(bool)
    rows = [[int(t) for t in r[m][1:-1]] for r, m in zip(ids, mask)]  # START ... END
    assert len(rows) == 12 and all(any(t in two for t in r) for r in rows[:4]) and two not in rows
    np.testing.assert_array_equal(np.asarray(keep["base"]), np.asarray(model.encode_text(ids, keep["mask"]),
                                                                       np.float32))
    plain = np.asarray(preserve_batch(model, dataclasses.replace(cfg, preserve_neighbours=0), two)["ids"])
    np.testing.assert_array_equal(ids[4:], plain)  # the same random prompts after the neighbours
    np.testing.assert_array_equal(np.asarray(preserve_batch(model, cfg, encode("heart"))["ids"]), plain)
    assert preserve_batch(model, dataclasses.replace(cfg, kind="embed"), two) is None
    with pytest.raises(AdaptError, match="preserve_neighbours"):
        dataclasses.replace(cfg, preserve_neighbours=-1).validate()


def test_adapt_warns_when_the_alias_loses_held_out():
    """The alias teacher is trained on any alias that beat the label on the search images; where it does not beat
    the label held-out, `jalias adapt` says so (distilling such aliases lowered the label in benchmarks/adapt.py)."""
    from jalias.run.adapt import _choose

    rows = [{"category": "a", "alias_beat_label": True, "label_iou_heldout": 0.6, "alias_iou_heldout": 0.58},
            {"category": "b", "alias_beat_label": True, "label_iou_heldout": 0.1, "alias_iou_heldout": 0.5},
            {"category": "c", "alias_beat_label": True, "label_iou_heldout": None, "alias_iou_heldout": None},
            {"category": "d", "alias_beat_label": False, "label_iou_heldout": 0.2, "alias_iou_heldout": 0.2}]
    for cats in (None, ["a", "b"]):
        notes = []
        chosen = _choose(rows, cats, "alias", notes.append)
        assert [r["category"] for r in chosen] == (["a", "b", "c"] if cats is None else ["a", "b"])
        warned = [n for n in notes if n.startswith("warning")]
        assert warned == ["warning: a: the alias does not beat the label on held-out images (alias 0.580, label "
                          "0.600); the adapter may lower the label's held-out IoU"]
    notes = []
    assert len(_choose(rows, None, "gt", notes.append)) == 4 and notes == []  # the gt teacher needs no alias


# ---- the run's threshold, the export's targets, remat, warmup -----------------------------------------------------
def _sig(x):
    return 1 / (1 + np.exp(-np.asarray(x, np.float64)))


def _rule_union(model, ids, ctx, threshold):
    """Reference alias-teacher masks, by the documented rule in numpy: per image, the detect pass's queries with
    sigmoid(pred_logit) * sigmoid(presence_logit) > threshold, their mask logits > 0, unioned ->
    (bool[K, m, m], the smallest |score - threshold|)."""
    ids_, mask = layout([ids], model.config.context_length)
    prompt, dmask = model.encode_text(ids_, mask), model.prompt_mask(ids_, mask)
    unions, margin = [], np.inf
    for i in range(jax.tree_util.tree_leaves(ctx)[0].shape[0]):
        out = model.detect_fast(jax.tree_util.tree_map(lambda x: x[i:i + 1], ctx), prompt, dmask)
        s = _sig(out["pred_logits"])[0] * _sig(out["presence_logits"])[0, 0]
        unions.append((np.asarray(out["pred_masks"])[0][s > threshold] > 0).any(0))
        margin = min(margin, float(np.abs(s - threshold).min()))
    return np.stack(unions), margin


def _run_copy(run, dst: Path, threshold: float | None = None) -> Path:
    shutil.copytree(run["dir"], dst, ignore=shutil.ignore_patterns("adapters", "state", "export"))
    if threshold is not None:
        doc = json.loads((dst / "run.json").read_text())
        doc["settings"]["threshold"] = threshold
        (dst / "run.json").write_text(json.dumps(doc))
    return dst


def test_run_threshold_sets_the_teacher_masks_and_the_evaluation(run, model, data, trained, tmp_path, monkeypatch):
    """A run searched with --threshold 0.6 (not 0.5): adapt_run's AdaptConfig.threshold is 0.6, the alias
    teacher's masks are the queries the prediction rule keeps at 0.6 (numpy reference), they differ from 0.5's,
    and the label IoUs before / after are the engine's at 0.6."""
    t = 0.6
    want, margin = _rule_union(model, data["alias"], data["ctx"], t)
    assert margin > 1e-4  # no score sits within float rounding of the threshold
    base = alias_targets(data["ctx"], data["outputs"], CFG)
    assert (want != base.union.astype(bool)).any()  # 0.6 keeps fewer queries, and the masks show it
    np.testing.assert_array_equal(_rule_union(model, data["alias"], data["ctx"], 0.5)[0], base.union.astype(bool))
    # the run pipeline: the run's threshold reaches the config, the teacher targets and the evaluation
    import jalias.run.adapt as run_adapt

    seen = {}

    def fake_train(model_, label_ids, targets, cfg, **kw):  # no training: the targets and config are the point
        seen.update(targets=targets, cfg=cfg)
        return dataclasses.replace(trained, metrics=dict(trained.metrics))

    monkeypatch.setattr(run_adapt, "train_adapter", fake_train)
    summary = run_adapt.adapt_run(_run_copy(run, tmp_path / "run", t), steps=STEPS, out=tmp_path / "ad",
                                  progress=False, model=model)
    assert seen["cfg"].threshold == t and summary["config"]["threshold"] == t
    np.testing.assert_array_equal(seen["targets"].union.astype(bool), want)
    np.testing.assert_array_equal(seen["targets"].query, base.query)  # query / presence targets: no threshold
    (row,) = summary["categories"]
    pos = ~data["neg"]
    for m_, key in ((model, "label_before_search"), (apply_adapters(model, [trained]), "label_after_search")):
        eng = Engine(m_, [x for x, k in zip(data["images"], data["search_mask"]) if k], data["gts"],
                     negative=data["neg"], prefix_cache=False, threshold=t)
        assert row[key] == pytest.approx(float(eng.score(np.asarray([data["label"]]))[0][pos].mean()), abs=1e-6)


def test_adapting_from_an_export_equals_adapting_without_it(run, model, data, trained, tmp_path, monkeypatch):
    """`jalias export` (predict: model.detect, the full mask head) and the in-memory teacher (detect_fast) give the
    same teacher outputs up to float rounding and identical targets; adapt_run reads the export when it matches
    (in-memory teacher disabled here) and ends at the in-memory adapter, up to float rounding."""
    import jalias.run.adapt as run_adapt
    from jalias.run.export import export_run

    src = _run_copy(run, tmp_path / "run")
    export_run(src, model=model)
    (res,) = RunDir(src).finished_results()
    got = run_adapt._export_outputs(RunDir(src), res, model.prompt_mode, data["search_mask"], 0.5)
    assert got is not None
    assert run_adapt._export_outputs(RunDir(src), res, model.prompt_mode, data["search_mask"], 0.6) is None
    for key in ("pred_logits", "presence_logits", "union_logits"):
        np.testing.assert_allclose(got[key], data["outputs"][key], rtol=0, atol=1e-5, err_msg=key)
    a, b = alias_targets(data["ctx"], got, CFG), alias_targets(data["ctx"], data["outputs"], CFG)
    np.testing.assert_array_equal(a.union, b.union)
    np.testing.assert_allclose(a.query, b.query, rtol=0, atol=1e-6)
    np.testing.assert_allclose(a.presence, b.presence, rtol=0, atol=1e-6)

    def no_memory_teacher(*a, **k):
        raise AssertionError("the export should have been used")

    monkeypatch.setattr(run_adapt, "teacher_outputs", no_memory_teacher)
    run_adapt.adapt_run(src, steps=STEPS, out=tmp_path / "ad", progress=False, model=model)
    from_export = load_adapter(tmp_path / "ad" / "striped_blob")
    np.testing.assert_allclose(from_export.metrics["losses"], trained.metrics["losses"], rtol=1e-4)
    np.testing.assert_allclose(from_export.params["rows"], trained.params["rows"], rtol=0, atol=1e-4)
    # a lora's detector-state targets are not in the export: they are computed in memory
    calls = []
    monkeypatch.setattr(run_adapt, "teacher_outputs", lambda *a, **k: calls.append(1) or teacher_outputs(*a, **k))
    run_adapt.adapt_run(src, kind="lora", steps=2, out=tmp_path / "lora", progress=False, model=model)
    assert load_adapter(tmp_path / "lora" / "striped_blob").metrics["feature_term"] and len(calls) == 1


def test_remat_gives_the_same_loss_and_gradients(model, data):
    """AdaptConfig.remat (each image's detect pass rematerialised in the backward pass) changes memory, not
    values: loss and gradients equal with it on and off, and the compiled gradient program needs less temp memory."""
    targets = alias_targets(data["ctx"], data["outputs"], CFG)
    args = (model.params, *label_layout(model, data["label"], len(data["label"])), targets.ctx, targets.arrays(),
            targets.weights)
    rows = np.random.default_rng(0).normal(0, 0.05, (len(data["label"]), model.config.text.hidden_size))
    params = {"rows": jax.numpy.asarray(rows, jax.numpy.float32)}
    got, temp = {}, {}
    for remat in (True, False):
        step = make_step(model, AdaptConfig(steps=STEPS, remat=remat), data["label"])
        compiled = jax.jit(jax.value_and_grad(lambda p, *a, s=step: s.loss(p, *a)[0])).lower(params, *args).compile()
        got[remat] = compiled(params, *args)
        temp[remat] = compiled.memory_analysis().temp_size_in_bytes
    (l_on, g_on), (l_off, g_off) = got[True], got[False]
    assert float(l_on) == pytest.approx(float(l_off), rel=1e-6)
    assert float(np.abs(np.asarray(g_on["rows"])).max()) > 0
    np.testing.assert_allclose(np.asarray(g_on["rows"]), np.asarray(g_off["rows"]), rtol=1e-5, atol=1e-8)
    assert temp[True] < temp[False], temp  # measured (CPU, 3 images): 0.77 MB vs 1.41 MB


def test_the_first_step_already_updates():
    """Warmup starts at lr / warmup, not 0 (the first step was no update at all), and reaches lr at `warmup`:
    Adam's first update of a unit gradient is -lr / warmup (bias-corrected moments: m / sqrt(v) = 1)."""
    from jalias.adapt.trainer import optimizer

    for cfg in (CFG, AdaptConfig(warmup=0)):
        opt = optimizer(cfg)
        params = {"x": jax.numpy.zeros(3)}
        state = opt.init(params)
        grads = {"x": jax.numpy.full(3, 0.1)}  # global norm 0.17 < clip_norm: unclipped
        updates, state = opt.update(grads, state, params)
        want = cfg.lr / max(cfg.warmup, 1)
        np.testing.assert_allclose(np.asarray(updates["x"]), -want, rtol=1e-3)
        for _ in range(max(cfg.warmup, 1) - 1):
            updates, state = opt.update(grads, state, params)
        updates, state = opt.update(grads, state, params)  # step `warmup`: the full rate
        np.testing.assert_allclose(np.asarray(updates["x"]), -cfg.lr, rtol=1e-3)


# ---- the command ------------------------------------------------------------------------------------------------
def test_cli_adapt_eval_and_one_line_errors(run, model, data, tmp_path):
    out = tmp_path / "adapters"
    result = invoke("adapt", run["dir"], "--steps", STEPS, "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    (row,) = summary["categories"]
    adapter = load_adapter(out / "striped_blob")
    assert adapter.metrics["losses"][-1] < adapter.metrics["losses"][0]
    assert row["label_before"] == adapter.metrics["label_before_heldout"] and row["alias"] == run["res"][
        "alias_iou_heldout"]
    # Python: jalias.adapt(...) is the same pipeline; resume keeps the finished adapter (no training)
    notes = []
    again = jalias.adapt(run["dir"], steps=STEPS, out=out, resume=True, progress=False, log=notes.append)
    assert again["categories"] == summary["categories"] and any("adapter finished earlier, kept" in n for n in notes)
    # eval --adapter: the engine's IoU of the label with the adapter applied, on the category's positives
    res = invoke("eval", "--weights", "tiny", "--annotations", run["ann"], "--images", run["images"], "--prompt",
                 "striped blob", "--adapter", out, "--json", "-")
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)["categories"]["striped_blob"]["mean_iou"]
    (cd,) = load_coco(run["ann"], run["images"], ["striped_blob"])
    eng = Engine(apply_adapters(model, [adapter]), [cd.image(i) for i in range(len(cd.images))], cd.masks)
    assert got == pytest.approx(float(eng.score(np.asarray([data["label"]])).mean()), abs=1e-6)
    assert json.loads(res.stdout)["adapters"] == [str((out / "striped_blob").resolve())]
    # search --adapter: run.json records the adapter, the label is scored with it, export applies it too, and
    # such a run is not adapted again
    ad_run = tmp_path / "adapted_run"
    res = invoke("search", "--weights", "tiny", "--annotations", run["ann"], "--images", run["images"], "--out",
                 ad_run, "--method", "local", "--budget", "32", "--length", "3", "--max-images", "4", "--heldout",
                 "0.25", "--set", "n_candidates=16", "--no-progress", "--adapter", out)
    assert res.exit_code == 0, res.output
    assert RunDir(ad_run).read_settings().adapters == [str((out / "striped_blob").resolve())]
    assert f"adapter <code>{(out / 'striped_blob').resolve()}</code>" in (ad_run / "report.html").read_text()
    (ad_res,) = RunDir(ad_run).finished_results()
    split = rebuild_inputs(RunDir(ad_run).read_settings(), ad_res)
    search = [i for i, k in enumerate(split["split"]) if k == "search"]
    eng = Engine(apply_adapters(model, [adapter]), [split["images"][i] for i in search],
                 [split["gts"][i] for i in search])
    plain = Engine(model, [split["images"][i] for i in search], [split["gts"][i] for i in search])
    label = np.asarray([data["label"]])
    assert ad_res["label_iou_search"] == pytest.approx(float(eng.score(label).mean()), abs=1e-6)
    # the adapter changes the label's IoU (by 7e-5 here: a few steps on the random tiny model), far beyond the 1e-6
    # the IoUs above agree to
    assert abs(float(plain.score(label).mean()) - ad_res["label_iou_search"]) > 1e-5
    assert "searched with adapters" in error_line(invoke("adapt", ad_run))
    assert "another model or config" in error_line(invoke("eval", "--weights", "tiny", "--annotations", run["ann"],
                                                          "--images", run["images"], "--prompt", "x", "--adapter",
                                                          _forged(out / "striped_blob", tmp_path)))
    # one-line errors: not a run dir, run without results, category without an alias, bad kind
    assert "not a run directory" in error_line(invoke("adapt", tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(run["dir"] / "run.json", empty / "run.json")
    assert "no finished category" in error_line(invoke("adapt", empty))
    noalias = tmp_path / "noalias"
    shutil.copytree(run["dir"], noalias, ignore=shutil.ignore_patterns("adapters", "state"))
    res_file = noalias / "striped_blob.json"
    doc = json.loads(res_file.read_text())
    res_file.write_text(json.dumps({**doc, "alias_beat_label": False}))
    assert "has no alias" in error_line(invoke("adapt", noalias, "--categories", "striped_blob"))
    assert "kind must be one of" in error_line(invoke("adapt", run["dir"], "--kind", "prefix"))
    assert "no adapter" in error_line(invoke("eval", "--weights", "tiny", "--annotations", run["ann"], "--images",
                                             run["images"], "--prompt", "x", "--adapter", empty))


def _forged(path: Path, tmp: Path) -> Path:
    """A copy of an adapter whose card names another model's fingerprint."""
    dst = tmp / "forged"
    shutil.copytree(path, dst)
    card = json.loads((dst / "adapter.json").read_text())
    (dst / "adapter.json").write_text(json.dumps({**card, "model_fingerprint": "0" * 64}))
    return dst
