"""Runs: per-category alias searches over a COCO-format dataset, resumable, with results on disk.

Python API (the `jalias` command is a thin wrapper around these):

    demo(out="runs/demo", ...)                      tiny embedded model + generated dataset, end to end
    search_dataset(weights, annotations, images, ...)   label baseline + search + held-out evaluation per category
    evaluate_prompt(weights, annotations, images, prompt=... | tokens=...)   IoU of one prompt per image
    export_run(run_dir, out=None)                   teacher targets of a finished run (see jalias.export)

Per category: ground truth = union of the category's instances per image (jalias.data.load_coco); the positives
(and up to `negatives` images without the category, GT empty) are split into search / held-out images; the
natural label is scored, the search runs on the search images only, and label and alias are then scored on the
held-out images.

Run directory (runs/<name>/):

    run.json            settings (weights, dataset paths, method, budget, seeds, ...) and the category list
    log.txt             timestamped log
    state/<slug>.json   resumable search state of a category: rewritten atomically (temp file + os.replace) at
                        most every `checkpoint_every` seconds, on Ctrl-C / SIGTERM, and at the category's end
    <slug>.json         result of a finished category: label / alias ids and text, label_iou_{search,heldout},
                        alias_iou_{search,heldout} (means over positive images), per-image IoUs, the image ids of
                        each split, evals, seconds, method config, best candidates, search history
    all_results.json    summary of every finished category (written after each one)
    overlays/<slug>.png image | ground truth | label's mask | alias's mask, a row per image
    curves.png, report.json, report.html    (jalias.report)
    data/               demo only: the generated synthetic COCO dataset

Resume (`resume=True`, same settings): finished categories are skipped; an unfinished one continues from its
state file exactly (the search's own resume contract), so the result equals an uninterrupted run's.
Errors raise with one-line messages (ValueError / FileNotFoundError / WeightError / RunError); categories
finished before the error stay on disk.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

RESULTS_FORMAT = "jalias.results"
RUN_FORMAT = "jalias.run"
FORMAT_VERSION = 1
TINY_SEED = 0  # weights/make_tiny.py: the embedded tiny checkpoint is random_params(tiny_config(), 0, 2.0)
TINY_PRESENCE_BIAS = 2.0

DEMO_CONCEPTS = ("striped_blob", "checkered_star", "dotted_ring")
# Small per-step batches so that a demo budget buys several steps of every method.
DEMO_OPTIONS = {"gcg": {"search_width": 64, "topk": 64}, "local": {"n_candidates": 64},
                "evolution": {"population": 16}, "soft": {}}

# Test/debug hook: raise SimulatedKill after this many search checkpoints (nothing is flushed, as with kill -9).
KILL_ENV = "JALIAS_SIMULATE_KILL_AFTER"


class RunError(RuntimeError):
    """A run cannot go on (e.g. out of device memory at the smallest chunk size); the message is one line."""


class SimulatedKill(Exception):
    """Raised by the KILL_ENV hook: the process 'dies' without saving anything more."""


# ---------------------------------------------------------------------------------------------------------------
# small utilities

def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> None:
    """Write JSON to a temp file beside `path`, fsync, then os.replace: readers see the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str | os.PathLike, what: str) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"corrupt {what} {path}: {e}") from None


def _clean(x: Any) -> Any:
    """JSON-safe copy: numpy scalars/arrays to Python, NaN/inf to None."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    if isinstance(x, (np.bool_,)):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else None
    return x


def _mean(xs: Sequence[float]) -> float | None:
    return float(np.mean(xs)) if len(xs) else None


def slugify(name: str, taken: set[str]) -> str:
    """File-name-safe, unique slug of a category name."""
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "category"
    slug, i = base, 2
    while slug.lower() in taken or slug in ("all_results", "report", "run", "log"):
        slug, i = f"{base}_{i}", i + 1
    taken.add(slug.lower())
    return slug


def is_oom(e: BaseException) -> bool:
    """XLA RESOURCE_EXHAUSTED (device out of memory) or host MemoryError."""
    text = f"{type(e).__name__}: {e}"
    return isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in text or "Out of memory" in text


class RunLog:
    """Append-only timestamped log file (also the place errors are recorded)."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, msg: str) -> None:
        stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{stamp} {msg}\n")


# ---------------------------------------------------------------------------------------------------------------
# model

def embedded_tiny_path() -> Path:
    """<repo>/weights/tiny: the committed tiny checkpoint (absent from non-editable installs)."""
    return Path(__file__).resolve().parent.parent / "weights" / "tiny"


