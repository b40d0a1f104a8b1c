"""The Python API behind the `jalias` command: `search_dataset`, `demo`, `evaluate_prompt` (and
`jalias.run.export.export_run`). Errors raise with one-line messages; categories finished before an error stay
on disk."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

from .io import RunError, clean, mean
from .model import adapter_paths, load_model, weights_spec
from .pipeline import KillSwitch, SimulatedKill, make_engine, score_one, search_category
from .progress import Progress
from .rundir import RunDir, RunSettings, slugify
from .splits import check_budget, check_images, load_split

DEMO_CONCEPTS = ("striped_blob", "checkered_star", "dotted_ring")  # the random tiny model's (tests)
DEMO_OOD_CONCEPTS = ("tomato", "blue_triangle", "heart")  # for a world-trained model: one of each OOD kind


def run_settings(weights, annotations, images, categories, method, budget, length, max_images, heldout, negatives,
                 seed, init, negative_weight=0.5, dtype=None, options=None, prompt_mode=None, adapters=None,
                 skip_bad_images=False) -> RunSettings:
    """`search_dataset`'s arguments as validated RunSettings (ValueError naming the first bad one)."""
    from ..model.layers import default_dtype

    settings = RunSettings(
        weights=weights_spec(str(weights)), annotations=str(Path(annotations).resolve()),
        images=str(Path(images).resolve()), categories=list(categories) if categories else None, method=method,
        budget=int(budget), length=int(length), max_images=max_images, heldout=float(heldout),
        negatives=int(negatives), seed=int(seed), init=init, negative_weight=float(negative_weight),
        dtype=default_dtype() if dtype is None else dtype,
        options=dict(options or {}), prompt_mode=prompt_mode, adapters=adapter_paths(adapters),
        skip_bad_images=bool(skip_bad_images))
    settings.validate()
    return settings


def search_dataset(weights: str, annotations: str | os.PathLike, images: str | os.PathLike,
                   categories: Sequence[str] | None = None, method: str = "gcg", budget: int = 10_000,
                   length: int = 4, max_images: int | None = 10, heldout: float = 0.3, negatives: int = 0,
                   seed: int = 0, out: str | os.PathLike = "runs/search", resume: bool = False,
                   overwrite: bool = False, chunk_size: int | None = None, init: str = "random",
                   negative_weight: float = 0.5, dtype: str | None = None, options: dict | None = None,
                   checkpoint_every: float = 5.0, report: bool = True, progress: bool = True, console=None,
                   model=None, overlay_rows: int = 24, prompt_mode: str | None = None,
                   adapters: Sequence[str] | None = None, skip_bad_images: bool = False,
                   grad_batch: int = 1) -> dict:
    """Search an alias for each category of a COCO dataset; returns the all_results.json dict.

    weights: checkpoint path or name (see `jalias.run.model.load_model`); categories: names (None: all with
    masks); budget: candidate-image evaluations per category; max_images: positives (and the negative pool) per
    category; heldout: fraction of images held out of the search; negatives: negative images per category;
    options: method config fields (e.g. {"search_width": 64}); checkpoint_every: seconds between state writes;
    model: an already loaded model for `weights` (skips loading). prompt_mode: "meta" | "hf" | None (the model's
    default; on resume, the mode the run was started with); run.json records the mode used. adapters: adapter
    directories (or folders of them) from `jalias adapt`, applied to the model and recorded in run.json (a model
    passed as `model` must not carry adapters of its own: name them here). Every image is decoded before any
    search; an unreadable one is an error, or with skip_bad_images left out and listed (run.json, all_results.json,
    the report). Results are written to `out`. dtype: compute dtype, None: `default_dtype()` (float32 on every
    backend today; on resume, the run's). chunk_size / grad_batch: exact-scoring candidates per step (None: from
    free memory) and gradient images per step; device out-of-memory halves the failing path's (`oom.py`).
    """
    from ..data import load_coco

    settings = run_settings(weights, annotations, images, categories, method, budget, length, max_images, heldout,
                            negatives, seed, init, negative_weight, dtype, options, prompt_mode, adapters,
                            skip_bad_images)
    if model is not None and getattr(model, "adapters", ()):
        raise ValueError("the model passed in carries adapters: pass the plain model and their directories as "
                         "adapters=... so run.json records them")
    _check_chunk_size(chunk_size)
    if grad_batch < 1:
        raise ValueError(f"grad-batch must be >= 1, got {grad_batch}")
    run = RunDir(out)
    if resume and dtype is None and run.run_json.exists():
        settings.dtype = run.read_settings().dtype  # the dtype the run started with, whatever today's default
    if resume and prompt_mode is None and run.run_json.exists():
        settings.prompt_mode = run.read_settings().prompt_mode  # continue in the mode the run started with
    # every input is checked before `prepare`, which with overwrite deletes the previous run's outputs
    run.check(settings, resume, overwrite)
    early: list[str] = []  # log lines from before the run directory is ready
    concepts = load_coco(settings.annotations, settings.images, settings.categories, settings.max_images,
                         log=early.append)
    concepts, bad = check_images(concepts, settings, settings.skip_bad_images, early.append)
    check_budget(concepts, settings)
    if model is None:
        model, note = load_model(settings.weights, settings.dtype, settings.prompt_mode, settings.adapters)
        if note:
            early.append(note)
    run.prepare(settings, resume, overwrite)
    log = run.log
    for line in early:
        log(line)
    cats: list[dict] = []
    try:
        run.set_skipped_images(bad)
        taken: set[str] = set()
        cats = [{"name": c.name, "slug": slugify(c.name, taken)} for c in concepts]
        run.set_categories(cats)
        model = model.with_prompt_mode(settings.prompt_mode)
        if settings.prompt_mode is None:
            settings.prompt_mode = model.prompt_mode
            run.record_settings(settings)
        log(f"model: {model.num_params:,} params, image size {model.config.image_size}, {settings.dtype}, "
            f"prompt mode {model.prompt_mode}")
        kill = KillSwitch()
        with Progress(progress, console) as bar:
            for k, (cd, cat) in enumerate(zip(concepts, cats)):
                if resume and run.finished(cat["slug"]) is not None:
                    log(f"{cd.name}: finished earlier, skipped")
                    continue
                search_category(model, cd, cat["slug"], settings, run, resume, chunk_size, checkpoint_every,
                                bar, kill, overlay_rows, f"{k + 1}/{len(cats)}", grad_batch=grad_batch)
                run.write_summary(settings)
        summary = run.write_summary(settings)
        if report:
            from .report import write_report

            write_report(run.path)
        log("run finished")
        return summary
    except SimulatedKill:
        raise
    except KeyboardInterrupt:
        log("interrupted")
        raise
    except Exception as e:
        try:
            log(f"error: {type(e).__name__}: {e}")
        except OSError:  # e.g. the disk that stopped the run is full: the error itself must still reach the user
            pass
        done = run.finished_results()
        if not done:
            raise
        # nothing finished is lost: summary and report of what finished, and how to go on
        try:
            run.write_summary(settings)
            if report:
                from .report import write_report

                write_report(run.path)
        except Exception as r:  # the summary / report must not hide the error that stopped the run
            try:
                log(f"summary or report not written: {type(r).__name__}: {r}")
            except OSError:
                pass
        names = ", ".join(r["category"] for r in done[:5]) + (", ..." if len(done) > 5 else "")
        total = f" of {len(cats)}" if cats else ""
        raise RunError(f"{e} ({len(done)}{total} categories finished, kept and reported in {run.path}: {names}; "
                       "fix the input and run the same command with --resume to continue)") from e


