"""Faults on a long run cost nothing finished (issue 13, "Faults"), and what a run changes on its own is said.

- Device out-of-memory, simulated inside the engine's own jitted calls (an error whose message holds
  RESOURCE_EXHAUSTED whenever the setting is above what 'fits'), on each path: exact scoring (GCG's candidate
  batches: the chunk size is halved, the gradient's image batch left alone), the gradient (GCG's token_grad) and
  soft (PEZ: soft_loss_and_grad; the image batch is halved, the chunk size left alone), and export (images per
  image-encoder call). Each run finishes with the result of a run started at the setting the retries reach.
- Disk full while writing the search state (a failing writer): one error line, the last state intact, and
  --resume after the fix equals an uninterrupted run.
- SIGKILL in the middle of a state write (a real subprocess, killed after the temp file is written and before it
  replaces the state): the state dir holds the last good state, and --resume equals an uninterrupted run.
- The capped-negatives and cut-label warnings reach stderr and log.txt.
Every engine here sees 64x64 images (compiled programs shared with tests/test_cli.py through JAX's cache).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jalias.atomic as atomic
from jalias.data import make_dataset, write_coco
from jalias.engine import Engine
from jalias.model.sam3 import Sam3
from jalias.run.api import search_dataset
from jalias.run.export import export_run
from jalias.run.io import RunError
from jalias.tokenizer import encode
from test_cli import error_line, invoke, ok  # the CLI helpers, one definition

CONCEPTS = ["striped_blob", "dotted_ring"]
OOM = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB."
# what a search result must repeat exactly to be "the same search"
SAME = ("alias_ids", "alias_text", "evals", "iterations", "history", "candidates", "per_image", "images",
        "label_iou_search", "alias_iou_search", "label_iou_heldout", "alias_iou_heldout")
# local search (no gradient program), as tests/test_cli.py runs it: several checkpoints within the budget
LOCAL_ARGS = ["--method", "local", "--budget", "120", "--length", "3", "--max-images", "4", "--heldout", "0.25",
              "--negatives", "2", "--set", "n_candidates=16", "--no-progress", "--checkpoint-every", "0"]


def results(out: Path, names=CONCEPTS) -> dict:
    return {n: json.loads((out / f"{n}.json").read_text()) for n in names}


def assert_same_search(got: dict, ref: dict) -> None:
    for k in SAME:
        assert got[k] == ref[k], k


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    ann, images = write_coco(make_dataset(5, 64, CONCEPTS, seed=1), root)
    return Path(ann), Path(images)


# ---- out of memory ----------------------------------------------------------------------------------------------
def _search(coco, out, method, **kw):
    ann, images = coco
    budget = {"gcg": 80, "soft": 40}[method]
    options = {"search_width": 16} if method == "gcg" else {}
    return search_dataset("tiny", ann, images, categories=[CONCEPTS[0]], method=method, budget=budget, length=3,
                          max_images=4, heldout=0.25, out=out, options=options, progress=False, report=False,
                          checkpoint_every=0, **kw)


def _oom_inside_engine(monkeypatch, *, max_candidates=None, max_grad_batch=None):
    """Every Engine built from now on runs out of memory inside its jitted exact-scoring call when a chunk holds
    more than max_candidates candidates, and inside its jitted value-and-grad call when it vmaps more than
    max_grad_batch images (None: that path always fits). Returns the calls seen: [(path, size, failed)]."""
    seen = []
    init = Engine.__init__

    def patched(self, *a, **k):
        init(self, *a, **k)
        iou, soft = self._jit_iou, self._jit_soft

        def jit_iou(params, prompt, *args, **kw):
            fail = max_candidates is not None and prompt.shape[0] > max_candidates
            seen.append(("score", int(prompt.shape[0]), fail))
            if fail:
                raise RuntimeError(OOM)
            return iou(params, prompt, *args, **kw)

        def jit_soft(*args, grad_batch=1, **kw):
            fail = max_grad_batch is not None and grad_batch > max_grad_batch
            seen.append(("grad", grad_batch, fail))
            if fail:
                raise RuntimeError(OOM)
            return soft(*args, grad_batch=grad_batch, **kw)

        self._jit_iou, self._jit_soft = jit_iou, jit_soft

    monkeypatch.setattr(Engine, "__init__", patched)
    return seen


@pytest.fixture(scope="module")
def gcg_reference(coco, tmp_path_factory):
    """GCG at the settings the exact-scoring retries reach (chunk 8) with a gradient image batch of 2."""
    out = tmp_path_factory.mktemp("gcg") / "ref"
    _search(coco, out, "gcg", chunk_size=8, grad_batch=2)
    return out


def test_oom_in_exact_scoring_halves_the_chunk_size_only(coco, gcg_reference, tmp_path, monkeypatch):
    seen = _oom_inside_engine(monkeypatch, max_candidates=8)
    out = tmp_path / "run"
    _search(coco, out, "gcg", chunk_size=64, grad_batch=2)
    res, ref = results(out, CONCEPTS[:1])[CONCEPTS[0]], results(gcg_reference, CONCEPTS[:1])[CONCEPTS[0]]
    assert ("score", 16, True) in seen and ("grad", 2, False) in seen  # failed in scoring; gradients ran at 2
    assert (res["chunk_size"], res["grad_batch"]) == (8, 2)  # 64 -> 32 -> 16 -> 8; the gradient's batch kept
    log = (out / "log.txt").read_text()
    assert "exact scoring at chunk size 16 -> 8" in log and "gradient with an image batch" not in log
    assert_same_search(res, ref)


@pytest.mark.parametrize("method", ["gcg", "soft"])
def test_oom_in_the_gradient_halves_its_image_batch_only(coco, tmp_path, monkeypatch, method):
    ref_out = tmp_path / "ref"
    _search(coco, ref_out, method, chunk_size=64)  # grad_batch 1: what the retry reaches
    seen = _oom_inside_engine(monkeypatch, max_grad_batch=1)
    out = tmp_path / "run"
    _search(coco, out, method, chunk_size=64, grad_batch=2)
    res, ref = results(out, CONCEPTS[:1])[CONCEPTS[0]], results(ref_out, CONCEPTS[:1])[CONCEPTS[0]]
    assert ("grad", 2, True) in seen and ("grad", 1, False) in seen
    assert (res["chunk_size"], res["grad_batch"]) == (64, 1)  # the gradient path shrank, exact scoring did not
    log = (out / "log.txt").read_text()
    assert "the gradient with an image batch of 2 -> 1" in log and "exact scoring at chunk size" not in log
    assert_same_search(res, ref)

    # at one image per step there is nothing left to shrink: one line saying what was tried
    _oom_inside_engine(monkeypatch, max_grad_batch=0)
    with pytest.raises(RunError) as err:
        _search(coco, tmp_path / "fail", method, chunk_size=64, grad_batch=2)
    msg = str(err.value)
    assert "\n" not in msg and "out of device memory while searching striped_blob" in msg
    assert "even with 1 image per gradient step" in msg and "(tried 2, 1)" in msg and "chunk size" not in msg


def test_oom_in_export_halves_its_image_batch(gcg_reference, tmp_path, monkeypatch):
    ref = export_run(gcg_reference, tmp_path / "ref", batch=2).parent
    encode = Sam3.encode_image
    calls = []

    def small_device(self, pixel_values):
        calls.append(int(pixel_values.shape[0]))
        if pixel_values.shape[0] > 2:
            raise RuntimeError(OOM)
        return encode(self, pixel_values)

    monkeypatch.setattr(Sam3, "encode_image", small_device)
    got = export_run(gcg_reference, tmp_path / "got", batch=4).parent
    assert calls[0] == 4 and set(calls[1:]) == {2}  # one failed call, then every call with 2 images
    assert "out of memory while exporting striped_blob; retrying with 2 images per image-encoder call" in \
        (gcg_reference / "log.txt").read_text()
    one = export_run(gcg_reference, tmp_path / "one", batch=1).parent  # today's default: one image per call
    for name in ("striped_blob.npz",):
        with np.load(ref / name) as a, np.load(got / name) as b, np.load(one / name) as c:
            assert a.files == b.files
            for key in a.files:
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)  # same as a run started at 2
                if a[key].dtype.kind == "f":  # batching the encoder changes values by float rounding only
                    np.testing.assert_allclose(a[key], c[key], atol=1e-3, err_msg=key)
            assert a["iou"].tolist() == c["iou"].tolist()

    def no_memory(self, pixel_values):
        raise RuntimeError(OOM)

    monkeypatch.setattr(Sam3, "encode_image", no_memory)
    with pytest.raises(RunError) as err:
        export_run(gcg_reference, tmp_path / "none", batch=2)
    assert "even with 1 image per image-encoder call (tried 2, 1)" in str(err.value)


# ---- disk full, SIGKILL mid-write -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_reference(coco, tmp_path_factory):
    ann, images = coco
    out = tmp_path_factory.mktemp("local") / "ref"
    ok(invoke("search", "--weights", "tiny", "--annotations", ann, "--images", images, "--out", out, *LOCAL_ARGS))
    return out


def _args(coco, out):
    ann, images = coco
    return ["search", "--weights", "tiny", "--annotations", ann, "--images", images, "--out", out, *LOCAL_ARGS]


def test_disk_full_while_writing_state_then_resume(coco, local_reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    state = out / "state" / f"{CONCEPTS[1]}.json"
    real = atomic._write_file
    writes = {"n": 0, "last_good": None}

    def disk_fills_up(path, text):  # the 3rd write of the second category's state: half written, then ENOSPC
        if path.name.startswith(f".{state.name}.tmp-"):
            writes["n"] += 1
            if writes["n"] == 3:
                path.write_text(text[:len(text) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            writes["last_good"] = text
        real(path, text)

    monkeypatch.setattr(atomic, "_write_file", disk_fills_up)
    line = error_line(invoke(*_args(coco, out)))
    assert f"cannot write the search state {state}" in line and "No space left on device" in line
    assert "--resume" in line and "1 of 2 categories finished" in line
    # the last good state is in place, whole, and loadable; no temp file is left behind
    assert state.read_text() == writes["last_good"]
    assert json.loads(state.read_text())["state"]["iteration"] == 2
    assert [p.name for p in state.parent.iterdir()] == [p.name for p in state.parent.glob("*.json")]
    assert (out / f"{CONCEPTS[0]}.json").is_file() and not (out / f"{CONCEPTS[1]}.json").exists()

    monkeypatch.setattr(atomic, "_write_file", real)  # space freed
    ok(invoke(*_args(coco, out), "--resume"))
    assert f"{CONCEPTS[1]}: resuming search" in (out / "log.txt").read_text()
    got, ref = results(out), results(local_reference)
    for n in CONCEPTS:
        assert_same_search(got[n], ref[n])


def test_sigkill_in_the_middle_of_a_state_write_then_resume(coco, local_reference, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, atomic.KILL_IN_WRITE_ENV: f"3:{os.sep}state{os.sep}"}
    proc = subprocess.run([sys.executable, "-m", "jalias.cli", *map(str, _args(coco, out))], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    state_dir = out / "state"
    state = state_dir / f"{CONCEPTS[0]}.json"
    # killed after the 3rd state's temp file was written, before it replaced the state: the 2nd state is there
    (tmp,) = state_dir.glob(f".{state.name}.tmp-*")
    for f in state_dir.glob("*.json"):
        json.loads(f.read_text())  # no partial JSON
    assert json.loads(state.read_text())["state"]["iteration"] == 2
    assert json.loads(tmp.read_text())["state"]["iteration"] == 3

    ok(invoke(*_args(coco, out), "--resume"))
    assert not tmp.exists()  # the resumed run removed the dead write's temp file
    got, ref = results(out), results(local_reference)
    for n in CONCEPTS:
        assert_same_search(got[n], ref[n])


# ---- warnings ---------------------------------------------------------------------------------------------------
def test_capped_negatives_and_cut_label_warn_on_stderr_and_in_the_log(coco, tmp_path):
    src_ann, src_images = coco
    shutil.copytree(src_images, tmp_path / "images")
    data = json.loads(src_ann.read_text())
    label = " ".join(["striped blob"] * 20)
    n_tokens = len(encode(label))
    assert n_tokens > 30  # over the prompt's content limit
    for cat in data["categories"]:
        if cat["name"] == CONCEPTS[0]:
            cat["label"] = label
    ann = tmp_path / "annotations.json"
    ann.write_text(json.dumps(data))
    out = tmp_path / "run"
    result = ok(invoke("search", "--weights", "tiny", "--annotations", ann, "--images", tmp_path / "images",
                       "--out", out, "--categories", CONCEPTS[0], "--method", "local", "--budget", "40",
                       "--length", "3", "--max-images", "4", "--negatives", "50", "--set", "n_candidates=16",
                       "--no-progress"))
    res = results(out, CONCEPTS[:1])[CONCEPTS[0]]
    n_neg = len(res["images"]["search_negatives"]) + len(res["images"]["heldout_negatives"])
    assert 0 < n_neg < 50
    want = [f"warning: {CONCEPTS[0]}: only {n_neg} negative images available (asked for 50)",
            f"warning: {CONCEPTS[0]}: its label has {n_tokens} tokens; it is cut to the first 30 (the prompt's content "
            "limit)"]
    warned = [ln for ln in result.stderr.splitlines() if ln.startswith("warning: ")]
    assert warned == want
    log = [ln.split(" ", 2)[2] for ln in (out / "log.txt").read_text().splitlines()]  # without the time stamp
    assert [ln for ln in log if ln.startswith("warning: ")] == want
    assert len(res["label_ids"]) == 30
