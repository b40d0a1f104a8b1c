"""The `jalias` command end to end (typer's CliRunner) on the embedded tiny model and small generated datasets.

Covers: demo (report files and JSON contents), search on a COCO set written by `write_coco` (polygons and RLE),
resume after a simulated kill == uninterrupted run, one-line errors with exit code 1 (missing / corrupt image,
unknown category, category without masks, weights mismatch, out of memory), eval with --prompt and --tokens,
export (.npz + index.json keys and shapes), convert. Searches use tiny budgets; every engine in this file sees
64x64 images, so compiled programs are shared through JAX's persistent cache.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from typer.testing import CliRunner

from jalias.run.api import DEMO_CONCEPTS
from jalias.run.model import embedded_tiny_path, load_model, tiny_model
from jalias.run.pipeline import KILL_ENV, SimulatedKill
from jalias.run.rundir import RunDir
from jalias.run.splits import rebuild_inputs
from jalias.cli import app
from jalias.data import load_coco, make_dataset, write_coco
from jalias.tokenizer import detokenize, encode

RUNNER = CliRunner()
CONCEPTS = ["striped_blob", "dotted_ring"]
# local search, 16 candidates per step: no gradient program to compile, several steps within the budget
SEARCH_ARGS = ["--method", "local", "--budget", "120", "--length", "3", "--max-images", "4", "--heldout", "0.25",
               "--negatives", "2", "--set", "n_candidates=16", "--no-progress"]


def invoke(*args, env=None):
    return RUNNER.invoke(app, [str(a) for a in args], env=env)


def ok(result):
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    return result


def error_line(result) -> str:
    """The command failed cleanly: exit code 1 and exactly one 'error: ...' line on stderr."""
    assert result.exit_code == 1, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """A COCO dataset of two synthetic concepts, 5 images each (64x64)."""
    root = tmp_path_factory.mktemp("coco")
    ann, images = write_coco(make_dataset(5, 64, CONCEPTS, seed=1), root)
    return Path(ann), Path(images)


@pytest.fixture(scope="module")
def reference_run(coco, tmp_path_factory):
    """An uninterrupted search run over both categories."""
    ann, images = coco
    out = tmp_path_factory.mktemp("ref") / "run"
    ok(invoke("search", "--weights", "tiny", "--annotations", ann, "--images", images, "--out", out, *SEARCH_ARGS))
    return out


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    result = ok(invoke("demo", "--out", out, "--budget", "150", "--no-progress", "--weights", "tiny"))
    return out, result


# ---- demo -------------------------------------------------------------------------------------------------------
def test_demo_writes_report_and_sane_results(demo_run):
    out, result = demo_run
    for name in ("report.json", "report.html", "all_results.json", "log.txt", "run.json", "curves.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "all_results.json").read_text())
    assert list(summary["categories"]) == list(DEMO_CONCEPTS)
    assert summary["finished"] == summary["total"] == 3
    for name, row in summary["categories"].items():
        res = json.loads((out / f"{row['slug']}.json").read_text())
        assert res["status"] == "done" and res["category"] == name
        assert (out / res["overlay"]).is_file()
        assert 0 < res["evals"] <= 150
        assert res["label_ids"] == encode(res["label"])
        assert len(res["alias_ids"]) == 4 and detokenize(res["alias_ids"]) == res["alias_text"]
        # the alias works as a plain prompt: its text tokenizes back to its ids (retokenize is on by default)
        assert res["round_trips"] is True and encode(res["alias_text"]) == res["alias_ids"]
        assert res["alias_text"].isascii()  # the demo proposes ASCII word pieces only
        for key in ("label_iou_search", "label_iou_heldout", "alias_iou_search", "alias_iou_heldout"):
            assert 0.0 <= res[key] <= 1.0, key
        # split: 6 positives -> 4 search + 2 held-out; 2 negatives -> 1 + 1; no image in both
        imgs = res["images"]
        assert (len(imgs["search"]), len(imgs["heldout"])) == (4, 2)
        assert (len(imgs["search_negatives"]), len(imgs["heldout_negatives"])) == (1, 1)
        assert not set(imgs["search"]) & set(imgs["heldout"])
        # the reported alias is the search's best candidate (its IoUs are checked against torch below)
        assert res["candidates"][0]["ids"] == res["alias_ids"]
        assert res["history"][-1][0] <= res["evals"]
    report = json.loads((out / "report.json").read_text())
    assert [r["category"] for r in report["rows"]] == list(DEMO_CONCEPTS)
    html = (out / "report.html").read_text()
    assert "src='curves.png'" in html and "src='overlays/striped_blob.png'" in html
    assert "<b>random</b> weights" in html  # the demo's tiny model is random, and the report says so
    links = re.findall(r"(?:src|href)='([^'#]+)'", html)
    assert links and all(not link.startswith("/") and (out / link).is_file() for link in links)  # relative, present
    # one collapsible section per category (open: only 3), the summary figure, each category's curve
    assert html.count("<details class='cat'") == 3
    assert html.count("<details class='cat' id='striped_blob' open>") == 1
    assert "src='summary.png'" in html and "src='curves/striped_blob.png'" in html
    # the log names what its time measures; the table on stdout shows the objective, negatives and both times
    log = (out / "log.txt").read_text()
    assert re.search(r"striped_blob: category done in [0-9.]+s \(search [0-9.]+s, the rest", log)
    for word in ("striped_blob", "IoU", "objective", "negatives", "search s", "category s"):
        assert word in result.stdout, word
    assert re.search(r"striped_blob +│ label 'striped blob'", result.stdout)


def test_demo_overlays_show_every_image(demo_run):
    """Every search and held-out image (negatives included) is a row of its category's overlay, in split order:
    its image panel is the image itself, resized, untinted (none left out at the default cap of 24 rows)."""
    from PIL import Image

    from jalias.run.figures import PANEL

    out, _ = demo_run
    settings = RunDir(out).read_settings()
    for name in DEMO_CONCEPTS:
        res = json.loads((out / f"{name}.json").read_text())
        assert res["overlay_left_out"] == []
        canvas = np.asarray(Image.open(out / res["overlay"]).convert("RGB"))
        inputs = rebuild_inputs(settings, res)
        assert len(inputs["images"]) == 8  # 4 + 1 negative search, 2 + 1 held-out
        rows = []
        for img in inputs["images"]:
            panel = np.asarray(Image.fromarray(img).resize((PANEL, PANEL), Image.BILINEAR))
            hits = [y for y in range(canvas.shape[0] - PANEL + 1)
                    if np.array_equal(canvas[y:y + PANEL, 6:6 + PANEL], panel)]
            assert len(hits) == 1, (name, len(hits))
            rows.append(hits[0])
        assert rows == sorted(rows)


@pytest.fixture(scope="module")
def torch_tiny():
    """transformers' Sam3Model holding the embedded tiny weights: the independent reference for run results."""
    from parity_utils import torch_model_of

    model, _ = load_model("tiny")
    assert model.prompt_mode == "hf"  # no geometry encoder: transformers' text path is the reference
    return torch_model_of(model)