def demo(out: str | os.PathLike = "runs/demo", budget: int = 1000, method: str = "gcg",
         concepts: Sequence[str] | None = None, images_per_concept: int = 6, image_size: int = 64,
         negatives: int = 2, heldout: float = 1 / 3, length: int = 4, init: str = "label", seed: int = 0,
         resume: bool = False, options: dict | None = None, chunk_size: int | None = None,
         checkpoint_every: float = 5.0, progress: bool = True, console=None, weights: str = "small",
         note: Callable[[str], None] | None = None) -> dict:
    """The whole pipeline on an embedded model and a generated out-of-distribution dataset (no downloads).

    weights "small" (default): the trained small SAM3 (weights/small, `jalias train`), like any other checkpoint
    taken to be a model of the procedural world, gets its OOD concepts (`data.world.ood_dataset`,
    DEMO_OOD_CONCEPTS: a new name, a new combination, a new shape) at the model's image size; "tiny", the
    embedded random tiny model, gets the texture concepts of `data.synthetic` (DEMO_CONCEPTS, image_size) and
    shows only that the pipeline runs. The dataset
    (`images_per_concept` images per concept) is written to `out`/data in COCO format and `search_dataset` runs on
    it: each search starts from the label (init="label") and proposes only ASCII word pieces, with each method's
    measured settings (search/defaults.py). A previous demo in `out` is replaced unless resume=True, once every
    argument has been checked; a search run there that is not a demo's is never touched. note(msg) receives
    one-line remarks (e.g. that a model was built in memory).
    """
    from ..data import make_dataset, write_coco
    from ..data.world import ood_dataset

    out = Path(out)
    run = RunDir(out)
    data_dir = out / "data"
    ann = data_dir / "annotations.json"
    if run.run_json.exists() and Path(run.read_settings().annotations) != ann.resolve():
        raise FileExistsError(f"{out} holds a search run that is not a demo's; choose another --out")
    model, msg = load_model(weights)
    trained = weights != "tiny"
    if concepts is None:
        concepts = DEMO_OOD_CONCEPTS if trained else DEMO_CONCEPTS
    opts = {"ascii_only": True, **(options or {})}  # on top of the method's measured settings
    args = dict(categories=list(concepts), method=method, budget=budget, length=length,
                max_images=images_per_concept, heldout=heldout, negatives=negatives, seed=seed, init=init,
                options=opts)
    settings = run_settings(weights, ann, data_dir / "images", **args)
    data = None
    if not (resume and ann.exists()):
        if trained:
            data = ood_dataset(list(concepts), images_per_concept, model.config.image_size, seed)
        else:
            data = make_dataset(images_per_concept, image_size, list(concepts), seed)
        check_budget(data.concept_data(), settings)
    run.check(settings, resume, overwrite=True)
    for line in (msg, None if trained else "the tiny model's weights are random: the numbers show the pipeline "
                 "runs, not SAM3's behaviour"):
        if line and note is not None:
            note(line)
    if run.run_json.exists() and not resume:
        run.clear()  # the previous demo, now that the new one's arguments are known to be good
    if data is not None:
        write_coco(data, data_dir)
    return search_dataset(weights, ann, data_dir / "images", **args, out=out, resume=resume, overwrite=False,
                          chunk_size=chunk_size, checkpoint_every=checkpoint_every, progress=progress,
                          console=console, model=model)


