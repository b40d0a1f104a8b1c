"""Run reports: overlay PNGs, search curves, the summary plot, report.json and a self-contained report.html.

    overlays/<slug>.png   a row per image: image | ground truth | the label's predicted mask | the alias's mask
                          (outline + translucent fill over the untinted image; each panel's IoU; how an image
                          without the concept is scored; the images a row cap left out), drawn by the pipeline
    curves.png            every category: best objective so far, and the search IoU of that candidate, vs
                          candidate-image evaluations (the label's values at 0)
    curves/<slug>.png     one category's curve: the same two lines and the label's objective and IoU
    summary.png           held-out IoU per category, label vs alias (search IoU when nothing was held out)
    report.json           {"run_dir", "settings", "rows": [summary per category + "overlay"], "mean", "curves"}
    report.html           the same as a page: summary figure, a compact table (label and alias rows per category:
                          IoU, objective, negatives predicted empty, times), the curves, and a collapsible section
                          per category (inline CSS; images linked relatively, so the folder can be moved)

`write_report(run_dir)` only reads the run directory's JSON files and overlay PNGs, so it can be re-run at any
time; overlays are drawn while a category is searched (they need the model's predictions). Figures: figures.py.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

from .figures import (NEGATIVE_RULE, OverlayRow, category_curve_png, curves_png, overlay_png,  # noqa: F401
                      summary_png)
from .io import mean, write_json_atomic
from .model import embedded_tiny_path
from .rundir import IOU_KEYS, RunDir


def _f(x, digits: int = 3) -> str:
    return "&ndash;" if x is None else f"{x:.{digits}f}"


def negative_counts(result: dict) -> dict:
    """{split: {"n", "label_empty", "alias_empty"}} from a result's per-image IoUs: how many of the split's
    negative images (without the concept) each prompt predicts empty on (IoU 1 there exactly then)."""
    out = {}
    for split, per in (result.get("per_image") or {}).items():
        neg = [p for p in per if p["negative"]]
        out[split] = {"n": len(neg), "label_empty": sum(p["label_iou"] == 1.0 for p in neg),
                      "alias_empty": sum(p["alias_iou"] == 1.0 for p in neg)}
    return out


SUMMARY_KEYS = ("category", "slug", "label", "label_ids", "label_iou_search", "label_iou_heldout", "alias_ids",
                "alias_text", "alias_beat_label", "alias_iou_search", "alias_iou_heldout", "objective",
                "negatives_empty", "evals", "seconds", "category_seconds", "n_search", "n_heldout", "overlay",
                "overlay_left_out")


def write_report(run_dir: str | os.PathLike) -> tuple[Path, Path]:
    """curves.png, curves/<slug>.png, summary.png, report.json and report.html of a run directory from its result
    files; returns the JSON and HTML paths."""
    run = RunDir(run_dir)
    settings = run.read_run()["settings"]
    results = run.finished_results()
    rows = [{**{k: r.get(k) for k in SUMMARY_KEYS}, "negatives": negative_counts(r)} for r in results]
    w = settings.get("negative_weight")
    label_obj = lambda r: (r.get("objective") or {}).get("label")  # noqa: E731
    curves_png(run.path / "curves.png", {r["category"]: {"history": r["history"], "label_objective": label_obj(r),
                                                         "label_iou": r["label_iou_search"]} for r in results}, w)
    for r in results:
        r["curve"] = f"curves/{r['slug']}.png"
        category_curve_png(run.path / r["curve"], r["history"], label_obj(r), r["label_iou_search"], w,
                           r["category"])
    split = "held-out" if any(r["label_iou_heldout"] is not None for r in results) or not results else "search"
    key = "heldout" if split == "held-out" else "search"
    summary_png(run.path / "summary.png",
                [(r["category"], r[f"label_iou_{key}"], r[f"alias_iou_{key}"]) for r in results], split)

    doc = {
        "run_dir": str(run.path.resolve()),
        "settings": settings,
        "rows": rows,
        "mean": {k: mean([r[k] for r in rows if r[k] is not None]) for k in IOU_KEYS},
        "curves": "curves.png",
        "summary": {"figure": "summary.png", "split": split},
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
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: left; vertical-align: top; }
td.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
th { background: #f0f0f0; }
th small { font-weight: normal; color: #555; }
code { background: #f4f4f4; padding: 1px 4px; }
td code { word-break: break-all; }
td.txt { max-width: 18em; }
tr.alias td { border-bottom: 2px solid #999; }
td.cat { border-bottom: 2px solid #999; }
img { max-width: 100%; border: 1px solid #ddd; }
.better { color: #0a7d32; font-weight: 600; }
.note { font-size: 13px; color: #444; max-width: 60em; }
details { margin: 0.5em 0 1.5em; }
details.cat { border: 1px solid #ccc; border-radius: 4px; padding: 0.3em 0.8em; margin: 0.4em 0; }
details.cat > summary { cursor: pointer; font-size: 15px; padding: 2px 0; }
details.cat[open] > summary { border-bottom: 1px solid #ddd; margin-bottom: 0.5em; }
.warn { background: #fff4d6; border: 1px solid #e0b84d; padding: 6px 10px; }
"""

