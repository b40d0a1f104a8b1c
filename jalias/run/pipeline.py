"""One category of a run: label baseline, resumable search, held-out evaluation, overlay, <slug>.json.

Device out-of-memory halves what the failing path uses (exact scoring: the chunk size; the gradient: its image
batch) and repeats the step (`oom.with_oom_retry`, which names the rule); the search state
is written atomically by `Checkpointer` at most every `checkpoint_every` seconds, on Ctrl-C / SIGTERM and at the
category's end, so a resumed search continues exactly.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import report
from .io import RunError, clean, fmt, mean, read_json, write_json_atomic
from .oom import is_oom, with_oom_retry  # noqa: F401  (is_oom: also imported from here)
from .rundir import RunDir, RunSettings
from .splits import Split, label_ids_of, load_split, split_category

# Test/debug hook: raise SimulatedKill after this many search checkpoints (nothing is flushed, as with kill -9).
KILL_ENV = "JALIAS_SIMULATE_KILL_AFTER"


class SimulatedKill(Exception):
    """Raised by the KILL_ENV hook: the process 'dies' without saving anything more."""


class KillSwitch:
    def __init__(self):
        v = os.environ.get(KILL_ENV)
        self.left = int(v) if v else None

    def tick(self) -> None:
        if self.left is not None:
            self.left -= 1
            if self.left <= 0:
                raise SimulatedKill(f"simulated kill ({KILL_ENV})")


def make_engine(model, split: Split, settings: RunSettings, chunk_size: int | None, prefix_cache: bool = True,
                grad_batch: int = 1):
    """The engine of one split; grad_batch: images per step of the gradient's image loop (halved on OOM)."""
    from ..engine import Engine

    try:
        engine = Engine(model, split.images, split.gts, negative=split.is_negative, chunk_size=chunk_size,
                        prefix_cache=prefix_cache, threshold=settings.threshold,
                        negative_weight=settings.negative_weight)
        engine.grad_batch = int(grad_batch)
        return engine
    except Exception as e:  # noqa: BLE001
        if is_oom(e):
            raise RunError(f"out of device memory while encoding {len(split)} images: use fewer --max-images "
                           "or a smaller model") from None
        raise


def score_one(engine, ids: Sequence[int], log, what: str) -> np.ndarray:
    """float32[K] IoU of one content-id sequence on every engine image."""
    ids = np.asarray(ids, np.int32)[None]
    return np.asarray(with_oom_retry(engine, lambda: engine.score(ids), log, what), np.float32)[0]


class Checkpointer:
    """on_checkpoint hook: keeps the newest search state, writes it atomically at most every `every` seconds
    (and on flush()), drives the progress display, and implements the KILL_ENV test hook."""

    def __init__(self, path: Path, category: str, initial: dict | None, every: float,
                 on_state: Callable[[dict], None], kill: KillSwitch, image_ids: Sequence = ()):
        self.path, self.category, self.latest = path, category, initial
        self.image_ids = [str(i) for i in image_ids]  # the search images the state belongs to
        self.every, self.on_state, self.kill = every, on_state, kill
        self.last_write = time.monotonic()
        self.dirty = False

    def __call__(self, state: dict) -> None:
        self.latest = state
        self.dirty = True
        self.on_state(state)
        if time.monotonic() - self.last_write >= self.every:
            self.flush()
        self.kill.tick()

    def flush(self) -> None:
        if self.latest is not None and self.dirty:
            try:
                write_json_atomic(self.path, {"category": self.category, "image_ids": self.image_ids,
                                              "state": self.latest}, indent=None)
            except OSError as e:  # e.g. disk full: the atomic write left the previous state file as it was
                raise RunError(f"cannot write the search state {self.path} ({e.strerror or e}); the state saved "
                               "before is kept: free space and run the same command with --resume") from e
            self.last_write = time.monotonic()
            self.dirty = False