def _torch_ious(out: Path, res: dict, hm) -> dict:
    """image id -> (label IoU, alias IoU, torch masks bool[2, H, W]) recomputed with torch on the run's images:
    transformers' forward, the mask rule restated in torch, numpy IoU."""
    from parity_utils import content_prompts, numpy_iou, torch_forward, torch_predicted_masks

    from jalias.model.preprocess import preprocess

    inputs = rebuild_inputs(RunDir(out).read_settings(), res)
    ids, mask = content_prompts([res["label_ids"], res["alias_ids"]])
    got = {}
    for img, gt, iid in zip(inputs["images"], inputs["gts"], inputs["image_ids"]):
        px = np.repeat(preprocess(img, hm.config.vision_config.backbone_config.image_size), 2, 0)
        masks = torch_predicted_masks(torch_forward(hm, px.astype(np.float32), ids, mask), gt.shape)
        label, alias = numpy_iou(masks, gt[None])
        got[iid] = (float(label), float(alias), masks)
    return got


def _assert_results_match_torch(out: Path, res: dict, hm) -> dict:
    """Every per-image IoU and the four aggregates (means over positives) of a category's result equal the torch
    recomputation (measured equal to 1e-7: the masks are pixel-identical)."""
    ref = _torch_ious(out, res, hm)
    for split in ("search", "heldout"):
        per = res["per_image"][split]
        assert {p["image_id"] for p in per} <= set(ref)
        for p in per:
            label, alias, _ = ref[p["image_id"]]
            assert p["label_iou"] == pytest.approx(label, abs=1e-6) and p["alias_iou"] == pytest.approx(alias, abs=1e-6)
        pos = [ref[p["image_id"]] for p in per if not p["negative"]]
        assert res[f"label_iou_{split}"] == pytest.approx(np.mean([r[0] for r in pos]), abs=1e-6)
        assert res[f"alias_iou_{split}"] == pytest.approx(np.mean([r[1] for r in pos]), abs=1e-6)
    return ref


