"""Aliases as teachers: does an adapter distilled from the found alias beat one trained on the ground truth?

Per planted problem (`jalias.data.planted.make_planted(seed)`: a calibrated tiny SAM3, synthetic images of one
concept, ground truth = the masks of a hidden token sequence; until the trained small model lands, these are the
"categories"): the alias is the planted hidden sequence (`--alias hidden`, the --quick default: the alias a
perfect search finds) or one searched on the 8 search images (`--alias search`, the full default: gcg with the
measured settings and the problem's vocabulary). For each adapter kind train, at equal steps and with the
same optimiser, an alias-teacher and a gt-teacher adapter for the natural label on the search images. Measured on
the 8 held-out images with the engine's exact IoU:

* label_before / label_after_alias / label_after_gt: the label's IoU without / with each adapter;
* alias: the alias's own IoU;
* collateral: the mean IoU change, with the alias-teacher adapter applied, of every other concept's label
  (OTHER_LABELS: the other synthetic concepts' labels, labels sharing a token with one of them, and the training
  world's labels). A planted problem has no ground truth for them, so each label's reference is what the base
  model itself predicts with it on the held-out images (IoU 1 without the adapter, by construction): the change
  is how far the adapter moves other words' masks.
  (`collateral_gt`: the same for the gt-teacher adapter.)

Targets (the issue's): label_after_alias >= 0.9 x alias where an alias was found; collateral >= -0.02 (embed:
exactly 0); and the answer to "alias teacher vs gt teacher at equal steps".

    PYTHONPATH=. python benchmarks/adapt.py --quick --json benchmarks/out/adapt.json --out benchmarks/out
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from jalias.adapt import AdaptConfig, alias_targets, apply_adapters, gt_targets, image_contexts  # noqa: E402
from jalias.adapt import teacher_outputs, train_adapter  # noqa: E402
from jalias.data import iou  # noqa: E402
from jalias.data.planted import make_planted  # noqa: E402
from jalias.engine.predict import predict as predict_one  # noqa: E402
from jalias.engine import Engine  # noqa: E402
from jalias.search import METHODS, HalvingConfig, run_search  # noqa: E402
from jalias.search.defaults import MEASURED  # noqa: E402
from jalias.tokenizer import detokenize, encode  # noqa: E402

OTHER_LABELS = ("striped blob", "checkered star", "dotted ring", "zigzag crescent", "gridded hexagon",
                "speckled cross", "striped star", "blob", "red star", "blue triangle", "tomato", "heart")
PRESETS = {
    "quick": dict(problems=[10, 11], kinds=["embed", "lora"], steps=150, budget=2000, alias="hidden"),
    "full": dict(problems=[10, 11, 12, 13, 14, 15], kinds=["embed", "lora"], steps=300, budget=5000,
                 alias="search"),
}


def find_alias(prob, budget: int, seed: int = 0):
    settings = dict(MEASURED["gcg"])
    if "halving" in settings:
        settings["halving"] = HalvingConfig(**settings["halving"])
    cfg = METHODS["gcg"].config_cls(length=len(prob.hidden_ids), budget=budget, seed=seed,
                                    allowed_tokens=prob.allowed_vocab.tolist(), **settings)
    engine = Engine(prob.model, prob.search_images, prob.search_masks)
    best = run_search("gcg", engine, cfg).best[0]
    return [int(i) for i in best.ids]


def score(model, images, masks, ids) -> float:
    """Mean exact IoU (the engine) of content ids over images with GT masks."""
    neg = [not m.any() for m in masks]
    return float(Engine(model, images, list(masks), negative=neg, prefix_cache=False)
                 .score(np.asarray([ids], np.int32)).mean())


def masks_of(model, images, ctx, prompts) -> np.ndarray:
    """bool[N, K, H, W]: the prediction rule's masks of N prompts on K images (one predict call per image)."""
    import jax

    out = [predict_one(model, im, prompts, context=jax.tree_util.tree_map(lambda x: x[i:i + 1], ctx))["masks"]
           for i, im in enumerate(images)]
    return np.stack(out, 1)