def _check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk-size must be >= 1, got {chunk_size}")


def _prompt_ids(prompt: str | None, tokens: Sequence[int] | None) -> list[int]:
    """Content ids of a text prompt or of explicit token ids (exactly one given); ValueError on bad input."""
    from ..tokenizer import START_ID, encode

    if (prompt is None) == (tokens is None):
        raise ValueError("give exactly one of a text prompt or token ids")
    if prompt is not None:
        ids = encode(prompt)[:30]
        if not ids:
            raise ValueError(f"prompt {prompt!r} has no tokens")
        return ids
    ids = [int(t) for t in tokens]
    if not 1 <= len(ids) <= 30:
        raise ValueError(f"need 1..30 token ids, got {len(ids)}")
    bad = [t for t in ids if not 0 <= t < START_ID]
    if bad:
        raise ValueError(f"token id {bad[0]} is out of range (content ids are 0..{START_ID - 1})")
    return ids


def evaluate_prompt(weights: str, annotations: str | os.PathLike, images: str | os.PathLike,
                    prompt: str | None = None, tokens: Sequence[int] | None = None,
                    categories: Sequence[str] | None = None, max_images: int | None = None, negatives: int = 0,
                    chunk_size: int | None = None, dtype: str | None = None, threshold: float = 0.5,
                    model=None, prompt_mode: str | None = None, adapters: Sequence[str] | None = None) -> dict:
    """IoU of one prompt (text, or content token ids) on every image of each category.

    prompt_mode: "meta" | "hf" | None (the model's default); evaluate an alias in the mode it was searched in.
    adapters: adapter directories (or folders of them) applied to the model (recorded in the result).

    Returns {"prompt", "ids", "adapters", "categories": {name: {"images": [{"image_id", "negative", "iou"}], "mean_iou",
    "negatives_empty"}}, "mean_iou"} (mean over categories of the per-category mean over positives).
    """
    from ..data import load_coco
    from ..tokenizer import detokenize

    ids = _prompt_ids(prompt, tokens)
    if negatives < 0:
        raise ValueError(f"negatives must be >= 0, got {negatives}")
    _check_chunk_size(chunk_size)
    adapters = adapter_paths(adapters)
    if model is None:
        model, _ = load_model(weights_spec(str(weights)), dtype, prompt_mode, adapters)
    elif adapters:
        from ..adapt import apply_adapters, load_adapters

        model = apply_adapters(model, load_adapters(adapters))
    model = model.with_prompt_mode(prompt_mode)
    settings = RunSettings(weights=str(weights), annotations=str(annotations), images=str(images),
                           negatives=negatives, threshold=threshold)
    log = lambda msg: None  # noqa: E731 - nothing to log to outside a run directory
    cats = {}
    for cd in load_coco(annotations, images, list(categories) if categories else None, max_images):
        split = load_split(cd.subset(range(len(cd.images)), range(min(negatives, len(cd.negatives)))))
        engine = make_engine(model, split, settings, chunk_size, prefix_cache=False)
        iou = score_one(engine, ids, log, f"scoring {cd.name}")
        cats[cd.name] = {
            "images": [{"image_id": i, "negative": bool(n), "iou": float(v)}
                       for i, n, v in zip(split.image_ids, split.is_negative, iou)],
            "mean_iou": mean(iou[~split.is_negative]),
            "negatives_empty": mean(iou[split.is_negative] == 1.0) if split.is_negative.any() else None,
        }
        del engine
    return clean({"prompt": prompt if prompt is not None else detokenize(ids), "ids": ids,
                  "prompt_mode": model.prompt_mode, "adapters": adapters, "categories": cats,
                  "mean_iou": mean([c["mean_iou"] for c in cats.values() if c["mean_iou"] is not None])})
