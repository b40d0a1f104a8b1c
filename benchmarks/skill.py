"""Where a trained model's in-distribution skill goes: per (concept, image), the label's IoU under the prediction
rule next to what the model's own outputs could give, and the empty rate on negatives against the keep threshold.

    PYTHONPATH=. python benchmarks/skill.py [--weights weights/small] [--images 8] [--json PATH]

On the evaluation images of `jalias.train.evaluate.skill` (EVAL_STREAM, never training images), per ID concept:
- rule: the engine's rule (queries with query prob x presence prob > threshold, their masks unioned);
- best query: the single query whose mask best matches the ground truth (an oracle on the decoder's masks);
- per instance: for each instance of the concept, the query whose mask best matches it (IoU against that instance
  alone), averaged over instances: a decoder whose queries each take one instance scores high here;
- query spread: the std across queries of the mask logits over the mean |mask logit| (0: every query gives the same
  mask, the decoder has collapsed to one query);
- semantic: the mask head's semantic map > 0 (SAM3's other output, not used by the rule);
- grid cap: the ground truth area-averaged onto the mask head's m x m grid (m = 4 x ViT grid), minus 0.5, resized
  as the model's masks are: the IoU the mask resolution itself allows (an upper bound for any mask of that grid);
- the rule at other keep thresholds, with the empty rate on negatives (other concepts' images) at each.
At the rule's 0.5 this recomputes `metrics.json`'s id_iou and id_empty_rate by other code (numpy here).
The oracle columns say how much of the gap is the masks and how much is choosing them.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from jalias.data import world
from jalias.engine.predict import predict
from jalias.engine.scoring import bilinear_matrix
from jalias.model.preprocess import preprocess
from jalias.tokenizer import encode
from jalias.train.evaluate import concept_images
from jalias.weights import load

THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two bool masks; 1.0 when both are empty (the rule's convention)."""
    u = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / u) if u else 1.0


def upsample(logits: np.ndarray, size: int) -> np.ndarray:
    """float[..., m, m] -> bool[..., size, size]: bilinear resize (the engine's matrices), > 0."""
    r = bilinear_matrix(size, logits.shape[-1])
    return np.einsum("hm,...mn,wn->...hw", r, logits, r) > 0


def grid_cap(gt: np.ndarray, m: int) -> float:
    """IoU of gt [H, W] bool with its own area average on an m x m grid (cells of the pixels whose index x m // H
    falls there), thresholded at 0.5 after the same bilinear resize the model's mask logits get."""
    h, w = gt.shape
    rows, cols = (np.arange(h) * m) // h, (np.arange(w) * m) // w
    total, count = np.zeros((m, m)), np.zeros((m, m))
    np.add.at(total, (rows[:, None], cols[None, :]), gt.astype(np.float64))
    np.add.at(count, (rows[:, None], cols[None, :]), 1.0)
    return iou(upsample(total / count - 0.5, h), gt)


def outputs(model, image: np.ndarray, ids: list[int], cache: dict, key) -> dict:
    if key not in cache:
        cache[key] = model.encode_image(preprocess(image, model.config.image_size))
    out = predict(model, image, [ids], context=cache[key])
    return {k: out[k][0] for k in ("pred_masks", "scores", "semantic_logits")}


def rule_mask(out: dict, threshold: float, size: int) -> np.ndarray:
    keep = out["scores"] > threshold
    if not keep.any():
        return np.zeros((size, size), bool)
    return upsample(out["pred_masks"][keep].max(axis=0), size)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default="weights/small")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    res = {"weights": a.weights, **diagnose(load(a.weights, dtype="float32"), a.images),
           "machine": f"{platform.machine()}", "wall_s": time.perf_counter() - t0}
    print(table(res["summary"]))
    print(f"wall {res['wall_s']:.0f}s")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=1))
    return res