def collateral(base_masks: np.ndarray, adapted, images, ctx, prompts) -> tuple[float, list[float]]:
    """Mean over the other labels of (IoU with the adapter - IoU without), both against the base model's own
    masks (so the second term is exactly 1)."""
    new = masks_of(adapted, images, ctx, prompts)
    per = [float(np.mean([iou(a, b) for a, b in zip(new[n], base_masks[n])])) - 1.0 for n in range(len(prompts))]
    return float(np.mean(per)), per


def run_problem(p: int, kinds: list[str], steps: int, budget: int, alias_mode: str, log,
                preserve: float = 0.0) -> list[dict]:
    t0 = time.perf_counter()
    prob = make_planted(p)
    model = prob.model
    label = [int(i) for i in prob.label_ids]
    alias = [int(i) for i in prob.hidden_ids] if alias_mode == "hidden" else find_alias(prob, budget)
    held = (prob.heldout_images, prob.heldout_masks)
    label_before, alias_iou = score(model, *held, label), score(model, *held, alias)
    log(f"problem {p} ({prob.label!r}): label {label_before:.3f}, alias {detokenize(alias)!r} {alias_iou:.3f} "
        f"(held-out; {time.perf_counter() - t0:.0f}s)")
    others = [encode(t) for t in OTHER_LABELS if encode(t) != label]
    held_ctx = image_contexts(model, prob.heldout_images)
    base_masks = masks_of(model, prob.heldout_images, held_ctx, others)
    ctx = image_contexts(model, prob.search_images)
    outputs = teacher_outputs(model, alias, ctx)
    m, q = 4 * model.config.vision.backbone.grid, model.config.decoder.num_queries
    rows = []
    for kind in kinds:
        row = {"category": f"planted-{p}", "label": prob.label, "kind": kind, "steps": steps,
               "alias_text": detokenize(alias), "label_before": label_before, "alias": alias_iou,
               "w_preserve": preserve}
        for teacher in ("alias", "gt"):
            cfg = AdaptConfig(kind=kind, teacher=teacher, steps=steps, w_preserve=preserve)
            targets = (alias_targets(ctx, outputs, cfg) if teacher == "alias" else
                       gt_targets(ctx, prob.search_masks, [False] * len(prob.search_masks), q, m, cfg))
            t = time.perf_counter()
            adapter = train_adapter(model, label, targets, cfg, label=prob.label, progress=False)
            secs = time.perf_counter() - t
            adapted = apply_adapters(model, [adapter])
            row[f"label_after_{teacher}"] = score(adapted, *held, label)
            row[f"label_after_{teacher}_search"] = score(adapted, prob.search_images, prob.search_masks, label)
            c, per = collateral(base_masks, adapted, prob.heldout_images, held_ctx, others)
            row["collateral" if teacher == "alias" else "collateral_gt"] = c
            row[f"collateral_{teacher}_min"] = float(min(per))
            row[f"loss_{teacher}"] = [adapter.metrics["loss_first"], adapter.metrics["loss_last"]]
            row[f"seconds_{teacher}"] = secs
            row["adapter_params"] = adapter.num_params
        log(f"  {kind:5s} label {label_before:.3f} -> alias-teacher {row['label_after_alias']:.3f} / gt-teacher "
            f"{row['label_after_gt']:.3f} (alias {alias_iou:.3f}); collateral {row['collateral']:+.4f} / "
            f"{row['collateral_gt']:+.4f}; {row['seconds_alias']:.0f}s + {row['seconds_gt']:.0f}s")
        rows.append(row)
    return rows


