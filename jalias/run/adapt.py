"""`jalias adapt RUN_DIR`: one adapter per finished category of a search run (the Python `jalias.adapt(...)`).

For each category (with an alias, for the alias teacher) the images the run recorded are rebuilt; the adapter is
trained on the search images (teacher targets from RUN_DIR/export/<slug>.npz when an export of the same alias,
prompt mode and threshold exists, else computed in memory by `teacher_outputs`: the same values up to float
rounding, as tests/test_adapt.py checks; a lora that reads the detector states, which the export does not hold,
computes all its targets in memory) and then measured with the engine's exact IoU. The prediction rule's
threshold, for the teacher's masks and every IoU, is the run's keep threshold (run.json `threshold`, the
prediction rule's 0.5; AdaptConfig.threshold is set from it):

    OUT/<slug>/            the adapter (jalias.adapt.store layout); its card's metrics hold label_before /
                           label_after on search and held-out images, alias_heldout, and the losses
    OUT/summary.json       {"run_dir", "kind", "teacher", "config", "categories": [{"category", "label",
                           "alias_text", "label_before", "label_after", "alias", "..._search", "loss_first",
                           "loss_last", "adapter"}]} (held-out IoUs; None where the run has no held-out images)
    OUT/.state/<slug>/     resumable training state (removed once the adapter is written)

OUT defaults to RUN_DIR/adapters/<kind>-<teacher>. `resume=True` keeps finished adapters and continues an
interrupted one from its state; the result equals an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..adapt import AdaptConfig, AdaptError, apply_adapters, load_adapter, model_fingerprint, save_adapter
from ..adapt.loss import alias_targets, gt_targets, image_contexts, teacher_outputs
from ..adapt.store import CARD, read_card
from ..adapt.trainer import train_adapter
from ..atomic import check_out_folder
from .io import mean, write_json_atomic
from .model import load_model
from .rundir import RunDir
from .splits import rebuild_inputs


def _engine(model, images, gts, neg, threshold: float):
    from ..engine import Engine

    return Engine(model, images, gts, negative=neg, prefix_cache=False, threshold=threshold)


def label_iou(model, images, gts, neg, ids, threshold: float = 0.5) -> float | None:
    """Mean exact IoU of content ids over the positive images (None without positives), queries kept at
    `threshold`."""
    if not len(images) or all(neg):
        return None
    iou = _engine(model, images, gts, neg, threshold).score(np.asarray(ids, np.int32)[None])[0]
    return mean(iou[~np.asarray(neg, bool)])


def _export_outputs(run: RunDir, res: dict, prompt_mode: str, search: np.ndarray,
                    threshold: float) -> dict | None:
    """The alias's teacher outputs on the search images from RUN_DIR/export, if it matches the run's alias,
    prompt mode and threshold."""
    index = run.path / "export" / "index.json"
    if not index.exists():
        return None
    try:
        doc = json.loads(index.read_text())
        entry = next(e for e in doc["categories"] if e["category"] == res["category"])
        if (doc.get("prompt_mode") != prompt_mode or doc.get("threshold") != threshold
                or list(entry["alias_ids"]) != list(res["alias_ids"])):
            return None
        with np.load(run.path / "export" / entry["file"]) as z:
            if len(z["split"]) != len(search):
                return None
            out = {k: np.asarray(z[k])[search] for k in ("pred_logits", "presence_logits", "union_logits")}
            out.update({k: np.asarray(z[k]) for k in ("prompt_features", "attention_mask") if k in z.files})
            return out
    except (OSError, KeyError, StopIteration, ValueError):
        return None


def adapt_run(run_dir: str | os.PathLike, kind: str = "embed", teacher: str = "alias", steps: int | None = None,
              lr: float | None = None, out: str | os.PathLike | None = None, resume: bool = False,
              categories: Sequence[str] | None = None, config: AdaptConfig | None = None, progress: bool = True,
              log: Callable[[str], None] | None = None, model=None, overwrite: bool = False) -> dict:
    """Train one adapter per finished category of `run_dir` (see the module docstring); returns summary.json.

    config: the full recipe (kind, teacher, steps, lr override its fields); categories: names (None: every
    finished one; with the alias teacher, categories where no alias beat the label are skipped with a note, and
    an AdaptError names one if asked for explicitly); model: the run's model already loaded. A finished adapter
    of a chosen category already in `out` is an AdaptError before anything trains, unless resume (kept; it must
    have this recipe and model) or overwrite (retrained). summary.json keeps the rows of the categories not
    chosen this time when it was written with the same recipe.
    """
    log = log or (lambda msg: None)
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").exists():
        raise AdaptError(f"{run_dir} is not a run directory (no run.json)")
    run = RunDir(run_dir)
    settings = run.read_settings()
    if settings.adapters:
        raise AdaptError(f"{run_dir} was searched with adapters ({settings.adapters[0]}, ...): adapt a run "
                         "searched on the plain model")
    finished = run.finished_results()
    if not finished:
        raise AdaptError(f"{run_dir} has no finished category to adapt (run `jalias search` first)")
    cfg = replace(config or AdaptConfig(), kind=kind, teacher=teacher, threshold=float(settings.threshold))
    if steps is not None:
        cfg = replace(cfg, steps=int(steps))
    if lr is not None:
        cfg = replace(cfg, **{"lr" if cfg.kind == "embed" else "lr_lora": float(lr)})
    cfg.validate()
    chosen = _choose(finished, categories, cfg.teacher, log)
    out = Path(out) if out is not None else run_dir / "adapters" / f"{cfg.kind}-{cfg.teacher}"
    check_out_folder(out)
    done = [r for r in chosen if (out / r["slug"] / CARD).exists()]
    if done and not (resume or overwrite):
        raise AdaptError(f"{out} already holds finished adapters ({', '.join(r['category'] for r in done[:3])}"
                         f"{', ...' if len(done) > 3 else ''}): pass --resume to keep them or --overwrite to "
                         "retrain them")
    if model is None:
        model, _ = load_model(settings.weights, settings.dtype, settings.prompt_mode)
    model = model.with_prompt_mode(settings.prompt_mode)
    fp = model_fingerprint(model)
    for r in done if resume and not overwrite else ():
        card = read_card(out / r["slug"])
        if card.get("model_fingerprint") != fp or card.get("metrics", {}).get("config") != cfg.to_dict():
            raise AdaptError(f"cannot resume {out}: the adapter of {r['category']!r} was trained with other "
                             "settings or another model; pass --overwrite to retrain it, or another --out")
    m = 4 * model.config.vision.backbone.grid
    rows = []
    for res in chosen:
        dst = out / res["slug"]
        if resume and not overwrite and (dst / CARD).exists():  # checked above: this recipe, this model
            log(f"{res['category']}: adapter finished earlier, kept")
            rows.append(_row(res, load_adapter(dst), dst))
            continue
        inputs = rebuild_inputs(settings, res)
        split = np.asarray(inputs["split"])
        neg = np.asarray(inputs["is_negative"], bool)
        s, h = split == "search", split == "heldout"
        pick = lambda key, sel: [x for x, keep in zip(inputs[key], sel) if keep]  # noqa: E731
        ctx = image_contexts(model, pick("images", s))
        if cfg.teacher == "alias":
            # the export holds no detector states, so a lora that reads them computes the whole teacher here
            states = cfg.kind == "lora" and cfg.w_states > 0
            outputs = None if states else _export_outputs(run, res, model.prompt_mode, s, cfg.threshold)
            if outputs is None:
                outputs = teacher_outputs(model, res["alias_ids"], ctx, cfg.threshold, states=states)
            targets = alias_targets(ctx, outputs, cfg)
        else:
            targets = gt_targets(ctx, pick("gts", s), neg[s], model.config.decoder.num_queries, m, cfg)
        adapter = train_adapter(model, res["label_ids"], targets, cfg, label=res["label"],
                                category=res["category"], state_dir=out / ".state" / res["slug"], resume=resume,
                                progress=progress, log=log, alias_length=len(res.get("alias_ids") or ()) or None)
        adapted = apply_adapters(model, [adapter])
        ids = res["label_ids"]
        metrics = {"config": cfg.to_dict(), **adapter.metrics}
        for name, sel in (("search", s), ("heldout", h)):
            args = (pick("images", sel), pick("gts", sel), neg[sel])
            metrics[f"label_before_{name}"] = label_iou(model, *args, ids, cfg.threshold)
            metrics[f"label_after_{name}"] = label_iou(adapted, *args, ids, cfg.threshold)
        metrics["alias_search"], metrics["alias_heldout"] = res["alias_iou_search"], res["alias_iou_heldout"]
        adapter.metrics = metrics
        save_adapter(dst, adapter, cfg.to_dict())
        shutil.rmtree(out / ".state" / res["slug"], ignore_errors=True)
        log(f"{res['category']}: label IoU held-out {_f(metrics['label_before_heldout'])} -> "
            f"{_f(metrics['label_after_heldout'])} (alias {_f(metrics['alias_heldout'])}), loss "
            f"{metrics['loss_first']:.4f} -> {metrics['loss_last']:.4f}; adapter {dst}")
        rows.append(_row(res, adapter, dst))
    rows = _merge_rows(out / "summary.json", rows, cfg, log)
    summary = {"run_dir": str(run_dir.resolve()), "kind": cfg.kind, "teacher": cfg.teacher,
               "config": cfg.to_dict(), "categories": rows}
    write_json_atomic(out / "summary.json", summary)
    return summary


def _merge_rows(path: Path, rows: list[dict], cfg: AdaptConfig, log) -> list[dict]:
    """This call's rows after the rows of an earlier summary.json at `path` for other categories, when it was
    written with the same recipe (their adapters are still in the folder); a note names them otherwise."""
    if not path.exists():
        return rows
    try:
        before = json.loads(path.read_text())
        old = [r for r in before["categories"] if r["category"] not in {x["category"] for x in rows}]
    except (OSError, ValueError, KeyError, TypeError):
        return rows
    if old and before.get("config") != cfg.to_dict():
        log(f"note: summary.json lists this call's categories; the adapters of {', '.join(r['category'] for r in old)}"
            " in the folder were trained with other settings")
        return rows
    return old + rows


def _choose(finished: list[dict], categories: Sequence[str] | None, teacher: str, log) -> list[dict]:
    by_name = {r["category"]: r for r in finished}
    if categories:
        missing = [c for c in categories if c not in by_name]
        if missing:
            raise AdaptError(f"category {missing[0]!r} is not a finished category of the run (finished: "
                             f"{', '.join(by_name)})")
        chosen = [by_name[c] for c in categories]
        if teacher == "alias":
            bad = [r for r in chosen if not r.get("alias_beat_label", True)]
            if bad:
                raise AdaptError(f"category {bad[0]['category']!r} has no alias (no alias beat the label): "
                                 f"nothing to distil; use --teacher gt or search again")
            _warn_heldout(chosen, log)
        return chosen
    if teacher != "alias":
        return list(finished)
    chosen = [r for r in finished if r.get("alias_beat_label", True)]
    for r in finished:
        if r not in chosen:
            log(f"{r['category']}: no alias beat the label, skipped (nothing to distil)")
    if not chosen:
        raise AdaptError("no category of the run has an alias (no alias beat the label anywhere): nothing to "
                         "distil; use --teacher gt or search again")
    _warn_heldout(chosen, log)
    return chosen


def _warn_heldout(chosen: list[dict], log) -> None:
    """A warning per category whose alias beat the label on the search images but not on the held-out ones:
    distilling it lowered the label's held-out IoU wherever that was measured (benchmarks/RESULTS.md)."""
    for r in chosen:
        label, alias = r.get("label_iou_heldout"), r.get("alias_iou_heldout")
        if label is not None and alias is not None and alias <= label:
            log(f"warning: {r['category']}: the alias does not beat the label on held-out images (alias "
                f"{alias:.3f}, label {label:.3f}); the adapter may lower the label's held-out IoU")


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _row(res: dict, adapter, dst: Path) -> dict:
    m = adapter.metrics
    return {"category": res["category"], "label": res["label"], "alias_text": res["alias_text"],
            "label_before": m.get("label_before_heldout"), "label_after": m.get("label_after_heldout"),
            "alias": m.get("alias_heldout"), "label_before_search": m.get("label_before_search"),
            "label_after_search": m.get("label_after_search"), "alias_search": m.get("alias_search"),
            "loss_first": m.get("loss_first"), "loss_last": m.get("loss_last"), "adapter": str(dst)}
