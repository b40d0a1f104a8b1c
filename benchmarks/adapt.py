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

`--trained`: the trained small SAM3 (weights/small) instead, on OOD concepts of its training world (tomato,
heart, blue triangle: a new name, a new shape, a new colour-shape combination), real ground truth throughout. The
alias is found by gcg (measured settings, default vocabulary, 1,000 evaluations; from the label when it scores
above 0 on a search scene, else from random tokens, the run pipeline's rule) on 6 search scenes; adapters are
trained on those and measured on 6 held-out scenes; collateral is the mean change, with the adapter, of other
concepts' label IoU against their real ground truth (every ID concept sharing a word with the label, up to 12
more ID concepts, the other 10 OOD concepts; 2 fresh scenes each).

Adapters use `AdaptConfig`'s defaults, what `jalias adapt` runs: an embed adapter learns as many rows as the
alias has tokens and the alias teacher pulls the label's prompt features to the alias's (`--length label` and
`--features 0` give the earlier recipe: one row per label token, image terms only).

Targets (the issue's): label_after_alias >= 0.9 x alias where an alias was found; collateral >= -0.02 (embed:
exactly 0); and the answer to "alias teacher vs gt teacher at equal steps".

    PYTHONPATH=. python benchmarks/adapt.py --quick --json benchmarks/out/adapt.json --out benchmarks/out
    PYTHONPATH=. python benchmarks/adapt.py --trained --json benchmarks/out/adapt_trained.json --out benchmarks/out
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
from jalias.adapt.config import length_name, parse_length  # noqa: E402
from jalias.data import iou  # noqa: E402
from jalias.data.planted import make_planted  # noqa: E402
from jalias.engine.predict import predict as predict_one  # noqa: E402
from jalias.engine import Engine  # noqa: E402
from jalias.search import METHODS, HalvingConfig, run_search  # noqa: E402
from jalias.search.defaults import MEASURED  # noqa: E402
from jalias.tokenizer import detokenize, encode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from planted import method_config  # noqa: E402

OTHER_LABELS = ("striped blob", "checkered star", "dotted ring", "zigzag crescent", "gridded hexagon",
                "speckled cross", "striped star", "blob", "red star", "blue triangle", "tomato", "heart")
