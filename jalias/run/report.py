"""Run reports: overlay PNGs, the search-curve plot, report.json and a self-contained report.html.

    overlays/<slug>.png   a row per image: image | ground truth | the label's predicted mask | the alias's mask
                          (masks tinted over the image; caption: image id, split, label / alias IoU)
    curves.png            best search-set IoU vs candidate-image evaluations, one line per category, with the
                          label's IoU dashed in the same colour
    report.json           {"run_dir", "settings", "rows": [summary per category + "overlay"], "mean", "curves"}
    report.html           the same as a page (inline CSS; images linked relatively, so the folder can be moved)

`write_report(run_dir)` only reads the run directory's JSON files and overlay PNGs, so it can be re-run at any
time; overlays are drawn while a category is searched (they need the model's predictions).
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .io import mean, write_json_atomic
from .model import embedded_tiny_path
from .rundir import IOU_KEYS, RunDir

PANEL = 192  # panel height in pixels
GT_COLOUR = (40, 200, 80)
LABEL_COLOUR = (240, 140, 20)
ALIAS_COLOUR = (40, 120, 255)


@dataclass
class OverlayRow:
    """One image of an overlay: image uint8[H, W, 3]; gt, label_mask, alias_mask bool[H, W]."""

    image: np.ndarray
    gt: np.ndarray
    label_mask: np.ndarray
    alias_mask: np.ndarray
    image_id: str
    split: str
    negative: bool
    label_iou: float
    alias_iou: float


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType support
        return ImageFont.load_default()


def _resize(img: np.ndarray, height: int, nearest: bool) -> "Image.Image":
    from PIL import Image

    h, w = img.shape[:2]
    width = max(1, round(w * height / h))
    return Image.fromarray(img).resize((width, height), Image.NEAREST if nearest else Image.BILINEAR)


def tint(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], alpha: float = 0.55) -> np.ndarray:
    """uint8[H, W, 3] image with `mask` bool[H, W] blended towards `colour`; outside the mask darkened a bit."""
    out = image.astype(np.float32) * 0.75
    c = np.asarray(colour, np.float32)
    out[mask] = image[mask].astype(np.float32) * (1 - alpha) + c * alpha
    return np.clip(out, 0, 255).astype(np.uint8)


def _fit(draw, text: str, font, width: int) -> str:
    """Cut text with an ellipsis so it fits in `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def overlay_png(path: str | os.PathLike, rows: Sequence[OverlayRow], label: str, alias: str) -> Path:
    """Draw the overlay grid (4 panels per row, a header with column titles) to `path`; returns it."""
    from PIL import Image, ImageDraw

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    font, small = _font(14), _font(12)
    gap, head, cap = 6, 24, 18
    widths = [_resize(r.image, PANEL, False).width for r in rows] or [PANEL]
    pw = max(widths)
    width = 4 * pw + 5 * gap
    height = head + len(rows) * (cap + PANEL + gap) + gap
    canvas = Image.new("RGB", (width, height), (250, 250, 250))
    draw = ImageDraw.Draw(canvas)
    titles = ["image", "ground truth", f"label: {label}", f"alias: {alias}"]
    colours = [(30, 30, 30), GT_COLOUR, LABEL_COLOUR, ALIAS_COLOUR]
    for j, (t, c) in enumerate(zip(titles, colours)):
        draw.text((gap + j * (pw + gap), 4), _fit(draw, t, font, pw), fill=c, font=font)
    y = head
    for r in rows:
        kind = "negative, " if r.negative else ""
        caption = f"{r.image_id} ({kind}{r.split})   label IoU {r.label_iou:.3f}   alias IoU {r.alias_iou:.3f}"
        draw.text((gap, y + 2), _fit(draw, caption, small, width - 2 * gap), fill=(60, 60, 60), font=small)
        y += cap
        panels = [(r.image, False), (tint(r.image, r.gt, GT_COLOUR), True),
                  (tint(r.image, r.label_mask, LABEL_COLOUR), True), (tint(r.image, r.alias_mask, ALIAS_COLOUR), True)]
        for j, (img, nearest) in enumerate(panels):
            canvas.paste(_resize(img, PANEL, nearest), (gap + j * (pw + gap), y))
        y += PANEL + gap
    tmp = path.with_name(f".{path.stem}.tmp.png")
    canvas.save(tmp)
    os.replace(tmp, path)
    return path


def curves_png(path: str | os.PathLike, curves: dict[str, dict]) -> Path:
    """curves: name -> {"history": [[evals, best_objective, best_iou], ...], "label_iou": float | None}."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for k, (name, c) in enumerate(curves.items()):
        colour = f"C{k % 10}"
        hist = np.asarray(c["history"], np.float64).reshape(-1, 3)
        if len(hist):
            ax.step(hist[:, 0], hist[:, 2], where="post", color=colour, label=f"{name} (alias)")
        if c.get("label_iou") is not None:
            ax.axhline(c["label_iou"], color=colour, linestyle="--", linewidth=1, label=f"{name} (label)")
    ax.set_xlabel("candidate-image evaluations")
    ax.set_ylabel("best IoU on search images")
    ax.set_title("Search curves")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _f(x) -> str:
    return "&ndash;" if x is None else f"{x:.3f}"


def write_report(run_dir: str | os.PathLike) -> tuple[Path, Path]:
    """curves.png, report.json and report.html of a run directory from its result files; returns the JSON and
    HTML paths."""
    run = RunDir(run_dir)
    settings = run.read_run()["settings"]
    results = run.finished_results()
    summary_keys = ("category", "label", "label_ids", "label_iou_search", "label_iou_heldout", "alias_ids",
                    "alias_text", "alias_beat_label", "alias_iou_search", "alias_iou_heldout", "evals", "seconds",
                    "n_search", "n_heldout", "overlay", "negatives_empty")
    rows = [{k: r.get(k) for k in summary_keys} for r in results]
    curves_png(run.path / "curves.png",
               {r["category"]: {"history": r["history"], "label_iou": r["label_iou_search"]} for r in results})

    doc = {
        "run_dir": str(run.path.resolve()),
        "settings": settings,
        "rows": rows,
        "mean": {k: mean([r[k] for r in rows if r[k] is not None]) for k in IOU_KEYS},
        "curves": "curves.png",
        "skipped_images": run.skipped_images(),
    }
    json_path = run.path / "report.json"
    write_json_atomic(json_path, doc)
    html_path = run.path / "report.html"
    tmp = html_path.with_name(".report.html.tmp")
    tmp.write_text(_html(doc, results), encoding="utf-8")
    os.replace(tmp, html_path)
    return json_path, html_path


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1100px; }
table { border-collapse: collapse; margin: 1em 0; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f0f0f0; }
code { background: #f4f4f4; padding: 1px 4px; }
img { max-width: 100%; border: 1px solid #ddd; }
.better { color: #0a7d32; font-weight: 600; }
details { margin: 0.5em 0 1.5em; }
.warn { background: #fff4d6; border: 1px solid #e0b84d; padding: 6px 10px; }
"""


RANDOM_NOTE = ("<p class='warn'>These weights are the embedded tiny model's <b>random</b> weights: the numbers show "
               "that the pipeline runs, not how SAM3 behaves. Use real SAM3 weights (README, 'Using real SAM3 "
               "weights') or a model from <code>jalias train</code>.</p>")


def is_random_tiny(weights: str) -> bool:
    """Whether run.json's weights entry (`model.weights_spec`) names the embedded random tiny checkpoint."""
    return weights == "tiny" or Path(weights).resolve() == embedded_tiny_path().resolve()


def _html(doc: dict, results: list[dict]) -> str:
    e = html.escape
    s = doc["settings"]
    out = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'><title>jalias report</title>",
           f"<style>{_CSS}</style></head><body>", "<h1>jalias run report</h1>",
           f"<p>Method <b>{e(str(s['method']))}</b>, budget {s['budget']} evaluations per category, "
           f"{s['length']} tokens, seed {s['seed']}, held-out fraction {s['heldout']:.2g}, "
           f"{s['negatives']} negative images per category, prompt mode {e(str(s.get('prompt_mode', 'hf')))}.<br>"
           f"Weights <code>{e(str(s['weights']))}</code>"
           + "".join(f" + adapter <code>{e(str(a))}</code>" for a in s.get("adapters", [])) + ", "
           f"annotations <code>{e(str(s['annotations']))}</code>.</p>",
           *([RANDOM_NOTE] if is_random_tiny(str(s["weights"])) else []),
           *([f"<p class='warn'>Left out as unreadable (--skip-bad-images): "
              + ", ".join(f"<code>{e(k)}</code> ({e(v)})" for k, v in doc["skipped_images"].items()) + "</p>"]
             if doc.get("skipped_images") else []),
           "<table><tr><th>concept</th><th>label</th><th>label IoU search</th><th>label IoU held-out</th>"
           "<th>alias</th><th>alias IoU search</th><th>alias IoU held-out</th><th>evals</th><th>seconds</th></tr>"]
    for r in doc["rows"]:
        better = (r["alias_iou_heldout"] is not None and r["label_iou_heldout"] is not None
                  and r["alias_iou_heldout"] > r["label_iou_heldout"])
        cls = " class='n better'" if better else " class='n'"
        alias = (f"<code>{e(r['alias_text'])}</code>" if r.get("alias_beat_label", True)
                 else "<em>no alias beat the label</em>")
        out.append(
            f"<tr><td><a href='#{e(r['category'])}'>{e(r['category'])}</a></td><td>{e(r['label'])}</td>"
            f"<td class='n'>{_f(r['label_iou_search'])}</td><td class='n'>{_f(r['label_iou_heldout'])}</td>"
            f"<td>{alias}</td><td class='n'>{_f(r['alias_iou_search'])}</td>"
            f"<td{cls}>{_f(r['alias_iou_heldout'])}</td><td class='n'>{r['evals']}</td>"
            f"<td class='n'>{r['seconds']:.1f}</td></tr>")
    m = doc["mean"]
    out.append(f"<tr><th>mean</th><th></th><th class='n'>{_f(m['label_iou_search'])}</th>"
               f"<th class='n'>{_f(m['label_iou_heldout'])}</th><th></th><th class='n'>{_f(m['alias_iou_search'])}"
               f"</th><th class='n'>{_f(m['alias_iou_heldout'])}</th><th></th><th></th></tr></table>")
    out.append("<h2>Search curves</h2><img src='curves.png' alt='best IoU vs evaluations'>")
    for r in results:
        out.append(f"<h2 id='{e(r['category'])}'>{e(r['category'])}</h2>")
        out.append(f"<p>Label <code>{e(r['label'])}</code> (ids {r['label_ids']}) &rarr; alias "
                   f"<code>{e(r['alias_text'])}</code> (ids {r['alias_ids']}); {r['n_search']} search and "
                   f"{r['n_heldout']} held-out images; stopped by {e(str(r.get('stop_reason')))} after "
                   f"{r.get('iterations')} iterations.</p>")
        out.append(f"<img src='{e(r['overlay'])}' alt='overlays of {e(r['category'])}'>")
        out.append("<details><summary>best candidates</summary><table><tr><th>#</th><th>text</th><th>ids</th>"
                   "<th>objective</th><th>search IoU</th></tr>")
        for i, c in enumerate(r.get("candidates", [])):
            out.append(f"<tr><td>{i + 1}</td><td><code>{e(c['text'])}</code></td><td>{c['ids']}</td>"
                       f"<td class='n'>{_f(c['objective'])}</td><td class='n'>{_f(c['train_iou'])}</td></tr>")
        out.append("</table></details>")
    out.append("<p>Files: <a href='report.json'>report.json</a>, <a href='all_results.json'>all_results.json</a>, "
               "<a href='log.txt'>log.txt</a>.</p></body></html>")
    return "\n".join(out)


def read_report(run_dir: str | os.PathLike) -> dict:
    return json.loads((Path(run_dir) / "report.json").read_text())
