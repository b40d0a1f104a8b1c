"""Bad input never costs finished work: every argument is checked before anything is deleted or replaced, and a
resume that cannot continue says why in one line.

- demo: bad weights / method / budget leave the previous demo as it was; a search run that is not a demo's is
  never replaced by a demo.
- search --overwrite with an unknown category keeps the old run; a budget below the search images fails before any
  search with the minimum named; --resume after the search images changed is refused, not mixed.
- convert --overwrite replaces a checkpoint only, never another folder.
- adapt: finished adapters are kept or replaced only on --resume / --overwrite, a resume with another recipe is
  refused, and summary.json keeps the rows of categories not adapted this time.
- a missing image file is skipped by --skip-bad-images, and one the run does not use never stops it.
- usage errors of the console command (an unknown command or option, a missing option) are one line, exit 2.
- numbers and lists checked up front (negative weight nan, chunk 0, duplicate categories, eval --json a folder,
  train --eval-images 0).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from jalias.run.pipeline import KILL_ENV
from test_cli import SEARCH_ARGS, error_line, invoke, ok

CONCEPTS = ["striped_blob", "dotted_ring"]


def snapshot(folder: Path) -> dict:
    """Relative path -> bytes of every file under folder (what must survive a refused command)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bad_demo") / "demo"
    ok(invoke("demo", "--out", out, "--budget", "60", "--method", "local", "--no-progress", "--weights", "tiny"))
    return out


@pytest.fixture(scope="module")
def search_dir(demo_dir, tmp_path_factory):
    """A finished search run (not a demo) over the demo's two first concepts."""
    out = tmp_path_factory.mktemp("bad_search") / "run"
    data = demo_dir / "data"
    ok(invoke("search", "--weights", "tiny", "--annotations", data / "annotations.json", "--images",
              data / "images", "--out", out, "--categories", ",".join(CONCEPTS), *SEARCH_ARGS))
    return out


def test_demo_checks_its_arguments_before_replacing_the_previous_demo(demo_dir, search_dir):
    before = snapshot(demo_dir)
    assert "no checkpoint 'nosuch'" in error_line(invoke("demo", "--out", demo_dir, "--weights", "nosuch"))
    assert "unknown method 'foo'" in error_line(invoke("demo", "--out", demo_dir, "--weights", "tiny",
                                                       "--method", "foo"))
    line = error_line(invoke("demo", "--out", demo_dir, "--weights", "tiny", "--budget", "2"))
    assert "budget 2 is below" in line and "search images" in line
    assert snapshot(demo_dir) == before
    # a search run is not a demo's: a demo never replaces it
    kept = snapshot(search_dir)
    assert "not a demo's" in error_line(invoke("demo", "--out", search_dir, "--weights", "tiny"))
    assert snapshot(search_dir) == kept


def test_search_checks_inputs_before_overwrite_and_budget_before_searching(demo_dir, search_dir, tmp_path):
    data = demo_dir / "data"
    src = ["--weights", "tiny", "--annotations", data / "annotations.json", "--images", data / "images"]
    kept = snapshot(search_dir)
    line = error_line(invoke("search", *src, "--out", search_dir, "--categories", "nosuch", "--overwrite",
                             *SEARCH_ARGS))
    assert "unknown category 'nosuch'" in line
    assert snapshot(search_dir) == kept
    # a budget below the 4 search images (3 positives, 1 negative) cannot score one candidate: said before anything
    # runs or is written; a budget of exactly 4 is enough
    budget = lambda n: [a if a != "120" else str(n) for a in SEARCH_ARGS]  # noqa: E731
    line = error_line(invoke("search", *src, "--out", tmp_path / "small", "--categories", ",".join(CONCEPTS),
                             *budget(3)))
    assert "budget 3 is below 4, the number of search images of 'striped_blob'" in line
    assert not (tmp_path / "small").exists()
    ok(invoke("search", *src, "--out", tmp_path / "four", "--categories", "striped_blob", *budget(4)))
    assert "named twice" in error_line(invoke("search", *src, "--out", tmp_path / "twice", "--categories",
                                              "striped_blob,striped_blob", *SEARCH_ARGS))
    assert "negative-weight must be a finite number" in error_line(
        invoke("search", *src, "--out", tmp_path / "nan", "--negative-weight", "nan", *SEARCH_ARGS))


def test_resume_on_changed_search_images_is_refused(demo_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_dir / "data", data)
    out = tmp_path / "run"
    cmd = ["search", "--weights", "tiny", "--annotations", data / "annotations.json", "--images", data / "images",
           "--out", out, "--categories", "striped_blob", *SEARCH_ARGS, "--checkpoint-every", "0"]
    killed = invoke(*cmd, env={KILL_ENV: "2"})
    assert killed.exit_code != 0 and (out / "state" / "striped_blob.json").exists()
    doc = json.loads((data / "annotations.json").read_text())  # one striped blob image less
    cat = next(c["id"] for c in doc["categories"] if c["name"] == "striped_blob")
    gone = next(a["image_id"] for a in doc["annotations"] if a["category_id"] == cat)
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] != gone]
    doc["images"] = [i for i in doc["images"] if i["id"] != gone]
    (data / "annotations.json").write_text(json.dumps(doc))
    state = (out / "state" / "striped_blob.json").read_bytes()
    line = error_line(invoke(*cmd, "--resume"))
    assert "the search images of 'striped_blob' changed" in line and "--overwrite" in line
    assert (out / "state" / "striped_blob.json").read_bytes() == state