def verdict(rows: list[dict]) -> dict:
    out = {}
    for kind in sorted({r["kind"] for r in rows}):
        rs = [r for r in rows if r["kind"] == kind]
        found = [r for r in rs if r["alias"] > r["label_before"]]
        out[kind] = {
            "alias_teacher_reaches_90pct_of_alias": f"{sum(r['label_after_alias'] >= 0.9 * r['alias'] for r in found)}"
                                                    f"/{len(found)}",
            "mean_label_after_alias": float(np.mean([r["label_after_alias"] for r in rs])),
            "mean_label_after_gt": float(np.mean([r["label_after_gt"] for r in rs])),
            "alias_beats_gt": f"{sum(r['label_after_alias'] > r['label_after_gt'] for r in rs)}/{len(rs)}",
            "worst_collateral": float(min(r["collateral"] for r in rs)),
            "collateral_exactly_zero": all(r["collateral"] == 0.0 and r["collateral_gt"] == 0.0 for r in rs),
        }
    return out


def table(rows: list[dict]) -> str:
    head = ("| category | kind | label before | after alias-teacher | after gt-teacher | alias | collateral "
            "(alias / gt teacher) |\n|---|---|---:|---:|---:|---:|---:|")
    lines = [head] + [f"| {r['category']} ({r['label']}) | {r['kind']} | {r['label_before']:.3f} | "
                      f"{r['label_after_alias']:.3f} | {r['label_after_gt']:.3f} | {r['alias']:.3f} | "
                      f"{r['collateral']:+.4f} / {r['collateral_gt']:+.4f} |" for r in rows]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("label_before", "label before"), ("label_after_alias", "alias teacher"),
            ("label_after_gt", "gt teacher"), ("alias", "alias itself")]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 3.6))
    x = np.arange(len(rows))
    for i, (k, name) in enumerate(keys):
        ax.bar(x + (i - 1.5) * 0.2, [r[k] for r in rows], 0.2, label=name)
    ax.set_xticks(x, [f"{r['category']}\n{r['kind']}" for r in rows], fontsize=8)
    ax.set_ylabel("held-out IoU of the label")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, 1.15))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 problems, 150 steps, the hidden sequence as alias "
                                                         "(<= 5 min)")
    ap.add_argument("--problems", type=str, default=None, help="comma-separated planted seeds")
    ap.add_argument("--kinds", type=str, default=None, help="embed,lora")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--budget", type=int, default=None, help="gcg budget for the alias search")
    ap.add_argument("--alias", choices=("search", "hidden"), default=None,
                    help="the teacher: a gcg-found alias (full) or the planted hidden sequence (quick)")
    ap.add_argument("--preserve", type=float, default=0.0, help="AdaptConfig.w_preserve: keep random word "
                                                                   "prompts' text features (0: off)")
    ap.add_argument("--json", type=str, default=None)
    ap.add_argument("--out", type=str, default="benchmarks/out")
    a = ap.parse_args(argv)
    preset = dict(PRESETS["quick" if a.quick else "full"])
    if a.problems:
        preset["problems"] = [int(x) for x in a.problems.split(",")]
    if a.kinds:
        preset["kinds"] = a.kinds.split(",")
    for k in ("steps", "budget", "alias"):
        if getattr(a, k) is not None:
            preset[k] = getattr(a, k)
    t0 = time.perf_counter()
    rows = []
    for p in preset["problems"]:
        rows += run_problem(p, preset["kinds"], preset["steps"], preset["budget"], preset["alias"], print,
                            a.preserve)
    res = {"categories": [{k: r[k] for k in ("category", "kind", "label_before", "label_after_alias",
                                             "label_after_gt", "alias", "collateral")} | r for r in rows],
           "verdict": verdict(rows), "settings": {**preset, "w_preserve": a.preserve, "config": AdaptConfig().to_dict()},
           "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
           "wall_s": time.perf_counter() - t0}
    print(table(rows))
    print(json.dumps(res["verdict"], indent=1))
    print(f"wall {res['wall_s']:.0f}s")
    plot(rows, Path(a.out) / "adapt.png")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