def test_demo_results_match_torch_and_overlays_show_them(demo_run, torch_tiny):
    """The demo's numbers, recomputed by an independent implementation (torch), and the overlay/export prediction
    path (jalias.engine.predict) giving torch's masks pixel for pixel."""
    from jalias.engine.predict import predict

    out, _ = demo_run
    model, _ = load_model("tiny")
    summary = json.loads((out / "all_results.json").read_text())
    for name in DEMO_CONCEPTS:
        res = json.loads((out / f"{summary['categories'][name]['slug']}.json").read_text())
        ref = _assert_results_match_torch(out, res, torch_tiny)
    inputs = rebuild_inputs(RunDir(out).read_settings(), res)
    for img, gt, iid in list(zip(inputs["images"], inputs["gts"], inputs["image_ids"]))[:4]:
        pred = predict(model, img, [res["label_ids"], res["alias_ids"]], mask_shape=gt.shape)
        assert (pred["masks"] != ref[iid][2]).sum() <= 1


def test_tiny_fallback_equals_embedded_checkpoint():
    if not embedded_tiny_path().exists():
        pytest.skip("weights/tiny not present")
    stored, _ = load_model("tiny")
    built = tiny_model()
    a = {k: np.asarray(v) for k, v in _flat(stored.params).items()}
    b = {k: np.asarray(v) for k, v in _flat(built.params).items()}
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v
    return out


# ---- search -----------------------------------------------------------------------------------------------------
def test_search_on_coco(coco, reference_run, torch_tiny):
    ann, _ = coco
    data = json.loads(ann.read_text())
    segs = [a["segmentation"] for a in data["annotations"]]
    assert any(isinstance(s, list) for s in segs) and any(isinstance(s, dict) for s in segs)  # polygons and RLE
    out = reference_run
    summary = json.loads((out / "all_results.json").read_text())
    assert list(summary["categories"]) == CONCEPTS
    for name in CONCEPTS:
        res = json.loads((out / f"{name}.json").read_text())
        assert res["method"] == "local" and res["method_config"]["n_candidates"] == 16
        assert res["evals"] <= 120 and res["stop_reason"]
        assert len(res["alias_ids"]) == 3
        assert (len(res["images"]["search"]), len(res["images"]["heldout"])) == (3, 1)
        negs = [p for p in res["per_image"]["search"] + res["per_image"]["heldout"] if p["negative"]]
        assert len(negs) == 2
        # a negative image's IoU is 1 exactly when nothing is predicted there
        assert all(p["alias_iou"] in (0.0, 1.0) for p in negs)
        row = summary["categories"][name]
        assert row["alias_ids"] == res["alias_ids"] and row["label_iou_heldout"] == res["label_iou_heldout"]
        _assert_results_match_torch(out, res, torch_tiny)  # positives and negatives, search and held-out
    log = (out / "log.txt").read_text()
    assert "new run" in log and "run finished" in log
    assert (out / "state" / "striped_blob.json").is_file()