def _split_stats(iou_label: np.ndarray, iou_alias: np.ndarray, split: Split) -> dict:
    pos, neg = ~split.is_negative, split.is_negative
    return {
        "label_iou": mean(iou_label[pos]), "alias_iou": mean(iou_alias[pos]),
        # on a negative image IoU is 1 exactly when the prediction is empty
        "label_negatives_empty": mean(iou_label[neg] == 1.0) if neg.any() else None,
        "alias_negatives_empty": mean(iou_alias[neg] == 1.0) if neg.any() else None,
    }


def _per_image(split: Split, iou_label, iou_alias) -> list[dict]:
    return [{"image_id": iid, "negative": bool(n), "label_iou": float(a), "alias_iou": float(b)}
            for iid, n, a, b in zip(split.image_ids, split.is_negative, iou_label, iou_alias)]


def _search(engine, name: str, slug: str, config, settings: RunSettings, run: RunDir, resume: bool,
            checkpoint_every: float, progress, kill: KillSwitch, position: str, image_ids: Sequence = ()):
    """The resumable search of one category -> SearchResult (state in state/<slug>.json, with the ids of the
    search images it belongs to: a resume on other images is refused)."""
    from ..search import run_search

    log = run.log
    state_path = run.state_path(slug)
    initial = None
    for stale in state_path.parent.glob(f".{state_path.name}.tmp-*") if resume else ():
        stale.unlink(missing_ok=True)  # the temp file of a state write cut short by a kill (never the state)
    if resume and state_path.exists():
        saved = read_json(state_path, "search state")
        initial, before = saved.get("state"), saved.get("image_ids")
        now_ids = [str(i) for i in image_ids]
        if initial is not None and before is not None and before != now_ids:
            raise RunError(f"cannot resume {run.path}: the search images of {name!r} changed since its search "
                           f"started ({len(before)} then, {len(now_ids)} now, or other ones); restore the dataset "
                           "or start over with --overwrite")
        if initial is not None:
            log(f"{name}: resuming search at {initial['budget']['used']} evaluations "
                f"(iteration {initial['iteration']})")
    task = progress.start(f"{name} ({position})", settings.budget, initial)
    ckpt = Checkpointer(state_path, name, initial, checkpoint_every, lambda s: progress.update(task, s), kill,
                        image_ids)
    try:
        # the bar moves with every charged chunk of evaluations, not only at checkpoints
        result = with_oom_retry(
            engine, lambda: run_search(settings.method, engine, config, on_checkpoint=ckpt, resume_state=ckpt.latest,
                                       on_progress=lambda used: progress.advance(task, used)),
            log, f"searching {name}")
        progress.finish(task, result.evals_used, result.stop_reason)
    except KeyboardInterrupt:
        ckpt.flush()
        log(f"{name}: interrupted; search state saved to {state_path}")
        raise
    finally:
        progress.stop(task)
    ckpt.dirty = ckpt.latest is not None
    ckpt.flush()
    return result


def pick_overlay_rows(splits: Sequence[np.ndarray], cap: int) -> tuple[list, list]:
    """Which images an overlay shows: every one while they fit in `cap` rows, else the cap shared round-robin
    among the groups (each split's positives, each split's negatives) so every group keeps some rows.
    splits: is_negative bool[K] per split. Returns (shown, left out): (split index, image index) lists, in
    split order with positives first."""
    groups = [[(s, int(i)) for i in np.flatnonzero(neg == kind)]
              for s, neg in enumerate(splits) for kind in (False, True)]
    shown: list = []
    depth = 0
    while len(shown) < cap and any(depth < len(g) for g in groups):
        for g in groups:
            if depth < len(g) and len(shown) < cap:
                shown.append(g[depth])
        depth += 1
    order = [x for g in groups for x in g]
    keep = set(shown)
    return [x for x in order if x in keep], [x for x in order if x not in keep]