def tiny_model():
    """The embedded tiny model built in memory: same params as weights/tiny (bf16-rounded), float32 compute."""
    import ml_dtypes

    from .model import Sam3, tiny_config
    from .model.init import random_params

    cfg = tiny_config()
    params = random_params(cfg, seed=TINY_SEED, presence_bias=TINY_PRESENCE_BIAS)
    # weights/tiny stores bfloat16; round the same way so both paths give identical models
    params = _tree_map(lambda a: a.astype(ml_dtypes.bfloat16).astype(np.float32), params)
    return Sam3(cfg, params, dtype="float32")


def _tree_map(fn: Callable, tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _tree_map(fn, v) for k, v in tree.items()}
    return fn(tree)


def load_model(weights: str, dtype: str | None = "float32"):
    """-> (Sam3, note). `weights`: a checkpoint path (Orbax dir, HF dir, .safetensors, .bin, Meta .pt), a name
    under weights/ or $JALIAS_WEIGHTS, or "tiny" (embedded checkpoint, built in memory if it is absent).
    note: a one-line remark for the user, or "" (e.g. that the tiny model was built in memory)."""
    from .weights.convert import load, resolve

    if str(weights) == "tiny":
        try:
            path = resolve("tiny")
        except FileNotFoundError:
            path = None
        if path is None:
            if dtype not in (None, "float32"):
                raise ValueError("the in-memory tiny model computes in float32 only")
            return tiny_model(), ("weights/tiny not found (non-editable install): built the same tiny random "
                                  "model in memory")
        return load(path, dtype=dtype), ""
    return load(weights, dtype=dtype), ""


def weights_spec(weights: str) -> str:
    """What run.json records for `weights`: an absolute path when it names one, else the name ("tiny")."""
    from .weights.convert import resolve

    try:
        return str(resolve(weights).resolve())
    except FileNotFoundError:
        if str(weights) == "tiny":
            return "tiny"
        raise


# ---------------------------------------------------------------------------------------------------------------
# settings and run directory