def test_convert_overwrite_replaces_only_a_checkpoint(search_dir, tmp_path):
    kept = snapshot(search_dir)
    line = error_line(invoke("convert", "weights/tiny", search_dir, "--overwrite"))
    assert "is not a jalias checkpoint" in line
    assert snapshot(search_dir) == kept
    ok(invoke("convert", "weights/small", tmp_path / "ck"))
    assert "already exists" in error_line(invoke("convert", "weights/small", tmp_path / "ck"))
    ok(invoke("convert", "weights/small", tmp_path / "ck", "--overwrite"))


def test_adapt_keeps_finished_adapters_unless_told(search_dir, tmp_path):
    out = tmp_path / "ad"
    base = ["adapt", search_dir, "--teacher", "gt", "--out", out, "--no-progress"]
    ok(invoke(*base, "--steps", "2"))
    first = json.loads((out / "summary.json").read_text())
    assert [r["category"] for r in first["categories"]] == CONCEPTS
    kept = snapshot(out)
    line = error_line(invoke(*base, "--steps", "1", "--categories", "striped_blob"))
    assert "already holds finished adapters (striped_blob)" in line and "--overwrite" in line
    line = error_line(invoke(*base, "--steps", "1", "--categories", "dotted_ring", "--resume"))
    assert "trained with other settings" in line
    assert snapshot(out) == kept
    # --overwrite of one category retrains it; summary.json keeps the other's row (same recipe)
    ok(invoke(*base, "--steps", "2", "--categories", "striped_blob", "--overwrite"))
    after = json.loads((out / "summary.json").read_text())
    assert [r["category"] for r in after["categories"]] == ["dotted_ring", "striped_blob"]
    assert after["categories"][0] == first["categories"][1]
    assert "not a directory" in error_line(invoke("adapt", search_dir, "--teacher", "gt", "--out",
                                                  search_dir / "run.json"))


def test_eval_and_train_check_numbers_and_outputs_first(demo_dir, tmp_path):
    data = demo_dir / "data"
    src = ["eval", "--weights", "tiny", "--annotations", data / "annotations.json", "--images", data / "images",
           "--prompt", "striped blob"]
    assert "is a directory" in error_line(invoke(*src, "--json", tmp_path))
    swapped = ["eval", "--weights", "tiny", "--prompt", "x", "--annotations"]
    assert "is a directory; give the COCO JSON file" in error_line(invoke(*swapped, data, "--images", data / "images"))
    assert "is a file; give the folder" in error_line(invoke(*swapped, data / "annotations.json", "--images",
                                                             data / "annotations.json"))
    assert "chunk-size must be >= 1" in error_line(invoke(*src, "--chunk-size", "0"))
    assert "negatives must be >= 0" in error_line(invoke(*src, "--negatives", "-2"))
    line = error_line(invoke("train", "--config", "tiny", "--steps", "1", "--stage2-steps", "0", "--eval-images",
                             "0", "--out", tmp_path / "t", "--no-progress"))
    assert "eval-images must be >= 1" in line and not (tmp_path / "t").exists()


def test_skip_bad_images_covers_missing_files(demo_dir, tmp_path):
    """A missing image file is an unreadable image: --skip-bad-images leaves it out (listed), and an image no
    category of the run uses never stops it."""
    data = tmp_path / "data"
    shutil.copytree(demo_dir / "data", data)
    (data / "images" / "striped_blob_001.png").unlink()
    src = ["search", "--weights", "tiny", "--annotations", data / "annotations.json", "--images", data / "images"]
    line = error_line(invoke(*src, "--out", tmp_path / "a", "--categories", "striped_blob", *SEARCH_ARGS))
    assert "image file not found" in line and "striped_blob_001.png" in line and "--skip-bad-images" in line
    ok(invoke(*src, "--out", tmp_path / "b", "--categories", "striped_blob", "--skip-bad-images", *SEARCH_ARGS))
    assert "striped_blob_001.png" in json.loads((tmp_path / "b" / "all_results.json").read_text())["skipped_images"]
    # dotted_ring without negatives never decodes a striped blob image (click keeps the last --negatives)
    ok(invoke(*src, "--out", tmp_path / "c", "--categories", "dotted_ring", *SEARCH_ARGS, "--negatives", "0"))


@pytest.mark.parametrize("args, says", [(["nosuch"], "No such command 'nosuch'"),
                                        (["search", "--weights", "tiny"], "Missing option '--annotations'"),
                                        (["demo", "--bogus"], "No such option: --bogus")])
def test_usage_errors_are_one_line(args, says):
    """The console entry point (`jalias.cli:main`): Click's usage errors as one line, exit 2, help pointed to."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "jalias.cli", *args], capture_output=True, text=True, cwd=root,
                         env={**os.environ, "PYTHONPATH": str(root)}, timeout=120)
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], out.stderr
    assert "--help`" in lines[0]