def _overlay(model, path: Path, parts, label_ids, alias_ids, threshold: float, overlay_rows: int, label: str,
             alias_text: str) -> list[dict]:
    """Every image of every split (up to `overlay_rows` rows, `pick_overlay_rows`), with the engine's prediction
    rule. parts: (split name, Split, engine, label IoU [K], alias IoU [K]) per split. Returns the images left
    out: [{"image_id", "split", "negative", "reason"}] (also named on the figure)."""
    from ..engine.predict import predict

    shown, left = pick_overlay_rows([p[1].is_negative for p in parts], overlay_rows)
    rows = []
    for s, i in shown:
        split_name, split, eng, il, ia = parts[s]
        # the image is encoded again: the engine holds only what its scoring path reads, not the FPN maps
        pred = predict(model, split.images[i], [label_ids, alias_ids], threshold, mask_shape=split.gts[i].shape)
        rows.append(report.OverlayRow(split.images[i], split.gts[i], pred["masks"][0], pred["masks"][1],
                                      split.image_ids[i], split_name, bool(split.is_negative[i]),
                                      float(il[i]), float(ia[i])))
    reason = f"the overlay shows at most {overlay_rows} images"
    left_out = [{"image_id": parts[s][1].image_ids[i], "split": parts[s][0],
                 "negative": bool(parts[s][1].is_negative[i]), "reason": reason} for s, i in left]
    report.overlay_png(path, rows, label, alias_text, [x["image_id"] for x in left_out])
    return left_out


