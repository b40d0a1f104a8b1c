"""Look at report.html as a user does: build a run directory with many categories, render it in headless
Chromium, write PNG screenshots.

    python benchmarks/report_screenshot.py [--out runs/report-shot] [--categories 24] [--seed 0]

The run directory is synthetic (no model runs): result JSONs shaped like the pipeline's (per-image IoUs,
search history with an IoU that falls while the objective rises, negatives, one category whose overlay hits
the row cap) and overlays drawn by `jalias.run.figures.overlay_png` from generated images and masks, whose
IoUs are computed from those masks. `write_report` then builds the report exactly as after a real run.
Screenshots: `report.png` (the page as opened: summary figure, table, curves, closed sections) and
`report_open.png` (the whole page with the first and third categories' sections opened; the third hits the
overlay's row cap). Needs `chromium` (Debian: apt-get install chromium); `synthetic_run` alone needs nothing but
jalias (tests/test_report.py uses it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from jalias.run.figures import OverlayRow, overlay_png
from jalias.run.io import write_json_atomic
from jalias.run.report import write_report
from jalias.run.rundir import RunDir, RunSettings, slugify

NAMES = ["kiwi", "axolotl", "okapi", "pangolin", "quokka", "narwhal", "tapir", "fossa", "dugong", "aye-aye",
         "saiga", "gharial", "blobfish", "shoebill", "markhor", "kakapo", "numbat", "olm", "vaquita", "takin",
         "serow", "potoo", "babirusa", "solenodon", "jerboa", "binturong", "zorilla", "tuatara"]
H, W = 96, 128


def _ellipse(cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    y, x = np.mgrid[:H, :W]
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def _iou(pred: np.ndarray, gt: np.ndarray) -> float:
    union = (pred | gt).sum()
    return 1.0 if union == 0 else float((pred & gt).sum() / union)


def _image(rng, gt: np.ndarray) -> np.ndarray:
    y, x = np.mgrid[:H, :W]
    base = np.stack([80 + 60 * x / W, 90 + 50 * y / H, 120 + 0 * x], -1)  # smooth: PNGs encode fast
    base[gt] = rng.uniform(120, 230, 3)
    return np.clip(base, 0, 255).astype(np.uint8)


def _rows(rng, split: str, n_pos: int, n_neg: int, label_q: float, alias_q: float, start: int) -> list[OverlayRow]:
    """Images with an ellipse (positives) or none (negatives); predictions shifted from the GT by (1 - quality)."""
    out = []
    for k in range(n_pos + n_neg):
        neg = k >= n_pos
        cy, cx = rng.uniform(30, 66), rng.uniform(35, 93)
        ry, rx = rng.uniform(12, 25), rng.uniform(14, 30)
        gt = np.zeros((H, W), bool) if neg else _ellipse(cy, cx, ry, rx)
        preds = []
        for q in (label_q, alias_q):
            if neg:
                preds.append(_ellipse(cy, cx, ry * 0.6, rx * 0.6) if rng.uniform() > q else np.zeros((H, W), bool))
            elif rng.uniform() > q + 0.15:
                preds.append(np.zeros((H, W), bool))
            else:
                d = (1 - q) * 40
                preds.append(_ellipse(cy + rng.uniform(-d, d), cx + rng.uniform(-d, d), ry, rx))
        out.append(OverlayRow(_image(rng, gt), gt, preds[0], preds[1], f"img_{start + k:05d}", split, neg,
                              _iou(preds[0], gt), _iou(preds[1], gt)))
    return out


def _objective(rows, who: str, negative_weight: float) -> float:
    pos = [getattr(r, f"{who}_iou") for r in rows if not r.negative]
    neg = [1 - getattr(r, f"{who}_iou") for r in rows if r.negative]
    return float(np.mean(pos) - negative_weight * (np.mean(neg) if neg else 0.0))


def _history(rng, label_obj: float, final_obj: float, final_iou: float, budget: int) -> list[list[float]]:
    evals = np.sort(rng.choice(np.arange(10, budget), size=12, replace=False))
    obj = np.sort(rng.uniform(label_obj, final_obj, 12))
    obj[-1] = final_obj
    iou = np.clip(obj + rng.normal(0.05, 0.08, 12), 0, 1)  # the best-objective candidate's IoU: not monotone
    iou[-1] = final_iou
    return [[int(e), float(o), float(i)] for e, o, i in zip(evals, obj, iou)]


def synthetic_run(out: str | Path, n_categories: int = 24, seed: int = 0, cap: int = 24,
                  negative_weight: float = 0.5) -> Path:
    """A finished run directory of `n_categories` synthetic categories, with its report; returns the directory.
    The third category has more images than `cap` overlay rows: its overlay lists the images left out."""
    from jalias.run.pipeline import pick_overlay_rows

    out = Path(out)
    rng = np.random.default_rng(seed)
    run = RunDir(out)
    settings = RunSettings(weights=str(out / "weights-synthetic"), annotations=str(out / "annotations.json"),
                           images=str(out / "images"), method="gcg", budget=2000, negatives=2, seed=seed,
                           negative_weight=negative_weight, prompt_mode="meta")
    run.prepare(settings, resume=False, overwrite=True)
    names = [NAMES[k % len(NAMES)] + ("" if k < len(NAMES) else f"_{k // len(NAMES)}") for k in range(n_categories)]
    taken: set[str] = set()
    cats = [{"name": n, "slug": slugify(n, taken)} for n in names]
    run.set_categories(cats)
    start = 0
    for k, cat in enumerate(cats):
        label_q = rng.uniform(0.1, 0.7)
        alias_q = rng.uniform(label_q, 0.95)
        wanted = k % 4 != 0  # every fourth category: the best found loses to the label, which is the result
        n_pos = 20 if k == 2 else 5
        search = _rows(rng, "search", n_pos, 1, label_q, alias_q, start)
        held = _rows(rng, "heldout", 3 if k != 2 else 10, 1, label_q, alias_q, start + 100)
        start += 1000
        beat = wanted and (_objective(search, "alias", negative_weight) > _objective(search, "label", negative_weight))
        for r in ([] if beat else search + held):  # the label kept as the result: the alias columns show it
            r.alias_mask, r.alias_iou = r.label_mask, r.label_iou
        parts = [search, held]
        shown, left = pick_overlay_rows([np.array([r.negative for r in p]) for p in parts], cap)
        left_out = [{"image_id": parts[s][i].image_id, "split": parts[s][i].split,
                     "negative": parts[s][i].negative, "reason": f"the overlay shows at most {cap} images"}
                    for s, i in left]
        overlay = f"overlays/{cat['slug']}.png"
        label = cat["name"].replace("-", " ")
        alias = f"{cat['name'][:3]}ish sprocket" if beat else label
        overlay_png(out / overlay, [parts[s][i] for s, i in shown], label, alias, [x["image_id"] for x in left_out])

        def stats(rows, who):  # (mean IoU over positives, fraction of negatives predicted empty)
            pos = [getattr(r, f"{who}_iou") for r in rows if not r.negative]
            neg = [getattr(r, f"{who}_iou") == 1.0 for r in rows if r.negative]
            return float(np.mean(pos)), (float(np.mean(neg)) if neg else None)

        (ls, ln), (as_, an) = stats(search, "label"), stats(search, "alias")
        (lh, lhn), (ah, ahn) = stats(held, "label"), stats(held, "alias")
        lo, ao = _objective(search, "label", negative_weight), _objective(search, "alias", negative_weight)
        per = {s: [{"image_id": r.image_id, "negative": r.negative, "label_iou": r.label_iou,
                    "alias_iou": r.alias_iou} for r in rows]
               for s, rows in (("search", search), ("heldout", held))}
        res = {
            "status": "done", "category": cat["name"], "slug": cat["slug"], "label": label, "label_ids": [1000 + k],
            "alias_ids": [2000 + k, 3000, 4000] if beat else [1000 + k], "alias_text": alias,
            "alias_beat_label": beat, "label_iou_search": ls, "label_iou_heldout": lh,
            "alias_iou_search": as_, "alias_iou_heldout": ah,
            "negatives_empty": {"label_search": ln, "alias_search": an, "label_heldout": lhn, "alias_heldout": ahn},
            "objective": {"label": lo, "alias": ao}, "evals": 2000, "budget": 2000,
            "seconds": float(rng.uniform(20, 80)), "method": "gcg", "stop_reason": "budget", "iterations": 31,
            "n_search": n_pos, "n_heldout": len(held) - 1, "per_image": per,
            "history": _history(rng, lo, ao, as_, 2000),
            "candidates": [{"ids": [2000 + k, 3000, 4000 + j], "text": f"{alias} {j}", "objective": ao - 0.01 * j,
                            "train_iou": as_ - 0.01 * j} for j in range(5)],
            "overlay": overlay, "overlay_left_out": left_out,
        }
        res["category_seconds"] = res["seconds"] + float(rng.uniform(5, 30))
        write_json_atomic(run.result_path(cat["slug"]), res)
    run.write_summary(settings)
    write_report(out)
    return out


def chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


def screenshot(url: str, png: str | Path, width: int = 1400, height: int = 3000, timeout: float = 120) -> Path:
    """Render `url` in headless Chromium and write a PNG screenshot of the top `height` pixels."""
    exe = chromium()
    if exe is None:
        raise FileNotFoundError("no chromium on PATH (Debian: apt-get install chromium)")
    png = Path(png).resolve()
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        "--hide-scrollbars", f"--user-data-dir={profile}", f"--screenshot={png}",
                        f"--window-size={width},{height}", url],
                       check=True, capture_output=True, timeout=timeout)
    return png


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/report-shot")
    ap.add_argument("--categories", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--open-height", type=int, default=9000, help="height of report_open.png in pixels")
    args = ap.parse_args(argv)
    out = synthetic_run(args.out, args.categories, args.seed)
    page = (out / "report.html").resolve()
    shots = [screenshot(page.as_uri(), out / "report.png")]
    # the page with two sections opened (a click on their summary line; headless Chromium paints nothing when
    # it scrolls to a #fragment, so the opened copy is shot from the top, tall enough to reach the sections)
    slugs = [r["slug"] for r in json.loads((out / "report.json").read_text())["rows"]][:3:2]
    text = page.read_text()
    for slug in slugs:
        text = text.replace(f"<details class='cat' id='{slug}'>", f"<details class='cat' id='{slug}' open>")
    opened = page.with_name(".report_open.html")
    opened.write_text(text)
    try:
        shots.append(screenshot(opened.as_uri(), out / "report_open.png", height=args.open_height))
    finally:
        opened.unlink()
    for s in shots:
        print(s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