def test_resume_after_kill_equals_uninterrupted(coco, reference_run, tmp_path):
    ann, images = coco
    ref = {n: json.loads((reference_run / f"{n}.json").read_text()) for n in CONCEPTS}
    first = ref[CONCEPTS[0]]["iterations"]
    assert ref[CONCEPTS[1]]["iterations"] >= 3
    out = tmp_path / "run"
    args = ["search", "--weights", "tiny", "--annotations", ann, "--images", images, "--out", out, *SEARCH_ARGS,
            "--checkpoint-every", "0"]
    # die (without saving anything more) after two search iterations of the second category
    result = invoke(*args, env={KILL_ENV: str(first + 2)})
    assert isinstance(result.exception, SimulatedKill), result.output
    assert (out / f"{CONCEPTS[0]}.json").is_file() and not (out / f"{CONCEPTS[1]}.json").exists()
    state = json.loads((out / "state" / f"{CONCEPTS[1]}.json").read_text())["state"]
    assert state["iteration"] == 2 and 0 < state["budget"]["used"] < ref[CONCEPTS[1]]["evals"]

    # without --resume the run directory is refused
    assert "--resume" in error_line(invoke(*args))
    # resuming with different settings is refused
    assert "budget" in error_line(invoke(*[a if a != "120" else "130" for a in args], "--resume"))

    ok(invoke(*args, "--resume"))
    assert f"{CONCEPTS[0]}: finished earlier, skipped" in (out / "log.txt").read_text()
    keys = ("alias_ids", "alias_text", "label_iou_search", "label_iou_heldout", "alias_iou_search",
            "alias_iou_heldout", "evals", "iterations", "history", "candidates", "per_image", "images")
    for n in CONCEPTS:
        got = json.loads((out / f"{n}.json").read_text())
        for k in keys:
            assert got[k] == ref[n][k], (n, k)


def test_out_of_memory_halves_chunk_size_then_fails_cleanly(coco, reference_run, tmp_path, monkeypatch):
    from jalias.engine import Engine

    ann, images = coco
    real_score = Engine.score
    calls = {"n": 0}

    def flaky(self, *a, **k):  # the 3rd call (inside the search) runs out of memory once
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB.")
        return real_score(self, *a, **k)

    monkeypatch.setattr(Engine, "score", flaky)
    out = tmp_path / "oom"
    ok(invoke("search", "--weights", "tiny", "--annotations", ann, "--images", images, "--out", out,
              "--categories", CONCEPTS[0], "--chunk-size", "64", *SEARCH_ARGS))
    res = json.loads((out / f"{CONCEPTS[0]}.json").read_text())
    ref = json.loads((reference_run / f"{CONCEPTS[0]}.json").read_text())
    assert res["chunk_size"] == 32
    assert "out of memory" in (out / "log.txt").read_text()
    # the retry continued from the last checkpoint: same search as without the error
    assert (res["alias_ids"], res["evals"], res["history"]) == (ref["alias_ids"], ref["evals"], ref["history"])

    def always(self, *a, **k):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB.")

    monkeypatch.setattr(Engine, "score", always)
    line = error_line(invoke("search", "--weights", "tiny", "--annotations", ann, "--images", images,
                             "--out", tmp_path / "oom2", "--chunk-size", "4", *SEARCH_ARGS))
    assert "out of device memory" in line and "chunk size 1" in line


# ---- errors -----------------------------------------------------------------------------------------------------
def _copy_coco(coco, dst: Path) -> tuple[Path, Path]:
    ann, images = coco
    shutil.copytree(images, dst / "images")
    shutil.copy(ann, dst / "annotations.json")
    return dst / "annotations.json", dst / "images"


def test_error_missing_image(coco, tmp_path):
    ann, images = _copy_coco(coco, tmp_path)
    (images / "dotted_ring_002.png").unlink()
    line = error_line(invoke("search", "--weights", "tiny", "--annotations", ann, "--images", images,
                             "--out", tmp_path / "run", *SEARCH_ARGS))
    assert "image file not found" in line and "dotted_ring_002.png" in line