# a link to #<slug> opens that category's section
_OPEN_JS = ("<script>function openHash(){var e=document.getElementById(decodeURIComponent(location.hash.slice(1)));"
            "if(e&&e.tagName==='DETAILS'){e.open=true;}}"
            "window.addEventListener('hashchange',openHash);openHash();</script>")


RANDOM_NOTE = ("<p class='warn'>These weights are the embedded tiny model's <b>random</b> weights: the numbers show "
               "that the pipeline runs, not how SAM3 behaves. Use real SAM3 weights (README, 'Using real SAM3 "
               "weights') or a model from <code>jalias train</code>.</p>")


def is_random_tiny(weights: str) -> bool:
    """Whether run.json's weights entry (`model.weights_spec`) names the embedded random tiny checkpoint."""
    return weights == "tiny" or Path(weights).resolve() == embedded_tiny_path().resolve()


def _negatives(c: dict | None):
    """(label, alias, fmt) of a split's negative counts for `_pair`: 'k/n' cells, '-' without negatives."""
    if not c or not c["n"]:
        return None, None, _f
    return c["label_empty"], c["alias_empty"], lambda k: f"{k}/{c['n']}"


def _pair(label, alias, fmt) -> tuple[str, str]:
    """Table cells of a label/alias pair; the alias's is marked when it is better."""
    better = label is not None and alias is not None and alias > label
    return f"<td class='n'>{fmt(label)}</td>", f"<td class='n{' better' if better else ''}'>{fmt(alias)}</td>"


_TABLE_HEAD = ("<table class='results'><tr><th>concept</th><th>prompt</th><th>text</th>"
               "<th>IoU<br><small>search</small></th><th>IoU<br><small>held-out</small></th>"
               "<th>objective<br><small>search</small></th><th>negatives empty<br><small>search</small></th>"
               "<th>negatives empty<br><small>held-out</small></th><th>evals</th><th>search s</th>"
               "<th>category s</th></tr>")


def _table(doc: dict) -> list[str]:
    """Two rows per category (label, alias) so each measure compares vertically; a mean row pair at the end."""
    e = html.escape
    out = [_TABLE_HEAD]
    for r in doc["rows"]:
        obj, neg = r.get("objective") or {}, r.get("negatives") or {}
        cells = [_pair(r["label_iou_search"], r["alias_iou_search"], _f),
                 _pair(r["label_iou_heldout"], r["alias_iou_heldout"], _f),
                 _pair(obj.get("label"), obj.get("alias"), _f),
                 *[_pair(*_negatives(neg.get(k))) for k in ("search", "heldout")]]
        alias = (f"<code>{e(r['alias_text'])}</code>" if r.get("alias_beat_label", True)
                 else "<em>no alias beat the label</em>")
        cat_s = r.get("category_seconds")
        out.append(f"<tr><td class='cat' rowspan='2'><a href='#{e(r['slug'] or r['category'])}'>{e(r['category'])}"
                   f"</a></td><td>label</td><td class='txt'><code>{e(r['label'])}</code></td>"
                   + "".join(c[0] for c in cells)
                   + f"<td class='n cat' rowspan='2'>{r['evals']}</td><td class='n cat' rowspan='2'>"
                   f"{r['seconds']:.1f}</td><td class='n cat' rowspan='2'>{_f(cat_s, 1)}</td></tr>")
        out.append("<tr class='alias'><td>alias</td><td class='txt'>" + alias + "</td>"
                   + "".join(c[1] for c in cells) + "</tr>")
    m = doc["mean"]
    for who in ("label", "alias"):
        out.append(f"<tr><th>{'mean' if who == 'label' else ''}</th><th>{who}</th><th></th>"
                   f"<th class='n'>{_f(m[who + '_iou_search'])}</th><th class='n'>{_f(m[who + '_iou_heldout'])}</th>"
                   + "<th></th>" * 6 + "</tr>")
    out.append("</table>")
    return out


_SPLIT = {"heldout": "held-out"}