PRESETS = {
    # steps: AdaptConfig's default, what `jalias adapt` runs
    "quick": dict(problems=[10, 11], kinds=["embed", "lora"], steps=AdaptConfig.steps, budget=2000, alias="hidden"),
    # the trained small SAM3 (weights/small) on the OOD concepts the OOD benchmark found aliases for
    "trained": dict(concepts=["tomato", "heart", "blue_triangle"], kinds=["embed", "lora"], steps=AdaptConfig.steps,
                    budget=1000,
                    n_search=6, n_heldout=6, collateral_images=2),
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


def collateral(base_masks: np.ndarray, adapted, images, ctx, prompts, names) -> tuple[float, dict]:
    """(mean, {label: change}) over the other labels of (IoU with the adapter - IoU without), both against the
    base model's own masks (so the second term is exactly 1)."""
    new = masks_of(adapted, images, ctx, prompts)
    per = {names[n]: float(np.mean([iou(a, b) for a, b in zip(new[n], base_masks[n])])) - 1.0
           for n in range(len(prompts))}
    return float(np.mean(list(per.values()))), per


def run_problem(p: int, kinds: list[str], steps: int, budget: int, alias_mode: str, log,
                extra: dict | None = None) -> list[dict]:
    t0 = time.perf_counter()
    prob = make_planted(p)
    model = prob.model
    label = [int(i) for i in prob.label_ids]
    alias = [int(i) for i in prob.hidden_ids] if alias_mode == "hidden" else find_alias(prob, budget)
    held = (prob.heldout_images, prob.heldout_masks)
    label_before, alias_iou = score(model, *held, label), score(model, *held, alias)
    log(f"problem {p} ({prob.label!r}): label {label_before:.3f}, alias {detokenize(alias)!r} {alias_iou:.3f} "
        f"(held-out; {time.perf_counter() - t0:.0f}s)")
    names = [t for t in OTHER_LABELS if encode(t) != label]
    others = [encode(t) for t in names]
    held_ctx = image_contexts(model, prob.heldout_images)
    base_masks = masks_of(model, prob.heldout_images, held_ctx, others)
    base = {"label_before": label_before, "alias": alias_iou}
    return adapt_rows(model, f"planted-{p}", prob.label, label, alias, base, (prob.search_images, prob.search_masks),
                      held, lambda adapted: collateral(base_masks, adapted, prob.heldout_images, held_ctx, others,
                                                       names),
                      kinds, steps, extra or {}, log)


def adapt_rows(model, category: str, label_text: str, label: list[int], alias: list[int], base: dict, search,
               held, collateral_of, kinds: list[str], steps: int, extra: dict, log) -> list[dict]:
    """Per adapter kind: an alias-teacher and a gt-teacher adapter for `label` trained on the search images
    (equal steps, same optimiser), measured on the held-out images; collateral_of(adapted) -> (mean, per label).
    extra: AdaptConfig fields beyond kind/teacher/steps (w_preserve, preserve_neighbours, length: embed only)."""
    search_images, search_masks = search
    neg = [not m.any() for m in search_masks]
    ctx = image_contexts(model, search_images)
    outputs = teacher_outputs(model, alias, ctx)
    m, q = 4 * model.config.vision.backbone.grid, model.config.decoder.num_queries
    rows = []
    for kind in kinds:
        row = {"category": category, "label": label_text, "kind": kind, "steps": steps,
               "alias_text": detokenize(alias), **base, "w_preserve": extra.get("w_preserve", 0.0),
               "length": extra.get("length", 0) if kind == "embed" else None}
        for teacher in ("alias", "gt"):
            cfg = AdaptConfig(kind=kind, teacher=teacher, steps=steps, **extra)
            targets = (alias_targets(ctx, outputs, cfg) if teacher == "alias" else
                       gt_targets(ctx, search_masks, neg, q, m, cfg))
            t = time.perf_counter()
            adapter = train_adapter(model, label, targets, cfg, label=label_text, progress=False,
                                    alias_length=len(alias))
            secs = time.perf_counter() - t
            adapted = apply_adapters(model, [adapter])
            row[f"label_after_{teacher}"] = score(adapted, *held, label)
            row[f"label_after_{teacher}_search"] = score(adapted, search_images, search_masks, label)
            c, per = collateral_of(adapted)
            row["collateral" if teacher == "alias" else "collateral_gt"] = c
            row[f"collateral_{teacher}_min"] = float(min(per.values()))
            row[f"collateral_{teacher}_per_label"] = per
            row[f"loss_{teacher}"] = [adapter.metrics["loss_first"], adapter.metrics["loss_last"]]
            row[f"seconds_{teacher}"] = secs
            row["adapter_params"] = adapter.num_params
        log(f"  {kind:5s} label {row['label_before']:.3f} -> alias-teacher {row['label_after_alias']:.3f} / "
            f"gt-teacher {row['label_after_gt']:.3f} (alias {row['alias']:.3f}); collateral "
            f"{row['collateral']:+.4f} / {row['collateral_gt']:+.4f}; {row['seconds_alias']:.0f}s + "
            f"{row['seconds_gt']:.0f}s")
        rows.append(row)
    return rows


def collateral_set(name: str, n_images: int, size: int) -> list[tuple[str, list[int], list, list]]:
    """Other concepts of the training world whose labels an adapter for `name` could disturb, with real ground
    truth: every ID concept sharing a word with its label, up to 12 more ID concepts (a fixed spread), every other OOD
    concept; n_images fresh scenes each (seed 2: neither search nor held-out images)."""
    from jalias.data import world
    from jalias.train.evaluate import concept_images

    mine = world.OOD_BY_NAME[name]
    words = set(mine.label.split())
    ids = list(world.ID_CONCEPTS)
    near = [c for c in ids if words & set(c.label.split())]
    spread = [c for c in ids[::max(1, len(ids) // 12)] if c not in near][:12]
    ood = [c for c in world.OOD_CONCEPTS if c.name != name]
    return [(c.label, encode(c.label), *concept_images(c, n_images, size, seed=2)) for c in near + spread + ood]


def trained_collateral(model, others) -> callable:
    """collateral_of(adapted) for the trained model: mean over the other labels of (IoU with the adapter - IoU
    without) against their real ground truth (one Scorer per label: its image features are computed once)."""
    from jalias.train.evaluate import Scorer

    names = [name for name, *_ in others]
    scorers = [(ids, Scorer(model, images, gts)) for _, ids, images, gts in others]
    before = [float(s(ids).mean()) for ids, s in scorers]

    def of(adapted):
        per = []
        for (ids, s), b in zip(scorers, before):
            s.model = adapted  # the adapters change only prompt-side weights: the cached image features hold
            per.append(float(s(ids).mean()) - b)
            s.model = model
        return float(np.mean(per)), dict(zip(names, per))

    return of


def run_trained(name: str, preset: dict, log, extra: dict | None = None, weights: str = "weights/small") -> list[dict]:
    """One OOD concept of the training world on the trained small SAM3: alias found by gcg (the measured
    settings, default vocabulary) on the search images, adapters as in `adapt_rows`, held-out images with real
    ground truth, collateral on other concepts' labels with real ground truth."""
    from jalias.data import world
    from jalias.train.evaluate import concept_images
    from jalias.weights import load

    t0 = time.perf_counter()
    model = load(weights, dtype="float32")
    c = world.OOD_BY_NAME[name]
    size = model.config.image_size
    search = concept_images(c, preset["n_search"], size, seed=0)
    held = concept_images(c, preset["n_heldout"], size, seed=1)
    label = [int(i) for i in encode(c.label)]
    engine = Engine(model, *search)
    # the run pipeline's rule (as in `jalias demo`): start from the label unless it scores 0 everywhere
    init = dict(init="label", label_ids=label) if engine.score(np.asarray([label])).max() > 0 else {}
    method, cfg = method_config("gcg", length=4, budget=preset["budget"], seed=preset.get("seed", 0), **init)
    best = run_search(method, engine, cfg).best[0]
    alias = [int(i) for i in best.ids]
    base = {"label_before": score(model, *held, label), "alias": score(model, *held, alias)}
    log(f"{name} ({c.label!r}): label {base['label_before']:.3f}, alias {detokenize(alias)!r} {base['alias']:.3f} "
        f"(held-out; search {best.train_iou:.3f}; {time.perf_counter() - t0:.0f}s)")
    others = collateral_set(name, preset["collateral_images"], size)
    return adapt_rows(model, name, c.label, label, alias, base, search, held, trained_collateral(model, others),
                      preset["kinds"], preset["steps"], extra or {}, log)


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


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 problems, default steps, the hidden sequence as alias "
                                                         "(<= 5 min)")
    ap.add_argument("--trained", action="store_true", help="the trained small SAM3 (weights/small) on OOD concepts "
                                                           "of the training world, real ground truth throughout")
    ap.add_argument("--concepts", type=str, default=None, help="with --trained: comma-separated OOD concepts")
    ap.add_argument("--problems", type=str, default=None, help="comma-separated planted seeds")
    ap.add_argument("--kinds", type=str, default=None, help="embed,lora")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--budget", type=int, default=None, help="gcg budget for the alias search")
    ap.add_argument("--seed", type=int, default=None, help="with --trained: the alias search's seed (default 0)")
    ap.add_argument("--alias", choices=("search", "hidden"), default=None,
                    help="the teacher: a gcg-found alias (full) or the planted hidden sequence (quick)")
    ap.add_argument("--preserve", type=float, default=AdaptConfig.w_preserve,
                    help="AdaptConfig.w_preserve (lora): keep other prompts' text features (0: off)")
    ap.add_argument("--preserve-neighbours", type=int, default=AdaptConfig.preserve_neighbours,
                    help="AdaptConfig.preserve_neighbours: how many prompts sharing the label's tokens to keep too")
    ap.add_argument("--length", type=str, default=length_name(AdaptConfig.length),
                    help="AdaptConfig.length (embed rows): label (one per label token) | alias (as many as the "
                         "alias's tokens) | N")
    ap.add_argument("--features", type=float, default=AdaptConfig.w_features,
                    help="AdaptConfig.w_features (alias teacher): pull the label's prompt features to the alias's "
                         "where the lengths match (embed with --length alias)")
    ap.add_argument("--states", type=float, default=AdaptConfig.w_states,
                    help="AdaptConfig.w_states (lora, alias teacher): pull the label's decoder query states and "
                         "fused image tokens to the alias's (0: off)")
    ap.add_argument("--lr-lora", type=float, default=AdaptConfig.lr_lora, help="AdaptConfig.lr_lora")
    ap.add_argument("--targets", type=str, default=AdaptConfig.targets,
                    help="AdaptConfig.targets (lora): a preset (text, text+fusion) or fnmatch patterns")
    ap.add_argument("--json", type=str, default=None)
    ap.add_argument("--out", type=str, default="benchmarks/out")
    return ap


def main(argv=None) -> dict:
    a = parser().parse_args(argv)
    preset = dict(PRESETS["trained" if a.trained else "quick" if a.quick else "full"])
    if a.concepts:
        preset["concepts"] = a.concepts.split(",")
    if a.problems:
        preset["problems"] = [int(x) for x in a.problems.split(",")]
    if a.kinds:
        preset["kinds"] = a.kinds.split(",")
    for k in ("steps", "budget", "alias", "seed"):
        if getattr(a, k) is not None:
            preset[k] = getattr(a, k)
    extra = {"w_preserve": a.preserve, "preserve_neighbours": a.preserve_neighbours,
             "length": parse_length(a.length), "w_features": a.features, "w_states": a.states,
             "lr_lora": a.lr_lora, "targets": a.targets}
    t0 = time.perf_counter()
    rows = []
    if a.trained:
        for name in preset["concepts"]:
            rows += run_trained(name, preset, print, extra)
    else:
        for p in preset["problems"]:
            rows += run_problem(p, preset["kinds"], preset["steps"], preset["budget"], preset["alias"], print,
                                extra)
    res = {"categories": [{k: r[k] for k in ("category", "kind", "label_before", "label_after_alias",
                                             "label_after_gt", "alias", "collateral")} | r for r in rows],
           "verdict": verdict(rows), "settings": {**preset, "config": AdaptConfig(**extra).to_dict()},
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