def test_error_corrupt_image_keeps_finished_categories(coco, tmp_path, monkeypatch):
    """An image that becomes unreadable after the up-front check (e.g. on a network file system): the run stops
    at it and keeps what finished."""
    import jalias.run.api as api

    monkeypatch.setattr(api, "check_images", lambda concepts, settings, skip, log: (concepts, {}))
    ann, images = _copy_coco(coco, tmp_path)
    # an image that only the second category uses
    first, second = load_coco(ann, images, CONCEPTS, max_images=4)
    used_by_first = set(first.image_ids) | set(first.negative_ids[:2])
    victim = next(i for i in second.image_ids if i not in used_by_first)
    (images / victim).write_bytes(b"this is not a png")
    out = tmp_path / "run"
    line = error_line(invoke("search", "--weights", "tiny", "--annotations", ann, "--images", images,
                             "--out", out, *SEARCH_ARGS))
    assert "cannot read image file" in line and victim in line
    # the error says what finished and how to go on; the finished category is summarised and reported
    assert f"1 of 2 categories finished, kept and reported in {out}: {CONCEPTS[0]}" in line
    assert "--resume to continue" in line
    summary = json.loads((out / "all_results.json").read_text())
    assert list(summary["categories"]) == [CONCEPTS[0]] and summary["finished"] == 1
    assert "error:" in (out / "log.txt").read_text()
    assert CONCEPTS[0] in (out / "report.html").read_text()
    # after the fix, --resume keeps the finished category and does the rest
    shutil.copy(coco[1] / victim, images / victim)
    ok(invoke("search", "--weights", "tiny", "--annotations", ann, "--images", images, "--out", out, *SEARCH_ARGS,
              "--resume"))
    assert json.loads((out / "all_results.json").read_text())["finished"] == 2
    assert f"{CONCEPTS[0]}: finished earlier, skipped" in (out / "log.txt").read_text()


def test_bad_images_are_found_before_any_search_or_skipped(coco, tmp_path):
    ann, images = _copy_coco(coco, tmp_path)
    first, second = load_coco(ann, images, CONCEPTS, max_images=4)
    victim = next(i for i in second.image_ids if i not in set(first.image_ids) | set(first.negative_ids[:2]))
    (images / victim).write_bytes(b"this is not a png")
    out = tmp_path / "run"
    line = error_line(invoke("search", "--weights", "tiny", "--annotations", ann, "--images", images,
                             "--out", out, *SEARCH_ARGS))
    assert victim in line and "before any search" in line and "--skip-bad-images" in line
    assert not list(out.glob("*_*.json")) and not (out / "state").exists()  # nothing was searched
    result = ok(invoke("search", "--weights", "tiny", "--annotations", ann, "--images", images, "--out", out,
                       *SEARCH_ARGS, "--skip-bad-images", "--overwrite"))
    summary = json.loads((out / "all_results.json").read_text())
    assert summary["finished"] == 2 and list(summary["skipped_images"]) == [victim]
    res = json.loads((out / f"{CONCEPTS[1]}.json").read_text())
    used = res["images"]["search"] + res["images"]["heldout"]
    assert victim not in used and len(used) == 3  # 4 positives asked for, the unreadable one left out
    assert victim in (out / "report.html").read_text() and f"skipped unreadable image {victim}" in result.stderr


def test_error_unknown_category(coco, tmp_path):
    ann, images = coco
    line = error_line(invoke("search", "--weights", "tiny", "--annotations", ann, "--images", images,
                             "--out", tmp_path / "run", "--categories", "striped_blob,unicorn", *SEARCH_ARGS))
    assert "unknown category 'unicorn'" in line