def _section(r: dict, is_open: bool) -> list[str]:
    """One category's collapsible section: what was searched, overlay, curve, best candidates."""
    e = html.escape
    slug = r.get("slug") or r["category"]
    held = (f"held-out IoU {_f(r['label_iou_heldout'])} &rarr; {_f(r['alias_iou_heldout'])}"
            if r["label_iou_heldout"] is not None else
            f"search IoU {_f(r['label_iou_search'])} &rarr; {_f(r['alias_iou_search'])}")
    result = "" if r.get("alias_beat_label", True) else " (no alias beat the label)"
    out = [f"<details class='cat' id='{e(slug)}'{' open' if is_open else ''}><summary><b>{e(r['category'])}"
           f"</b>: label <code>{e(r['label'])}</code> &rarr; alias <code>{e(r['alias_text'])}</code>{result}, "
           f"{held}</summary>",
           f"<p>Label <code>{e(r['label'])}</code> (ids {r['label_ids']}) &rarr; alias "
           f"<code>{e(r['alias_text'])}</code> (ids {r['alias_ids']}); {r['n_search']} search and "
           f"{r['n_heldout']} held-out positive images; stopped by {e(str(r.get('stop_reason')))} after "
           f"{r.get('iterations')} iterations and {r['evals']} evaluations; search {r['seconds']:.1f} s of "
           f"{_f(r.get('category_seconds'), 1)} s for the whole category.</p>"]
    left = r.get("overlay_left_out") or []
    if left:
        out.append(f"<p class='warn'>Not in the overlay ({len(left)} images, "
                   f"{e(left[0].get('reason', 'left out'))}): "
                   + ", ".join(f"<code>{e(x['image_id'])}</code> ({e(_SPLIT.get(x['split'], x['split']))}"
                               f"{', negative' if x.get('negative') else ''})" for x in left) + "</p>")
    out.append(f"<img src='{e(r['overlay'])}' alt='overlays of {e(r['category'])}'>")
    if r.get("curve"):
        out.append(f"<br><img src='{e(r['curve'])}' alt='search curve of {e(r['category'])}'>")
    out.append("<details><summary>best candidates</summary><table><tr><th>#</th><th>text</th><th>ids</th>"
               "<th>objective</th><th>search IoU</th></tr>")
    for i, c in enumerate(r.get("candidates", [])):
        out.append(f"<tr><td>{i + 1}</td><td><code>{e(c['text'])}</code></td><td>{c['ids']}</td>"
                   f"<td class='n'>{_f(c['objective'])}</td><td class='n'>{_f(c['train_iou'])}</td></tr>")
    out.append("</table></details></details>")
    return out


def _curves(n: int) -> list[str]:
    img = "<img src='curves.png' alt='best objective and search IoU vs evaluations, every category'>"
    if n <= 8:
        return ["<h2>Search curves</h2>", img]
    # many lines in one plot: folded; each category's own curve is in its section
    return ["<h2>Search curves</h2><details><summary>all " + str(n) + " categories in one plot (each category's "
            "curve is also in its section below)</summary>", img, "</details>"]


def _html(doc: dict, results: list[dict]) -> str:
    e = html.escape
    s = doc["settings"]
    w = s.get("negative_weight", 0.5)
    split = doc["summary"]["split"]
    out = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'><title>jalias report</title>",
           f"<style>{_CSS}</style></head><body>", "<h1>jalias run report</h1>",
           f"<p>Method <b>{e(str(s['method']))}</b>, budget {s['budget']} evaluations per category, "
           f"{s['length']} tokens, seed {s['seed']}, held-out fraction {s['heldout']:.2g}, "
           f"{s['negatives']} negative images per category, prompt mode {e(str(s.get('prompt_mode', 'hf')))}.<br>"
           f"Weights <code>{e(str(s['weights']))}</code>"
           + "".join(f" + adapter <code>{e(str(a))}</code>" for a in s.get("adapters", [])) + ", "
           f"annotations <code>{e(str(s['annotations']))}</code>.</p>",
           *([RANDOM_NOTE] if is_random_tiny(str(s["weights"])) else []),
           *(["<p class='warn'>Left out as unreadable (--skip-bad-images): "
              + ", ".join(f"<code>{e(k)}</code> ({e(v)})" for k, v in doc["skipped_images"].items()) + "</p>"]
             if doc.get("skipped_images") else []),
           f"<h2>Summary: {len(results)} categories</h2>",
           f"<img class='summary' src='{doc['summary']['figure']}' alt='{split} IoU per category, label vs alias'>",
           *_table(doc),
           f"<p class='note'><b>IoU</b>: mean over the positive images (with the concept) of the split. "
           f"<b>objective</b>: what the search maximises on the search images, mean IoU on positives &minus; {w:g} "
           f"&times; mean(1 &minus; IoU) on negatives. <b>negatives empty</b>: of the split's negative images "
           f"(without the concept), on how many the prompt predicts nothing; {NEGATIVE_RULE}, so an alias can "
           f"trade IoU on positives for clean negatives. Green: the alias is higher. <b>search s</b>: wall time of "
           f"the search; <b>category s</b>: the whole category (images, label, search, held-out scoring, "
           f"overlays).</p>",
           *_curves(len(results)),
           "<h2>Categories</h2><p class='note'>Click a category to open it: overlays of every search and held-out "
           "image (or the list of those left out) and its search curve.</p>"]
    for r in results:
        out += _section(r, len(results) <= 3)
    out.append("<p>Files: <a href='report.json'>report.json</a>, <a href='all_results.json'>all_results.json</a>, "
               f"<a href='log.txt'>log.txt</a>.</p>{_OPEN_JS}</body></html>")
    return "\n".join(out)


def read_report(run_dir: str | os.PathLike) -> dict:
    return json.loads((Path(run_dir) / "report.json").read_text())
