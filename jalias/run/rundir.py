"""A run's settings (`RunSettings`, compared on resume) and its directory on disk (`RunDir`, layout in
jalias/run/__init__.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..atomic import check_out_folder
from .io import RunLog, clean, mean, now, read_json, version, write_json_atomic

RESULTS_FORMAT = "jalias.results"
RUN_FORMAT = "jalias.run"
FORMAT_VERSION = 1
SUMMARY_KEYS = ("category", "slug", "label", "label_ids", "label_iou_search", "label_iou_heldout", "alias_ids",
                "alias_text", "alias_beat_label", "alias_iou_search", "alias_iou_heldout", "objective",
                "negatives_empty", "evals", "seconds", "category_seconds", "method", "n_search", "n_heldout")
IOU_KEYS = ("label_iou_search", "label_iou_heldout", "alias_iou_search", "alias_iou_heldout")


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
    # "meta" | "hf": which reference SAM3 scores follow (see jalias.model.sam3). None until the model is loaded
    # (then its default); run.json always records the mode used. Runs recorded before modes existed were "hf".
    prompt_mode: str | None = None
    # adapter directories (`jalias adapt`) applied to the model, absolute and in order; [] for the plain model
    adapters: list[str] = field(default_factory=list)
    skip_bad_images: bool = False  # unreadable images are left out (listed in run.json / the report), not an error

    def validate(self) -> None:
        from ..search import METHODS
        from ..search.base import check_field_types

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
        if not 0.0 <= self.negative_weight < float("inf"):  # also refuses nan
            raise ValueError(f"negative-weight must be a finite number >= 0, got {self.negative_weight}")
        if self.init not in ("random", "label"):
            raise ValueError(f"init must be 'random' or 'label', got {self.init!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.prompt_mode not in (None, "meta", "hf"):
            raise ValueError(f"prompt mode must be meta or hf, got {self.prompt_mode!r}")
        cls = METHODS[self.method].config_cls
        # fields set from the settings themselves cannot be overridden through options
        fixed = {"length", "budget", "seed", "negative_weight", "init", "label_ids"}
        own = sorted({f.name for f in dataclasses.fields(cls)} - fixed)
        for key in self.options:
            if key not in own:
                raise ValueError(f"unknown option {key!r} for method {self.method}; valid: {', '.join(own) or 'none'}")
        check_field_types(cls, self.options)

    def search_config(self, label_ids: Sequence[int]):
        """The method's config object for one category."""
        from ..search import METHODS
        from ..search.defaults import measured

        cls = METHODS[self.method].config_cls
        return cls.from_dict({**measured(self.method), **self.options, "length": self.length, "budget": self.budget,
                              "seed": self.seed, "negative_weight": self.negative_weight, "init": self.init,
                              "label_ids": list(label_ids) if self.init == "label" else None})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunSettings":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{"prompt_mode": "hf", **{k: v for k, v in d.items() if k in names}})


def slugify(name: str, taken: set[str]) -> str:
    """File-name-safe, unique slug of a category name (adds it to `taken`)."""
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "category"
    slug, i = base, 2
    while slug.lower() in taken or slug in ("all_results", "report", "run", "log"):
        slug, i = f"{base}_{i}", i + 1
    taken.add(slug.lower())
    return slug


class RunDir:
    """A run directory (layout in jalias/run/__init__.py)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.log = RunLog(self.path / "log.txt")

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

    def check(self, settings: RunSettings, resume: bool, overwrite: bool) -> None:
        """The errors `prepare` would raise, without touching anything: a run here that can be neither resumed
        with `settings` nor replaced, or a path that is not a directory."""
        if self.run_json.exists() and self.has_progress():
            if resume:
                old = self.read_settings().to_dict()
                new = settings.to_dict()
                diff = [k for k in new if old.get(k) != new[k]]
                if diff:
                    k = diff[0]
                    raise ValueError(f"cannot resume {self.path}: it was started with {k}={old.get(k)!r}, now "
                                     f"{k}={new[k]!r} (resume needs the same settings)")
            elif not overwrite:
                raise FileExistsError(f"{self.path} already holds a run: pass --resume to continue it or "
                                      "--overwrite to start over")
        else:
            check_out_folder(self.path)

    def prepare(self, settings: RunSettings, resume: bool, overwrite: bool) -> None:
        """Start a fresh run (writes run.json) or check that `settings` equal the recorded ones (resume). Callers
        check their inputs before this, since with overwrite it deletes the previous run's outputs."""
        self.check(settings, resume, overwrite)
        if self.run_json.exists() and not self.has_progress():
            self.clear()  # a run that stopped before finishing any search step (e.g. a bad argument): start over
        if self.run_json.exists():
            if resume:
                self.log(f"resuming run (jalias {version()})")
                return
            self.clear()
        self.path.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.run_json, {"format": RUN_FORMAT, "version": FORMAT_VERSION,
                                          "jalias_version": version(), "created": now(),
                                          "settings": settings.to_dict(), "categories": None})
        self.log(f"new run (jalias {version()}): {json.dumps(settings.to_dict())}")

    def record_settings(self, settings: RunSettings) -> None:
        """Rewrite run.json's settings (e.g. once the prompt mode is resolved from the loaded model)."""
        doc = self.read_run()
        doc["settings"] = settings.to_dict()
        write_json_atomic(self.run_json, doc)

    def clear(self) -> None:
        """Delete a previous run's outputs: only the files a run writes (data/ of the demo is kept)."""
        slugs = []
        if self.run_json.exists():
            try:
                slugs = [c["slug"] for c in self.categories()]
            except (ValueError, KeyError, TypeError):
                slugs = []
        names = {"run.json", "all_results.json", "report.json", "report.html", "log.txt", "curves.png", "summary.png",
                 *(f"{s}.json" for s in slugs)}
        for name in names:
            (self.path / name).unlink(missing_ok=True)
        for sub in ("state", "overlays", "curves"):
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

    def set_skipped_images(self, bad: dict[str, str]) -> None:
        """Record the images a --skip-bad-images run left out ({image id: reason})."""
        run = self.read_run()
        run["skipped_images"] = dict(bad)
        write_json_atomic(self.run_json, run)

    def skipped_images(self) -> dict[str, str]:
        return self.read_run().get("skipped_images") or {}

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
        results = self.finished_results()
        summary = {
            "format": RESULTS_FORMAT, "version": FORMAT_VERSION, "run_dir": str(self.path.resolve()),
            "settings": settings.to_dict(),
            "finished": len(results), "total": len(self.categories()), "skipped_images": self.skipped_images(),
            "categories": {r["category"]: {k: r.get(k) for k in SUMMARY_KEYS} for r in results},
            "mean": {k: mean([r[k] for r in results if r[k] is not None]) for k in IOU_KEYS},
        }
        summary = clean(summary)
        write_json_atomic(self.path / "all_results.json", summary)
        return summary