def search_category(model, cd, slug: str, settings: RunSettings, run: RunDir, resume: bool,
                    chunk_size: int | None, checkpoint_every: float, progress, kill: KillSwitch,
                    overlay_rows: int, position: str = "", grad_batch: int = 1) -> dict:
    """Label baseline, search, held-out evaluation and overlay of one category; writes <slug>.json.
    chunk_size / grad_batch: the search engine's starting exact-scoring chunk and gradient image batch."""
    from ..search import objective
    from ..tokenizer import detokenize, encode, round_trips

    log = run.log
    t0 = time.perf_counter()
    search_cd, held_cd = split_category(cd, settings)
    if len(cd.negatives) < settings.negatives:
        log(f"warning: {cd.name}: only {len(cd.negatives)} negative images available (asked for {settings.negatives})")
    search = load_split(search_cd)
    held = load_split(held_cd) if held_cd is not None else None
    label_ids = label_ids_of(cd.label, cd.name)
    if len(label_ids) < len(encode(cd.label)):
        log(f"warning: {cd.name}: its label has {len(encode(cd.label))} tokens; it is cut to the first "
            f"{len(label_ids)} (the prompt's content limit)")
    log(f"{cd.name}: {search.n_positive}+{len(search) - search.n_positive} search images (positive+negative), "
        f"{held.n_positive if held else 0}+{len(held) - held.n_positive if held else 0} held-out; "
        f"label {cd.label!r} = {label_ids}")

    engine = make_engine(model, search, settings, chunk_size, grad_batch=grad_batch)
    label_search = score_one(engine, label_ids, log, f"scoring the label of {cd.name}")
    config = settings.search_config(label_ids)
    if config.init == "label" and not np.any(label_search[~search.is_negative] > 0):
        # every candidate near a label with IoU 0 everywhere also scores 0: the objective is flat there
        log(f"{cd.name}: the label scores IoU 0 on every search image, so the objective is flat around it; "
            f"the search starts from random tokens instead (the label stays the baseline)")
        config = dataclasses.replace(config, init="random", label_ids=None)
    result = _search(engine, cd.name, slug, config, settings, run, resume, checkpoint_every, progress, kill,
                     position, search.image_ids)
    if not result.best:
        raise RunError(f"category {cd.name!r}: the budget ({settings.budget}) is too small to score even one "
                       f"candidate on {len(search)} images")
    best = result.best[0]
    found_ids = [int(i) for i in best.ids]
    found_search = score_one(engine, found_ids, log, f"scoring the alias of {cd.name}")
    obj = lambda iou: float(objective(iou[None], search.is_negative, settings.negative_weight)[0])
    label_objective, found_objective = obj(label_search), obj(found_search)
    beat = found_objective > label_objective  # the label is always a candidate: an alias must beat it
    if beat:
        alias_ids, alias_text, alias_search = found_ids, best.text, found_search
    else:
        alias_ids, alias_text, alias_search = list(label_ids), detokenize(label_ids), label_search
        log(f"{cd.name}: no alias beat the label (best found {best.text!r}: objective {found_objective:.3f} vs "
            f"label {label_objective:.3f} on the search images); the label is kept as the result")
    engine_chunk, engine_grad_batch = engine.chunk_size, engine.grad_batch  # as shrunk by out-of-memory retries
    parts = [("search", search, engine, label_search, alias_search)]

    # held-out evaluation (no prefix cache: two single prompts, nothing to share)
    label_held = alias_held = np.zeros(0, np.float32)
    if held is not None:
        held_engine = make_engine(model, held, settings, chunk_size, prefix_cache=False)
        label_held = score_one(held_engine, label_ids, log, f"scoring the label of {cd.name} (held-out)")
        alias_held = (score_one(held_engine, alias_ids, log, f"scoring the alias of {cd.name} (held-out)")
                      if beat else label_held)  # the label kept as the result: scored once
        parts.append(("heldout", held, held_engine, label_held, alias_held))
        del held_engine
    overlay = f"overlays/{slug}.png"
    overlay_left_out = _overlay(model, run.path / overlay, parts, label_ids, alias_ids, settings.threshold,
                                overlay_rows, cd.label, alias_text)
    del engine, parts
    gc.collect()

    s = _split_stats(label_search, alias_search, search)
    h = _split_stats(label_held, alias_held, held) if held is not None else {}
    res = clean({
        "status": "done", "category": cd.name, "slug": slug, "label": cd.label, "label_ids": label_ids,
        "search_init": config.init,
        "label_text": detokenize(label_ids), "alias_ids": alias_ids, "alias_text": alias_text,
        # typing alias_text (jalias eval --prompt, Meta's or HF's processor) prompts with alias_ids
        "round_trips": bool(round_trips([alias_ids])[0]), "rejected_not_round_trip": result.rejected,
        "alias_beat_label": beat, "best_found": {"ids": found_ids, "text": best.text, "objective": found_objective},
        "label_iou_search": s["label_iou"], "label_iou_heldout": h.get("label_iou"),
        "alias_iou_search": s["alias_iou"], "alias_iou_heldout": h.get("alias_iou"),
        "negatives_empty": {"label_search": s["label_negatives_empty"], "alias_search": s["alias_negatives_empty"],
                            "label_heldout": h.get("label_negatives_empty"),
                            "alias_heldout": h.get("alias_negatives_empty")},
        "objective": {"label": label_objective, "alias": max(found_objective, label_objective)},
        "evals": result.evals_used, "budget": settings.budget, "seconds": result.wall_time_s,
        # candidate-image evaluations answered from the search memory instead of paid (SearchConfig.cache_size)
        "evals_saved": result.evals_saved,
        "category_seconds": time.perf_counter() - t0, "method": settings.method, "method_config": result.config,
        "stop_reason": result.stop_reason, "iterations": result.iterations, "chunk_size": engine_chunk,
        "grad_batch": engine_grad_batch,
        "n_search": search.n_positive, "n_heldout": held.n_positive if held else 0,
        "images": {
            "search": list(search_cd.image_ids), "search_negatives": list(search_cd.negative_ids),
            "heldout": list(held_cd.image_ids) if held_cd else [],
            "heldout_negatives": list(held_cd.negative_ids) if held_cd else [],
        },
        "per_image": {"search": _per_image(search, label_search, alias_search),
                      "heldout": _per_image(held, label_held, alias_held) if held is not None else []},
        "candidates": [dataclasses.asdict(c) for c in result.best],
        "history": [list(x) for x in result.history],
        "overlay": overlay, "overlay_left_out": overlay_left_out,
    })
    write_json_atomic(run.result_path(slug), res)
    log(f"{cd.name}: category done in {res['category_seconds']:.1f}s (search {res['seconds']:.1f}s, the rest: "
        f"loading images, label and held-out scoring, overlays); label IoU {fmt(res['label_iou_search'])} -> alias "
        f"{res['alias_text']!r} {fmt(res['alias_iou_search'])} (search), held-out label "
        f"{fmt(res['label_iou_heldout'])} alias {fmt(res['alias_iou_heldout'])}; {res['evals']} evaluations "
        f"(+{res['evals_saved']} answered from the search memory)")
    return res