@dataclass
class RunSettings:
    """Everything that determines a run's results (compared on resume). Paths are absolute."""

    weights: str
    annotations: str
    images: str
    categories: list[str] | None = None  # None: every category with masks
    method: str = "gcg"
    budget: int = 10_000
    length: int = 4
    max_images: int | None = 10
    heldout: float = 0.3
    negatives: int = 0
    seed: int = 0
    init: str = "random"
    negative_weight: float = 0.5
    dtype: str = "float32"
    options: dict = field(default_factory=dict)  # method-specific config fields, e.g. {"search_width": 64}
    threshold: float = 0.5

    def validate(self) -> None:
        from .search import METHODS

        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.budget < 1:
            raise ValueError(f"budget must be >= 1 evaluation, got {self.budget}")
        if not 1 <= self.length <= 30:
            raise ValueError(f"length must be in 1..30 tokens, got {self.length}")
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"max-images must be >= 1, got {self.max_images}")
        if not 0.0 <= self.heldout < 1.0:
            raise ValueError(f"heldout must be a fraction in [0, 1), got {self.heldout}")
        if self.negatives < 0:
            raise ValueError(f"negatives must be >= 0, got {self.negatives}")
        if self.init not in ("random", "label"):
            raise ValueError(f"init must be 'random' or 'label', got {self.init!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        cls = METHODS[self.method].config_cls
        # fields set from the settings themselves cannot be overridden through options
        fixed = {"length", "budget", "seed", "negative_weight", "init", "label_ids"}
        own = sorted({f.name for f in dataclasses.fields(cls)} - fixed)
        for key in self.options:
            if key not in own:
                raise ValueError(f"unknown option {key!r} for method {self.method}; valid: {', '.join(own) or 'none'}")

    def search_config(self, label_ids: Sequence[int]):
        """The method's config object for one category."""
        from .search import METHODS

        cls = METHODS[self.method].config_cls
        return cls(length=self.length, budget=self.budget, seed=self.seed, negative_weight=self.negative_weight,
                   init=self.init, label_ids=list(label_ids) if self.init == "label" else None, **self.options)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunSettings":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class RunDir:
    """A run directory (layout in the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.log = RunLog(self.path / "log.txt")

    # files
    @property
    def run_json(self) -> Path:
        return self.path / "run.json"

    def result_path(self, slug: str) -> Path:
        return self.path / f"{slug}.json"

    def state_path(self, slug: str) -> Path:
        return self.path / "state" / f"{slug}.json"

    def read_run(self) -> dict:
        d = read_json(self.run_json, "run file")
        if not isinstance(d, dict) or d.get("format") != RUN_FORMAT:
            raise ValueError(f"{self.run_json} is not a jalias run file")
        return d

    def read_settings(self) -> RunSettings:
        return RunSettings.from_dict(self.read_run()["settings"])

    def prepare(self, settings: RunSettings, resume: bool, overwrite: bool) -> None:
        """Start a fresh run (writes run.json) or check that `settings` equal the recorded ones (resume)."""
        if self.run_json.exists() and not self.has_progress():
            self.clear()  # a run that stopped before finishing any search step (e.g. a bad argument): start over
        if self.run_json.exists():
            if resume:
                old = self.read_settings().to_dict()
                new = settings.to_dict()
                diff = [k for k in new if old.get(k) != new[k]]
                if diff:
                    k = diff[0]
                    raise ValueError(f"cannot resume {self.path}: it was started with {k}={old.get(k)!r}, now "
                                     f"{k}={new[k]!r} (resume needs the same settings)")
                self.log(f"resuming run (jalias {_version()})")
                return
            if not overwrite:
                raise FileExistsError(f"{self.path} already holds a run: pass --resume to continue it or "
                                      "--overwrite to start over")
            self.clear()
        elif self.path.exists() and not self.path.is_dir():
            raise FileExistsError(f"{self.path} exists and is not a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.run_json, {"format": RUN_FORMAT, "version": FORMAT_VERSION,
                                          "jalias_version": _version(), "created": _now(),
                                          "settings": settings.to_dict(), "categories": None})
        self.log(f"new run (jalias {_version()}): {json.dumps(settings.to_dict())}")

    def clear(self) -> None:
        """Delete a previous run's outputs: only the files a run writes (data/ of the demo is kept)."""
        slugs = []
        if self.run_json.exists():
            try:
                slugs = [c["slug"] for c in self.categories()]
            except (ValueError, KeyError, TypeError):
                slugs = []
        names = {"run.json", "all_results.json", "report.json", "report.html", "log.txt", "curves.png",
                 *(f"{s}.json" for s in slugs)}
        for name in names:
            (self.path / name).unlink(missing_ok=True)
        for sub in ("state", "overlays"):
            shutil.rmtree(self.path / sub, ignore_errors=True)

    def has_progress(self) -> bool:
        """Whether any search state or category result exists (something a restart would throw away)."""
        state = self.path / "state"
        return (state.is_dir() and any(state.glob("*.json"))) or bool(self.finished_results())

    def set_categories(self, cats: list[dict]) -> None:
        """Record the resolved [{"name", "slug"}] list; on resume it must be the same."""
        run = self.read_run()
        if run.get("categories") not in (None, cats):
            old = [c["name"] for c in run["categories"]]
            raise ValueError(f"cannot resume {self.path}: the dataset now gives categories "
                             f"{[c['name'] for c in cats]}, the run had {old}")
        run["categories"] = cats
        write_json_atomic(self.run_json, run)

    def categories(self) -> list[dict]:
        return self.read_run().get("categories") or []

    def finished(self, slug: str) -> dict | None:
        p = self.result_path(slug)
        if not p.exists():
            return None
        res = read_json(p, "category result")
        return res if res.get("status") == "done" else None

    def finished_results(self) -> list[dict]:
        return [r for r in (self.finished(c["slug"]) for c in self.categories()) if r is not None]

    def write_summary(self, settings: RunSettings) -> dict:
        """all_results.json from the finished categories' files; returns it."""
        rows = {}
        results = self.finished_results()
        for r in results:
            rows[r["category"]] = {k: r[k] for k in SUMMARY_KEYS}
        summary = {
            "format": RESULTS_FORMAT, "version": FORMAT_VERSION, "run_dir": str(self.path.resolve()),
            "settings": settings.to_dict(),
            "finished": len(results), "total": len(self.categories()),
            "categories": rows,
            "mean": {k: _mean([r[k] for r in results if r[k] is not None])
                     for k in ("label_iou_search", "label_iou_heldout", "alias_iou_search", "alias_iou_heldout")},
        }
        summary = _clean(summary)
        write_json_atomic(self.path / "all_results.json", summary)
        return summary


SUMMARY_KEYS = ("category", "slug", "label", "label_ids", "label_iou_search", "label_iou_heldout", "alias_ids",
                "alias_text", "alias_iou_search", "alias_iou_heldout", "evals", "seconds", "method",
                "n_search", "n_heldout")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("jalias")
    except Exception:  # noqa: BLE001 - running from a checkout without an install
        return "unknown"


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------------------------
# data for one category

@dataclass
class Split:
    """Images of one split, loaded: images uint8[H, W, 3], gts bool[H, W] (empty for negatives)."""

    images: list[np.ndarray]
    gts: list[np.ndarray]
    image_ids: list[str]
    is_negative: np.ndarray  # bool[K]

    def __len__(self) -> int:
        return len(self.images)

    @property
    def n_positive(self) -> int:
        return int((~self.is_negative).sum())


def _load_split(cd) -> Split:
    """ConceptData -> Split: positives then negatives (decodes every image now; a corrupt file raises here)."""
    images, gts = [], []
    for i in range(len(cd.images)):
        images.append(cd.image(i))
        gts.append(np.asarray(cd.masks[i], bool))
    for j in range(len(cd.negatives)):
        img = cd.negative_image(j)
        images.append(img)
        gts.append(np.zeros(img.shape[:2], bool))
    flags = np.array([False] * len(cd.images) + [True] * len(cd.negatives), bool)
    return Split(images, gts, list(cd.image_ids) + list(cd.negative_ids), flags)


def split_category(cd, settings: RunSettings):
    """ConceptData (max_images already applied) -> (search ConceptData, held-out ConceptData or None)."""
    from .data import split_concept

    n_neg = min(settings.negatives, len(cd.negatives))
    sub = cd.subset(range(len(cd.images)), range(n_neg))
    if settings.heldout <= 0 or len(sub.images) < 2:
        return sub, None
    search, held = split_concept(sub, settings.heldout, settings.seed)
    return search, (held if len(held.images) + len(held.negatives) else None)


def label_ids_of(label: str, name: str, max_length: int = 30) -> list[int]:
    from .tokenizer import encode

    ids = encode(label)[:max_length]
    if not ids:
        raise ValueError(f"category {name!r}: its label {label!r} has no tokens")
    return ids


def rebuild_inputs(settings: RunSettings, res: dict) -> dict:
    """A finished category's images in export order (search positives, search negatives, held-out positives,
    held-out negatives) -> {"images", "gts", "image_ids", "split", "is_negative"} (rebuilt from the dataset)."""
    from .data import load_coco

    (cd,) = load_coco(settings.annotations, settings.images, categories=[res["category"]])
    pos = {iid: i for i, iid in enumerate(cd.image_ids)}
    neg = {iid: j for j, iid in enumerate(cd.negative_ids)}
    out: dict[str, list] = {"images": [], "gts": [], "image_ids": [], "split": [], "is_negative": []}
    ids = res["images"]
    for split in ("search", "heldout"):
        for iid in ids[split]:
            if iid not in pos:
                raise ValueError(f"image {iid} of category {res['category']!r} is no longer annotated in "
                                 f"{settings.annotations}")
            i = pos[iid]
            out["images"].append(cd.image(i))
            out["gts"].append(np.asarray(cd.masks[i], bool))
        for iid in ids[f"{split}_negatives"]:
            if iid not in neg:
                raise ValueError(f"negative image {iid} of category {res['category']!r} now has the category "
                                 f"(or is gone) in {settings.annotations}")
            img = cd.negative_image(neg[iid])
            out["images"].append(img)
            out["gts"].append(np.zeros(img.shape[:2], bool))
        n = len(ids[split]) + len(ids[f"{split}_negatives"])
        out["image_ids"] += ids[split] + ids[f"{split}_negatives"]
        out["split"] += [split] * n
        out["is_negative"] += [False] * len(ids[split]) + [True] * len(ids[f"{split}_negatives"])
    return out


# ---------------------------------------------------------------------------------------------------------------
# engine helpers: out-of-memory retry

def with_oom_retry(engine, fn: Callable[[], Any], log: Callable[[str], None], what: str) -> Any:
    """Call fn(); on XLA RESOURCE_EXHAUSTED halve engine.chunk_size and call again, down to one candidate per
    device, then raise RunError. fn must be safe to repeat (searches resume from their last checkpoint)."""
    floor = max(1, len(getattr(engine, "devices", [None])))
    while True:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - only out-of-memory is handled, the rest re-raised
            if not is_oom(e):
                raise
            if engine.chunk_size <= floor:
                raise RunError(f"out of device memory while {what}, even with chunk size {engine.chunk_size}: "
                               "use fewer --max-images or a smaller model") from None
            new = max(floor, engine.chunk_size // 2)
            log(f"out of memory while {what} at chunk size {engine.chunk_size}; retrying with {new}")
            engine.chunk_size = new
            gc.collect()


def make_engine(model, split: Split, settings: RunSettings, chunk_size: int | None, prefix_cache: bool = True):
    from .engine import Engine

    try:
        return Engine(model, split.images, split.gts, negative=split.is_negative, chunk_size=chunk_size,
                      prefix_cache=prefix_cache, threshold=settings.threshold,
                      negative_weight=settings.negative_weight)
    except Exception as e:  # noqa: BLE001
        if is_oom(e):
            raise RunError(f"out of device memory while encoding {len(split)} images: use fewer --max-images "
                           "or a smaller model") from None
        raise


# ---------------------------------------------------------------------------------------------------------------
# one category

class _Checkpointer:
    """on_checkpoint hook: keeps the newest search state, writes it atomically at most every `every` seconds
    (and on flush()), drives the progress display, and implements the KILL_ENV test hook."""

    def __init__(self, path: Path, category: str, initial: dict | None, every: float,
                 on_state: Callable[[dict], None], kill: "_KillSwitch"):
        self.path, self.category, self.latest = path, category, initial
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
            write_json_atomic(self.path, {"category": self.category, "state": self.latest}, indent=None)
            self.last_write = time.monotonic()
            self.dirty = False


class _KillSwitch:
    def __init__(self):
        v = os.environ.get(KILL_ENV)
        self.left = int(v) if v else None

    def tick(self) -> None:
        if self.left is not None:
            self.left -= 1
            if self.left <= 0:
                raise SimulatedKill(f"simulated kill ({KILL_ENV})")


def _score_one(engine, ids: Sequence[int], log, what: str) -> np.ndarray:
    """float32[K] IoU of one content-id sequence on every engine image."""
    ids = np.asarray(ids, np.int32)[None]
    return np.asarray(with_oom_retry(engine, lambda: engine.score(ids), log, what), np.float32)[0]


def _objective(iou: np.ndarray, neg: np.ndarray, w: float) -> float:
    from .search import objective

    return float(objective(iou[None], neg, w)[0])


def _split_stats(iou_label: np.ndarray, iou_alias: np.ndarray, split: Split) -> dict:
    pos, neg = ~split.is_negative, split.is_negative
    return {
        "label_iou": _mean(iou_label[pos]), "alias_iou": _mean(iou_alias[pos]),
        # on a negative image IoU is 1 exactly when the prediction is empty
        "label_negatives_empty": _mean(iou_label[neg] == 1.0) if neg.any() else None,
        "alias_negatives_empty": _mean(iou_alias[neg] == 1.0) if neg.any() else None,
    }


def _per_image(split: Split, iou_label, iou_alias) -> list[dict]:
    return [{"image_id": iid, "negative": bool(n), "label_iou": float(a), "alias_iou": float(b)}
            for iid, n, a, b in zip(split.image_ids, split.is_negative, iou_label, iou_alias)]


def _search_category(model, cd, slug: str, settings: RunSettings, run: RunDir, resume: bool,
                     chunk_size: int | None, checkpoint_every: float, progress, kill: _KillSwitch,
                     overlay_rows: int, position: str = "") -> dict:
    """Label baseline, search, held-out evaluation and overlay of one category; writes <slug>.json."""
    from . import report
    from .export import predict
    from .search import run_search

    log = run.log
    t0 = time.perf_counter()
    search_cd, held_cd = split_category(cd, settings)
    if len(cd.negatives) < settings.negatives:
        log(f"{cd.name}: only {len(cd.negatives)} negative images available (asked for {settings.negatives})")
    search = _load_split(search_cd)
    held = _load_split(held_cd) if held_cd is not None else None
    label_ids = label_ids_of(cd.label, cd.name)
    log(f"{cd.name}: {search.n_positive}+{len(search) - search.n_positive} search images (positive+negative), "
        f"{held.n_positive if held else 0}+{len(held) - held.n_positive if held else 0} held-out; "
        f"label {cd.label!r} = {label_ids}")

    engine = make_engine(model, search, settings, chunk_size)
    label_search = _score_one(engine, label_ids, log, f"scoring the label of {cd.name}")

    # search (resumable)
    state_path = run.state_path(slug)
    initial = None
    if resume and state_path.exists():
        saved = read_json(state_path, "search state")
        initial = saved.get("state")
        if initial is not None:
            log(f"{cd.name}: resuming search at {initial['budget']['used']} evaluations "
                f"(iteration {initial['iteration']})")
    config = settings.search_config(label_ids)
    task = progress.start(f"{cd.name} ({position})", settings.budget, initial)
    ckpt = _Checkpointer(state_path, cd.name, initial, checkpoint_every, lambda s: progress.update(task, s), kill)
    try:
        result = with_oom_retry(
            engine, lambda: run_search(settings.method, engine, config, on_checkpoint=ckpt, resume_state=ckpt.latest),
            log, f"searching {cd.name}")
    except KeyboardInterrupt:
        ckpt.flush()
        log(f"{cd.name}: interrupted; search state saved to {state_path}")
        raise
    finally:
        progress.stop(task)
    ckpt.dirty = ckpt.latest is not None
    ckpt.flush()
    if not result.best:
        raise RunError(f"category {cd.name!r}: the budget ({settings.budget}) is too small to score even one "
                       f"candidate on {len(search)} images")
    best = result.best[0]
    alias_ids = [int(i) for i in best.ids]
    alias_search = _score_one(engine, alias_ids, log, f"scoring the alias of {cd.name}")
    engine_chunk = engine.chunk_size

    # held-out evaluation (no prefix cache: two single prompts, nothing to share)
    if held is not None:
        held_engine = make_engine(model, held, settings, chunk_size, prefix_cache=False)
        label_held = _score_one(held_engine, label_ids, log, f"scoring the label of {cd.name} (held-out)")
        alias_held = _score_one(held_engine, alias_ids, log, f"scoring the alias of {cd.name} (held-out)")
    else:
        held_engine, label_held, alias_held = None, np.zeros(0, np.float32), np.zeros(0, np.float32)

    # overlays: a few positives of each split and one negative, with the engine's prediction rule
    rows = []
    for split_name, split, eng, il, ia in (("search", search, engine, label_search, alias_search),
                                           ("heldout", held, held_engine, label_held, alias_held)):
        if split is None:
            continue
        picks = list(np.flatnonzero(~split.is_negative)[:overlay_rows // 2 or 1])
        picks += list(np.flatnonzero(split.is_negative)[:1])
        for i in picks:
            pred = predict(model, split.images[i], [label_ids, alias_ids], settings.threshold,
                           context=eng.contexts[i], mask_shape=split.gts[i].shape)
            rows.append(report.OverlayRow(split.images[i], split.gts[i], pred["masks"][0], pred["masks"][1],
                                          split.image_ids[i], split_name, bool(split.is_negative[i]),
                                          float(il[i]), float(ia[i])))
    overlay = f"overlays/{slug}.png"
    report.overlay_png(run.path / overlay, rows, cd.label, best.text)
    del engine, held_engine
    gc.collect()

    s = _split_stats(label_search, alias_search, search)
    h = _split_stats(label_held, alias_held, held) if held is not None else {}
    res = {
        "status": "done",
        "category": cd.name,
        "slug": slug,
        "label": cd.label,
        "label_ids": label_ids,
        "label_text": _detok(label_ids),
        "alias_ids": alias_ids,
        "alias_text": best.text,
        "label_iou_search": s["label_iou"],
        "label_iou_heldout": h.get("label_iou"),
        "alias_iou_search": s["alias_iou"],
        "alias_iou_heldout": h.get("alias_iou"),
        "negatives_empty": {"label_search": s["label_negatives_empty"], "alias_search": s["alias_negatives_empty"],
                            "label_heldout": h.get("label_negatives_empty"),
                            "alias_heldout": h.get("alias_negatives_empty")},
        "objective": {"label": _objective(label_search, search.is_negative, settings.negative_weight),
                      "alias": best.objective},
        "evals": result.evals_used,
        "budget": settings.budget,
        "seconds": result.wall_time_s,
        "category_seconds": time.perf_counter() - t0,
        "method": settings.method,
        "method_config": result.config,
        "stop_reason": result.stop_reason,
        "iterations": result.iterations,
        "chunk_size": engine_chunk,
        "n_search": search.n_positive,
        "n_heldout": held.n_positive if held else 0,
        "images": {
            "search": list(search_cd.image_ids), "search_negatives": list(search_cd.negative_ids),
            "heldout": list(held_cd.image_ids) if held_cd else [],
            "heldout_negatives": list(held_cd.negative_ids) if held_cd else [],
        },
        "per_image": {"search": _per_image(search, label_search, alias_search),
                      "heldout": _per_image(held, label_held, alias_held) if held is not None else []},
        "candidates": [dataclasses.asdict(c) for c in result.best],
        "history": [list(x) for x in result.history],
        "overlay": overlay,
    }
    res = _clean(res)
    write_json_atomic(run.result_path(slug), res)
    log(f"{cd.name}: done in {res['category_seconds']:.1f}s; label IoU {_fmt(res['label_iou_search'])} -> alias "
        f"{res['alias_text']!r} {_fmt(res['alias_iou_search'])} (search), held-out label "
        f"{_fmt(res['label_iou_heldout'])} alias {_fmt(res['alias_iou_heldout'])}; {res['evals']} evaluations")
    return res


def _detok(ids: Sequence[int]) -> str:
    from .tokenizer import detokenize

    return detokenize(list(ids))


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


# ---------------------------------------------------------------------------------------------------------------
# progress display

class Progress:
    """Rich progress bar per category: evaluations / budget, best search IoU, evaluations/s, ETA."""

    def __init__(self, enabled: bool = True, console=None):
        self.enabled = enabled
        self._bar = None
        self._console = console

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn
            from rich.progress import TimeRemainingColumn

            self._bar = RichProgress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("best IoU {task.fields[best]}"), TextColumn("{task.fields[rate]} evals/s"),
                TimeRemainingColumn(), console=self._console or Console(stderr=True), transient=False)
            self._bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)
        return False

    def start(self, name: str, budget: int, state: dict | None):
        if self._bar is None:
            return None
        used = state["budget"]["used"] if state else 0
        best = f"{state['budget']['top'][0][2]:.3f}" if state and state["budget"]["top"] else "-"
        task = self._bar.add_task(name, total=budget, completed=used, best=best, rate="-")
        self._t0, self._used0 = time.monotonic(), used
        return task

    def update(self, task, state: dict) -> None:
        if self._bar is None or task is None:
            return
        b = state["budget"]
        best = f"{b['top'][0][2]:.3f}" if b["top"] else "-"
        dt = time.monotonic() - self._t0
        rate = f"{(b['used'] - self._used0) / dt:.0f}" if dt > 0 else "-"
        self._bar.update(task, completed=b["used"], best=best, rate=rate)

    def stop(self, task) -> None:
        if self._bar is not None and task is not None:
            self._bar.stop_task(task)


# ---------------------------------------------------------------------------------------------------------------
# public API

def search_dataset(weights: str, annotations: str | os.PathLike, images: str | os.PathLike,
                   categories: Sequence[str] | None = None, method: str = "gcg", budget: int = 10_000,
                   length: int = 4, max_images: int | None = 10, heldout: float = 0.3, negatives: int = 0,
                   seed: int = 0, out: str | os.PathLike = "runs/search", resume: bool = False,
                   overwrite: bool = False, chunk_size: int | None = None, init: str = "random",
                   negative_weight: float = 0.5, dtype: str = "float32", options: dict | None = None,
                   checkpoint_every: float = 5.0, report: bool = True, progress: bool = True, console=None,
                   model=None, overlay_rows: int = 6) -> dict:
    """Search an alias for each category of a COCO dataset; returns the all_results.json dict.

    weights: checkpoint path or name (see `load_model`); categories: names (None: all with masks);
    budget: candidate-image evaluations per category; max_images: positives (and the negative pool) per
    category; heldout: fraction of images held out of the search; negatives: negative images per category;
    options: method config fields (e.g. {"search_width": 64}); checkpoint_every: seconds between state writes;
    model: an already loaded model for `weights` (skips loading). Results are written to `out`.
    """
    from .data import load_coco

    settings = RunSettings(
        weights=weights_spec(str(weights)), annotations=str(Path(annotations).resolve()),
        images=str(Path(images).resolve()), categories=list(categories) if categories else None, method=method,
        budget=int(budget), length=int(length), max_images=max_images, heldout=float(heldout),
        negatives=int(negatives), seed=int(seed), init=init, negative_weight=float(negative_weight), dtype=dtype,
        options=dict(options or {}))
    settings.validate()
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk-size must be >= 1, got {chunk_size}")
    run = RunDir(out)
    run.prepare(settings, resume, overwrite)
    log = run.log
    try:
        concepts = load_coco(settings.annotations, settings.images, settings.categories, settings.max_images)
        taken: set[str] = set()
        cats = [{"name": c.name, "slug": slugify(c.name, taken)} for c in concepts]
        run.set_categories(cats)
        if model is None:
            model, note = load_model(settings.weights, settings.dtype)
            if note:
                log(note)
        log(f"model: {model.num_params:,} params, image size {model.config.image_size}, {settings.dtype}")
        kill = _KillSwitch()
        with Progress(progress, console) as bar:
            for k, (cd, cat) in enumerate(zip(concepts, cats)):
                if resume and run.finished(cat["slug"]) is not None:
                    log(f"{cd.name}: finished earlier, skipped")
                    continue
                _search_category(model, cd, cat["slug"], settings, run, resume, chunk_size, checkpoint_every,
                                 bar, kill, overlay_rows, f"{k + 1}/{len(cats)}")
                run.write_summary(settings)
        summary = run.write_summary(settings)
        if report:
            from . import report as report_mod

            report_mod.write_report(run.path)
        log("run finished")
        return summary
    except SimulatedKill:
        raise
    except KeyboardInterrupt:
        log("interrupted")
        raise
    except Exception as e:
        log(f"error: {type(e).__name__}: {e}")
        if run.finished_results():
            run.write_summary(settings)
        raise


def demo(out: str | os.PathLike = "runs/demo", budget: int = 1000, method: str = "gcg",
         concepts: Sequence[str] = DEMO_CONCEPTS, images_per_concept: int = 6, image_size: int = 64,
         negatives: int = 2, heldout: float = 1 / 3, length: int = 4, init: str = "label", seed: int = 0,
         resume: bool = False, options: dict | None = None, chunk_size: int | None = None,
         checkpoint_every: float = 5.0, progress: bool = True, console=None,
         note: Callable[[str], None] | None = None) -> dict:
    """The whole pipeline on the embedded tiny model and a generated out-of-distribution dataset (no downloads).

    Writes the synthetic dataset (`images_per_concept` images of image_size^2 per concept) to `out`/data in COCO
    format and runs `search_dataset` on it: each search starts from the label (init="label") and proposes only
    ASCII word pieces, with the small per-step batches of DEMO_OPTIONS. A previous demo in `out` is replaced
    unless resume=True. note(msg) receives one-line remarks (e.g. that the tiny model was built in memory).
    """
    from .data import make_dataset, write_coco

    out = Path(out)
    if (out / "run.json").exists() and not resume:
        RunDir(out).clear()
    data_dir = out / "data"
    ann = data_dir / "annotations.json"
    if not (resume and ann.exists()):
        write_coco(make_dataset(images_per_concept, image_size, list(concepts), seed), data_dir)
    model, msg = load_model("tiny")
    if msg and note is not None:
        note(msg)
    opts = {**DEMO_OPTIONS.get(method, {}), "ascii_only": True, **(options or {})}
    return search_dataset("tiny", ann, data_dir / "images", categories=list(concepts), method=method, budget=budget,
                          length=length, max_images=images_per_concept, heldout=heldout, negatives=negatives,
                          seed=seed, out=out, resume=resume, overwrite=False, chunk_size=chunk_size, init=init,
                          options=opts, checkpoint_every=checkpoint_every, progress=progress, console=console,
                          model=model)


def evaluate_prompt(weights: str, annotations: str | os.PathLike, images: str | os.PathLike,
                    prompt: str | None = None, tokens: Sequence[int] | None = None,
                    categories: Sequence[str] | None = None, max_images: int | None = None, negatives: int = 0,
                    chunk_size: int | None = None, dtype: str = "float32", threshold: float = 0.5,
                    model=None) -> dict:
    """IoU of one prompt (text, or content token ids) on every image of each category.

    Returns {"prompt", "ids", "categories": {name: {"images": [{"image_id", "negative", "iou"}], "mean_iou",
    "negatives_empty"}}, "mean_iou"} (mean over categories of the per-category mean over positives).
    """
    from .data import load_coco
    from .tokenizer import START_ID, encode

    if (prompt is None) == (tokens is None):
        raise ValueError("give exactly one of a text prompt or token ids")
    if prompt is not None:
        ids = encode(prompt)[:30]
        if not ids:
            raise ValueError(f"prompt {prompt!r} has no tokens")
    else:
        ids = [int(t) for t in tokens]
        if not 1 <= len(ids) <= 30:
            raise ValueError(f"need 1..30 token ids, got {len(ids)}")
        bad = [t for t in ids if not 0 <= t < START_ID]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of range (content ids are 0..{START_ID - 1})")
    if model is None:
        model, _ = load_model(weights_spec(str(weights)), dtype)
    settings = RunSettings(weights=str(weights), annotations=str(annotations), images=str(images),
                           negatives=negatives, threshold=threshold)
    log = lambda msg: None  # noqa: E731 - nothing to log to outside a run directory
    cats = {}
    for cd in load_coco(annotations, images, list(categories) if categories else None, max_images):
        split = _load_split(cd.subset(range(len(cd.images)), range(min(negatives, len(cd.negatives)))))
        engine = make_engine(model, split, settings, chunk_size, prefix_cache=False)
        iou = _score_one(engine, ids, log, f"scoring {cd.name}")
        cats[cd.name] = {
            "images": [{"image_id": i, "negative": bool(n), "iou": float(v)}
                       for i, n, v in zip(split.image_ids, split.is_negative, iou)],
            "mean_iou": _mean(iou[~split.is_negative]),
            "negatives_empty": _mean(iou[split.is_negative] == 1.0) if split.is_negative.any() else None,
        }
        del engine
    return _clean({"prompt": prompt if prompt is not None else _detok(ids), "ids": ids, "categories": cats,
                   "mean_iou": _mean([c["mean_iou"] for c in cats.values() if c["mean_iou"] is not None])})


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, full_masks: bool = True,
               model=None) -> Path:
    """Teacher targets of a finished run (see jalias.export); returns the path of index.json."""
    from .export import export_run as _export

    return _export(run_dir, out, full_masks=full_masks, model=model)


def results_table(summary: dict, title: str | None = None):
    """rich Table of an all_results dict: concept, label, label IoU, alias, alias IoU, evals, seconds."""
    from rich.table import Table

    table = Table(title=title)
    right = {"justify": "right"}
    for col, kw in (("concept", {"no_wrap": True}), ("label", {}), ("label IoU\nsearch / held-out", right),
                    ("alias", {}), ("alias IoU\nsearch / held-out", right), ("evals", right), ("seconds", right)):
        table.add_column(col, **kw)
    for name, r in summary["categories"].items():
        table.add_row(name, r["label"], f"{_fmt(r['label_iou_search'])} / {_fmt(r['label_iou_heldout'])}",
                      repr(r["alias_text"]), f"{_fmt(r['alias_iou_search'])} / {_fmt(r['alias_iou_heldout'])}",
                      str(r["evals"]), f"{r['seconds']:.1f}")
    return table