def diagnose(model, n_images: int = 8) -> dict:
    """{"images", "thresholds", "concepts": per-concept rows, "summary"} of a model (see the module doc)."""
    size = model.config.image_size
    firsts = {c.name: world.concept_scene(0, c, 0, size) for c in world.ID_CONCEPTS}
    cache: dict = {}
    rows = []
    for c in world.ID_CONCEPTS:
        ids = [int(t) for t in encode(c.label)]
        images, masks = concept_images(c, n_images, size, 0)
        pos = []
        for k, (im, gt) in enumerate(zip(images, masks)):
            o = outputs(model, im, ids, cache, (c.name, k))
            qmasks = upsample(o["pred_masks"], size)
            instances = [i.mask for i in world.concept_scene(0, c, k, size).instances if i.concept == c.name]
            spread = o["pred_masks"].std(axis=0).mean() / max(float(np.abs(o["pred_masks"]).mean()), 1e-9)
            pos.append({
                "rule": {t: iou(rule_mask(o, t, size), gt) for t in THRESHOLDS},
                "best_query": max(iou(m, gt) for m in qmasks),
                "per_instance": float(np.mean([max(iou(m, g) for m in qmasks) for g in instances])),
                "query_spread": float(spread),
                "semantic": iou(upsample(o["semantic_logits"], size), gt),
                "grid_cap": grid_cap(gt, o["pred_masks"].shape[-1]),
                "top_score": float(o["scores"].max()),
            })
        negs = [(n, sc.image) for n, sc in firsts.items()
                if n != c.name and not any(i.concept == c.name for i in sc.instances)][:n_images]
        neg = [outputs(model, im, ids, cache, (n, 0)) for n, im in negs]
        rows.append({"concept": c.name, "pos": pos, "neg_top_scores": [float(o["scores"].max()) for o in neg],
                     "neg_empty": {t: [not rule_mask(o, t, size).any() for o in neg] for t in THRESHOLDS}})
    return {"images": n_images, "thresholds": list(THRESHOLDS), "concepts": rows, "summary": summary(rows)}


def summary(rows: list[dict]) -> dict:
    def mean_over_concepts(f):
        return float(np.mean([np.mean([f(p) for p in r["pos"]]) for r in rows]))

    out = {"best_query": mean_over_concepts(lambda p: p["best_query"]),
           "per_instance": mean_over_concepts(lambda p: p["per_instance"]),
           "query_spread": mean_over_concepts(lambda p: p["query_spread"]),
           "semantic": mean_over_concepts(lambda p: p["semantic"]),
           "grid_cap": mean_over_concepts(lambda p: p["grid_cap"]), "rule": {}}
    for t in THRESHOLDS:
        empty = float(np.mean([np.mean(r["neg_empty"][t]) for r in rows]))
        out["rule"][t] = {"id_iou": mean_over_concepts(lambda p: p["rule"][t]), "empty_rate": empty}
    pos_top = [p["top_score"] for r in rows for p in r["pos"]]
    neg_top = [s for r in rows for s in r["neg_top_scores"]]
    out["top_score_quartiles"] = {"positives": np.percentile(pos_top, [25, 50, 75]).tolist(),
                                  "negatives": np.percentile(neg_top, [25, 50, 75]).tolist()}
    return out


def table(s: dict) -> str:
    lines = ["| keep threshold | ID label IoU (rule) | empty on negatives |", "|---:|---:|---:|"]
    lines += [f"| {t} | {v['id_iou']:.3f} | {v['empty_rate']:.2f} |" for t, v in s["rule"].items()]
    q = s["top_score_quartiles"]
    lines += ["", f"oracle best single query: {s['best_query']:.3f}; per instance: {s['per_instance']:.3f}; "
              f"semantic map > 0: {s['semantic']:.3f}; mask-grid cap: {s['grid_cap']:.3f}",
              f"query spread (std of mask logits across queries / mean |logit|): {s['query_spread']:.4f}",
              f"top query score quartiles: positives {np.round(q['positives'], 3).tolist()}, "
              f"negatives {np.round(q['negatives'], 3).tolist()}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