def test_error_category_without_masks(coco, tmp_path):
    ann, images = _copy_coco(coco, tmp_path)
    data = json.loads(ann.read_text())
    data["categories"].append({"id": 77, "name": "ghost"})
    data["annotations"].append({"id": 9999, "image_id": data["images"][0]["id"], "category_id": 77,
                                "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0})  # a box, no segmentation
    ann.write_text(json.dumps(data))
    line = error_line(invoke("search", "--weights", "tiny", "--annotations", ann, "--images", images,
                             "--out", tmp_path / "run", "--categories", "ghost", *SEARCH_ARGS))
    assert "'ghost' has no segmentation masks" in line
    # with every category asked for, ghost is skipped with a warning line (a run's log also prints it to stderr)
    lines = []
    assert [c.name for c in load_coco(ann, images, None, log=lines.append)] == CONCEPTS
    assert lines == [f"warning: category 'ghost' has no segmentation masks in {ann}: skipped"]


def test_warnings_reach_stderr_and_the_log(tmp_path, capsys):
    from jalias.run.io import RunLog

    log = RunLog(tmp_path / "log.txt")
    log("warning: dotted_ring: only 2 negative images available (asked for 5)")
    log("dotted_ring: 3+2 search images")
    assert capsys.readouterr().err == "warning: dotted_ring: only 2 negative images available (asked for 5)\n"
    assert len((tmp_path / "log.txt").read_text().splitlines()) == 2


def _random_safetensors(dst: Path, drop: str | None = None) -> Path:
    from safetensors.numpy import save_file

    from jalias.model.config import tiny_config
    from jalias.model.init import random_params
    from jalias.weights.mapping import params_to_state_dict

    cfg = tiny_config()
    sd = params_to_state_dict(random_params(cfg, seed=3))
    if drop:
        sd = {k: v for k, v in sd.items() if k != drop}
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(dst / "model.safetensors"))
    return dst / "model.safetensors"


def test_error_weights_mismatch(coco, tmp_path):
    ann, images = coco
    key = "detr_decoder.query_embed.weight"
    src = _random_safetensors(tmp_path / "broken", drop=key)
    line = error_line(invoke("search", "--weights", src, "--annotations", ann, "--images", images,
                             "--out", tmp_path / "run", *SEARCH_ARGS))
    assert "missing weight" in line and key in line
    line = error_line(invoke("search", "--weights", tmp_path / "nowhere", "--annotations", ann, "--images", images,
                             "--out", tmp_path / "run2", *SEARCH_ARGS))
    assert "not found" in line


def test_error_bad_option(coco, tmp_path):
    ann, images = coco
    line = error_line(invoke("search", "--weights", "tiny", "--annotations", ann, "--images", images,
                             "--out", tmp_path / "run", "--method", "gcg", "--set", "n_candidates=4"))
    assert "unknown option 'n_candidates' for method gcg" in line
    line = error_line(invoke("search", "--weights", "tiny", "--annotations", ann, "--images", images,
                             "--out", tmp_path / "run3", "--method", "gcg", "--set", "search_width=abc"))
    assert line == "error: option search_width expects int, got 'abc'"


def test_version():
    from importlib.metadata import version

    assert ok(invoke("--version")).stdout.strip() == f"jalias {version('jalias')}"


# ---- eval -------------------------------------------------------------------------------------------------------
def test_eval_prompt_and_tokens(coco, reference_run):
    ann, images = coco
    common = ["eval", "--weights", "tiny", "--annotations", ann, "--images", images, "--categories",
              "striped_blob", "--max-images", "4"]
    by_text = json.loads(ok(invoke(*common, "--prompt", "striped blob", "--json", "-")).stdout)
    ids = encode("striped blob")
    by_ids = json.loads(ok(invoke(*common, "--tokens", ",".join(map(str, ids)), "--json", "-")).stdout)
    assert by_text["ids"] == by_ids["ids"] == ids
    cat = by_text["categories"]["striped_blob"]
    assert len(cat["images"]) == 4
    assert cat == by_ids["categories"]["striped_blob"]
    ious = [im["iou"] for im in cat["images"]]
    assert all(0 <= v <= 1 for v in ious) and cat["mean_iou"] == pytest.approx(np.mean(ious))
    # the same label IoU per image as the search run measured (whose IoUs test_search_on_coco checks with torch)
    res = json.loads((reference_run / "striped_blob.json").read_text())
    seen = {p["image_id"]: p["label_iou"] for p in res["per_image"]["search"] + res["per_image"]["heldout"]}
    for im in cat["images"]:
        assert im["iou"] == pytest.approx(seen[im["image_id"]], abs=1e-6)
    table = ok(invoke(*common, "--prompt", "striped blob")).stdout
    assert "mean" in table and "striped_blob_000.png" in table
    assert "exactly one" in error_line(invoke(*common))
    assert "out of range" in error_line(invoke(*common, "--tokens", "49406"))


# ---- export -----------------------------------------------------------------------------------------------------
def test_export_npz_and_index(demo_run, tmp_path):
    out, _ = demo_run
    ok(invoke("export", out, "--out", tmp_path / "export"))
    index = json.loads((tmp_path / "export" / "index.json").read_text())
    assert index["format"] == "jalias.export" and len(index["categories"]) == 3
    m, q = index["model"]["mask_size"], index["model"]["num_queries"]
    t, d, ct = index["model"]["context_length"], index["model"]["prompt_width"], index["model"]["text_width"]
    checked_union = 0
    for entry in index["categories"]:
        res = json.loads((out / f"{entry['category']}.json").read_text())
        with np.load(tmp_path / "export" / entry["file"]) as z:
            keys = set(z.files)
            k = len(z["image_ids"])
            assert k == 8  # 4 + 1 search, 2 + 1 held-out
            expect = {"alias_ids": (4,), "input_ids": (t,), "attention_mask": (t,), "prompt_features": (t, d),
                      "token_embeddings": (4, ct), "split": (k,), "is_negative": (k,), "iou": (k,),
                      "pred_logits": (k, q), "presence_logits": (k, 1), "scores": (k, q), "keep": (k, q),
                      "pred_boxes": (k, q, 4), "union_logits": (k, m, m), "semantic_logits": (k, m, m),
                      "pred_masks": (k, q, m, m)}
            for key, shape in expect.items():
                assert z[key].shape == shape, key
            assert {f"mask_{i:03d}" for i in range(k)} <= keys
            assert set(index["keys"]) - {"mask_###"} <= keys
            assert z["pred_masks"].dtype == np.float16 and z["keep"].dtype == bool
            assert list(z["alias_ids"]) == res["alias_ids"] == entry["alias_ids"]
            assert int(z["attention_mask"].sum()) == 4 + 2
            # the exported predictions reproduce the run's per-image alias IoUs (checked with torch above)
            per = {p["image_id"]: p["alias_iou"] for p in res["per_image"]["search"] + res["per_image"]["heldout"]}
            for iid, v in zip(z["image_ids"], z["iou"]):
                assert float(v) == pytest.approx(per[str(iid)], abs=1e-6)
            neg = z["is_negative"]
            assert neg.sum() == 2 and list(z["split"]).count("heldout") == 3
            # union_logits = max over kept queries of the mask logits
            i = int(np.argmax(z["keep"].sum(1)))
            if z["keep"][i].any():  # pred_masks are stored in float16, union_logits in float32
                want = z["pred_masks"][i][z["keep"][i]].max(0)
                np.testing.assert_array_equal(z["union_logits"][i].astype(np.float16), want)
                checked_union += 1
    assert checked_union >= 1, "no category's alias keeps a query: union_logits went unchecked"
    result = ok(invoke("export", out, "--out", tmp_path / "small", "--no-pred-masks"))
    assert "exported 3 categories" in result.stdout
    with np.load(tmp_path / "small" / "striped_blob.npz") as z:
        assert "pred_masks" not in z.files and "union_logits" in z.files
    assert "not a run directory" in error_line(invoke("export", tmp_path))


# ---- convert, misc ----------------------------------------------------------------------------------------------
def test_convert_random_checkpoint(tmp_path):
    from jalias.weights import load

    src = _random_safetensors(tmp_path / "hf")
    dst = tmp_path / "converted"
    result = ok(invoke("convert", src, dst, "--dtype", "bfloat16"))
    assert "converted" in result.stdout and (dst / "jalias.json").is_file()
    meta = json.loads((dst / "jalias.json").read_text())
    assert meta["dtype"] == "bfloat16"
    a, b = load(dst), load(src)
    fa, fb = _flat(a.params), _flat(b.params)
    assert fa.keys() == fb.keys()
    for k in fa:  # bf16 storage: exactly the float32 source rounded to bf16 (round to nearest even)
        want = np.asarray(fb[k]).astype(ml_dtypes.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(fa[k]), want, err_msg=k)
    assert "already exists" in error_line(invoke("convert", src, dst))
    ok(invoke("convert", src, dst, "--overwrite"))


def test_import_is_light_and_help_lists_commands():
    code = "import sys, jalias; jalias.tokenize('a'); print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.stdout.strip() == "False"
    help_text = ok(invoke("--help")).stdout
    for cmd in ("demo", "search", "eval", "export", "convert"):
        assert cmd in help_text


def test_reference_run_results_never_lose_to_the_label(reference_run):
    """Every finished category either reports an alias whose search objective beats the label's, or says that no
    alias beat it and keeps the label (ids and IoU) as its result."""
    for f in sorted(reference_run.glob("*.json")):
        r = json.loads(f.read_text())
        if r.get("status") != "done":
            continue
        if r["alias_beat_label"]:
            assert r["objective"]["alias"] > r["objective"]["label"]
            assert r["alias_ids"] == r["best_found"]["ids"]
        else:
            assert r["alias_ids"] == r["label_ids"] and r["alias_iou_search"] == r["label_iou_search"]


def test_no_alias_beat_the_label(coco, tmp_path, monkeypatch):
    """A search whose best candidate is the label itself (objective equal, not better) reports no alias."""
    import jalias.search as search
    from jalias.tokenizer import encode as enc

    real = search.run_search

    def label_only(method, engine, config, **kw):
        result = real(method, engine, config, **kw)
        best = result.best[0]
        result.best = [dataclasses.replace(best, ids=enc("striped blob"), text="striped blob")]
        return result

    monkeypatch.setattr(search, "run_search", label_only)
    ann, images = coco
    out = tmp_path / "run"
    res = ok(invoke("search", "--weights", "tiny", "--annotations", ann, "--images", images, "--out", out,
                    "--categories", "striped_blob", *SEARCH_ARGS))
    r = json.loads((out / "striped_blob.json").read_text())
    assert r["alias_beat_label"] is False and r["alias_ids"] == r["label_ids"]
    assert r["alias_iou_heldout"] == r["label_iou_heldout"]
    assert "no alias beat the label" in res.stdout
    assert "no alias beat the label" in (out / "report.html").read_text()
    assert "no alias beat the label" in (out / "log.txt").read_text()


def test_demo_on_a_world_checkpoint_uses_the_ood_concepts(tmp_path):
    """Any checkpoint other than 'tiny' (a `jalias train` output) gets the procedural world's OOD concepts."""
    from jalias.data.world import OOD_BY_NAME
    from jalias.run.api import DEMO_OOD_CONCEPTS, demo
    from jalias.run.model import embedded_tiny_path

    out = tmp_path / "demo"
    summary = demo(out=out, budget=40, weights=str(embedded_tiny_path()), images_per_concept=3, negatives=1,
                   progress=False)
    assert list(summary["categories"]) == list(DEMO_OOD_CONCEPTS)
    ann = json.loads((out / "data" / "annotations.json").read_text())
    assert {c["name"]: c["label"] for c in ann["categories"]} == {n: OOD_BY_NAME[n].label for n in DEMO_OOD_CONCEPTS}
    for name, row in summary["categories"].items():
        res = json.loads((out / f"{row['slug']}.json").read_text())
        assert res["label"] == OOD_BY_NAME[name].label and res["status"] == "done"


def test_progress_says_compiling_until_the_first_step():
    import io

    from rich.console import Console

    from jalias.run.progress import Progress

    buf = io.StringIO()
    with Progress(True, Console(file=buf, width=160, force_terminal=True)) as p:
        task = p.start("tomato (1/3)", 1000, None)
        p._bar.refresh()
        first = buf.getvalue()
        p.update(task, {"budget": {"used": 100, "top": [[[1], 0.5, 0.4]]}})
        p._bar.refresh()
    assert "compiling" in first and "0/1000" in first
    last = buf.getvalue()[len(first):]
    assert "100/1000" in last and "best IoU 0.400" in last and "compiling" not in last


@pytest.mark.parametrize("damage", ["every file", "data files only"])
def test_damaged_checkpoint_is_one_line_and_no_noise(tmp_path, damage):
    """A checkpoint whose files hold random bytes: exit 1 and exactly one line on the real stderr of a fresh
    process (no absl warning, no asyncio 'Event loop is closed' tracebacks at shutdown)."""
    if not embedded_tiny_path().exists():
        pytest.skip("weights/tiny not present")
    bad = tmp_path / "bad"
    shutil.copytree(embedded_tiny_path(), bad)
    rng = np.random.default_rng(0)
    files = [f for f in (bad / "params").rglob("*") if f.is_file()]
    if damage == "data files only":
        files = [f for f in files if f.parent.name == "d"]
    for f in files:
        f.write_bytes(rng.integers(0, 256, max(f.stat().st_size, 16), dtype=np.uint8).tobytes())
    out = subprocess.run([sys.executable, "-m", "jalias.cli", "eval", "--weights", str(bad), "--annotations", "x",
                          "--images", "y", "--prompt", "a"], capture_output=True, text=True, timeout=300)
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 1 and len(lines) == 1, out.stderr
    assert lines[0].startswith(f"error: cannot restore Orbax params from {bad / 'params'}")
