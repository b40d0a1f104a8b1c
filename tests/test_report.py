"""The run report (jalias/run/report.py, figures.py) and the results table, without a model.

Covers: mask drawing (outline pixels in the column colour at the mask boundary, translucent inside, untouched
outside) in `draw_mask` and in the overlay PNG itself; which images an overlay shows under a row cap; the search
curves (best objective monotone, the IoU of that candidate plotted as its own labelled line); the summary dot
plot; report.html of a synthetic 24-category run (benchmarks/report_screenshot.py): one collapsible section per
category, the summary figure above a table with label and alias rows (IoU, objective, negatives predicted empty,
search and category seconds), the images left out of an overlay named; the CLI's table; and, where chromium is
installed, the page rendered in headless Chromium.
"""

from __future__ import annotations

import importlib.util
import io
import json
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jalias.run import figures
from jalias.run.figures import ALIAS_COLOUR, GT_COLOUR, LABEL_COLOUR, OverlayRow, draw_mask, overlay_png
from jalias.run.pipeline import pick_overlay_rows
from jalias.run.progress import results_table

_BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "report_screenshot.py"
_spec = importlib.util.spec_from_file_location("report_screenshot", _BENCH)
shot = importlib.util.module_from_spec(_spec)
sys.modules["report_screenshot"] = shot
_spec.loader.exec_module(shot)

N_CATEGORIES = 21


def _erode(mask: np.ndarray, width: int) -> np.ndarray:
    from scipy import ndimage
    return ndimage.binary_erosion(mask, iterations=width, border_value=0)


# ---- mask drawing -----------------------------------------------------------------------------------------------
def test_draw_mask_outline_fill_and_untouched_outside():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    mask = np.zeros((40, 50), bool)
    mask[10:30, 5:25] = True
    mask[0:6, 40:50] = True  # touches the image border: its border pixels are outline too
    out = draw_mask(img, mask, (255, 0, 0), alpha=0.35, width=2, halo=(20, 20, 20))
    edge = mask & ~_erode(mask, 2)
    ring = _erode(mask, 2) & ~_erode(mask, 3)  # the dark line just inside the outline
    inside = mask & ~edge & ~ring
    assert edge.sum() > 0 and ring.sum() > 0 and inside.sum() > 0
    assert (out[edge] == (255, 0, 0)).all() and (out[ring] == (20, 20, 20)).all()
    assert (out[~mask] == img[~mask]).all()  # outside the mask: the image, not tinted
    want = np.rint(img[inside] * 0.65 + np.array([255, 0, 0]) * 0.35)
    assert np.abs(out[inside].astype(int) - want).max() <= 1
    assert edge[0, 45] and edge[5, 45] and not edge[3, 45]  # border row of the second block; inside two steps
    assert (draw_mask(img, np.zeros((40, 50), bool), (255, 0, 0)) == img).all()  # empty mask: nothing drawn


def _find(canvas: np.ndarray, panel: np.ndarray, x: int) -> int:
    """Row where `panel` sits in `canvas` at column x."""
    h, w = panel.shape[:2]
    for y in range(canvas.shape[0] - h + 1):
        if np.array_equal(canvas[y:y + h, x:x + w], panel):
            return y
    raise AssertionError("panel not found in the overlay")


def test_overlay_png_draws_masks_over_the_untinted_image(tmp_path):
    y, x = np.mgrid[:64, :64]
    img = np.stack([x * 3, y * 3, 255 - x - y], -1).astype(np.uint8)  # a gradient: every pixel differs
    gt = (np.abs(y - 30) < 12) & (np.abs(x - 28) < 14)
    label = (np.abs(y - 36) < 10) & (np.abs(x - 36) < 10)
    row = OverlayRow(img, gt, label, np.zeros_like(gt), "img_1", "heldout", False, 0.3, 0.0)
    neg = OverlayRow(img, np.zeros_like(gt), np.zeros_like(gt), label, "img_2", "search", True, 1.0, 0.0)
    path = overlay_png(tmp_path / "o.png", [row, neg], "kiwi", "kiwi fruit", left_out=["img_9"])
    canvas = np.asarray(Image.open(path).convert("RGB"))
    p = figures.PANEL
    base = np.asarray(Image.fromarray(img).resize((p, p), Image.BILINEAR))
    xs = [6 + j * (p + 6) for j in range(4)]
    top = _find(canvas, base, xs[0])  # column 1: the image itself, untinted
    second = _find(canvas[top + p:], base, xs[0]) + top + p
    big = lambda m: np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((p, p), Image.NEAREST)) > 127
    for r, y0 in ((row, top), (neg, second)):
        for j, (m, colour) in enumerate(((r.gt, GT_COLOUR), (r.label_mask, LABEL_COLOUR),
                                         (r.alias_mask, ALIAS_COLOUR)), start=1):
            panel = canvas[y0:y0 + p, xs[j]:xs[j] + p]
            mb = big(m)
            edge = mb & ~_erode(mb, figures.OUTLINE)
            ring = _erode(mb, figures.OUTLINE) & ~_erode(mb, figures.OUTLINE + 1)
            assert (panel[edge] == colour).all()  # outline at the mask's boundary, in the column's colour
            assert (panel[ring] == figures.HALO).all()  # then a dark line, for contrast
            assert (panel[~mb] == base[~mb]).all()  # outside the mask: the original image's values
            inside = mb & ~edge & ~ring
            if inside.any():  # translucent: neither the image nor the plain colour
                assert (panel[inside] != base[inside]).any(axis=-1).all()
                assert (panel[inside] != colour).any(axis=-1).all()
    # an empty prediction leaves the image as it is (alias of the first row, label and GT of the negative)
    assert (canvas[top:top + p, xs[3]:xs[3] + p] == base).all()
    assert (canvas[second:second + p, xs[1]:xs[1] + p] == base).all()


def test_overlay_rows_all_images_or_a_fair_cap():
    splits = [np.array([False] * 5 + [True] * 2), np.array([False] * 3 + [True])]
    shown, left = pick_overlay_rows(splits, 24)
    assert left == [] and len(shown) == 11
    assert shown == [(0, i) for i in range(7)] + [(1, i) for i in range(4)]  # split order, positives first
    shown, left = pick_overlay_rows(splits, 6)
    # round-robin over (search positives, search negatives, held-out positives, held-out negatives)
    assert shown == [(0, 0), (0, 1), (0, 5), (0, 6), (1, 0), (1, 3)]
    assert left == [(0, 2), (0, 3), (0, 4), (1, 1), (1, 2)]
    assert pick_overlay_rows(splits, 2) == ([(0, 0), (0, 5)], [(0, 1), (0, 2), (0, 3), (0, 4), (0, 6),
                                                               (1, 0), (1, 1), (1, 2), (1, 3)])


# ---- plots ------------------------------------------------------------------------------------------------------
HISTORY = [[10, 0.10, 0.20], [40, 0.25, 0.35], [90, 0.22, 0.30], [120, 0.40, 0.18], [200, 0.45, 0.50]]


def test_search_curves_plot_best_objective_monotone_and_iou_separately():
    import matplotlib.pyplot as plt

    ev, best, iou = figures.curve_series(HISTORY)
    assert list(best) == [0.10, 0.25, 0.25, 0.40, 0.45]  # a running maximum, whatever the rows say
    assert list(iou) == [0.20, 0.35, 0.30, 0.18, 0.50]  # the IoU of the best-objective candidate: it may fall
    fig = figures.curves_figure({"kiwi": {"history": HISTORY, "label_objective": 0.05, "label_iou": 0.12},
                                 "okapi": {"history": HISTORY[:2], "label_objective": None, "label_iou": 0.3}}, 0.5)
    ax_o, ax_i = fig.axes[:2]
    assert "objective" in ax_o.get_title() and "0.5" in ax_o.get_title() and "objective" in ax_o.get_ylabel()
    assert "IoU" in ax_i.get_title() and "IoU" in ax_i.get_ylabel() and "evaluations" in ax_i.get_xlabel()
    curves = [ln for ln in ax_o.get_lines() if ln.get_label() == "kiwi"]
    assert len(curves) == 1 and np.all(np.diff(curves[0].get_ydata()) >= 0)
    iou_line = [ln for ln in ax_i.get_lines() if ln.get_label() == "kiwi"][0]
    assert np.any(np.diff(iou_line.get_ydata()) < 0)  # the IoU line is its own line and shows the drop
    markers = [ln for ln in ax_o.get_lines() if list(ln.get_xdata()) == [0]]
    assert [list(m.get_ydata()) for m in markers] == [[0.05]]  # the label's objective at 0 evaluations
    assert [t.get_text() for t in ax_o.get_legend().get_texts()] == ["kiwi", "okapi"]
    plt.close(fig)

    fig = figures.category_curve_figure(HISTORY, 0.05, 0.12, 0.5, "kiwi")
    ax = fig.axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert set(lines) == {"alias: best objective so far", "alias: search IoU of that candidate",
                          "label: objective", "label: search IoU"}
    assert np.all(np.diff(lines["alias: best objective so far"].get_ydata()) >= 0)
    assert list(lines["label: objective"].get_ydata()) == [0.05, 0.05]
    assert "kiwi" in ax.get_title() and "objective" in ax.get_title()
    plt.close(fig)


def test_summary_plot_places_label_and_alias_per_category():
    import matplotlib.pyplot as plt

    rows = [("kiwi", 0.1, 0.5), ("okapi", 0.4, 0.4), ("olm", None, None)]
    fig = figures.summary_figure(rows)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["kiwi", "okapi", "olm (n/a)"]
    pts = {c.get_label(): c.get_offsets().tolist() for c in ax.collections}
    assert pts == {"label": [[0.1, 2], [0.4, 1]], "alias": [[0.5, 2], [0.4, 1]]}  # first category at the top
    assert "held-out" in ax.get_xlabel() and "label vs alias" in ax.get_title()
    plt.close(fig)


# ---- report.html ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return shot.synthetic_run(tmp_path_factory.mktemp("report") / "run", N_CATEGORIES, seed=0)


class _Page(HTMLParser):
    """Tags of a page: details (id, open), img src, table rows with their cells' text."""

    def __init__(self):
        super().__init__()
        self.details, self.imgs, self.rows, self.order = [], [], [], []
        self._cell = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "details" and a.get("class") == "cat":
            self.details.append((a.get("id"), "open" in a))
            self.order.append(("details", a.get("id")))
        elif tag == "img":
            self.imgs.append(a["src"])
            self.order.append(("img", a["src"]))
        elif tag == "table":
            self.order.append(("table", a.get("class")))
        elif tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append(self._cell.strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def test_report_html_is_collapsible_with_a_summary_figure(synthetic):
    out = synthetic
    page = _Page()
    page.feed((out / "report.html").read_text())
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert len(rows) == N_CATEGORIES
    # one collapsible section per category, closed at 20+ categories, ids the table links to
    assert page.details == [(r["slug"], False) for r in rows]
    links = re.findall(r"href='#([^']+)'", (out / "report.html").read_text())
    assert links == [r["slug"] for r in rows]
    # the summary figure first, then the results table, then the sections
    kinds = [k for k, _ in page.order]
    assert page.order[0] == ("img", "summary.png") and kinds.index("table") < kinds.index("details")
    for src in page.imgs:
        assert (out / src).is_file(), src
    assert {f"curves/{r['slug']}.png" for r in rows} <= set(page.imgs)  # each section has its own curve
    assert {r["overlay"] for r in rows} <= set(page.imgs)
    # the table: a label and an alias row per category with IoU, objective, negatives empty and both times
    head = page.rows[0]
    assert head[:3] == ["concept", "prompt", "text"] and head[-3:] == ["evals", "search s", "category s"]
    assert any(h.startswith("objective") for h in head) and sum(h.startswith("negatives empty") for h in head) == 2
    r0 = rows[0]
    label_row, alias_row = page.rows[1], page.rows[2]
    assert label_row[:3] == [r0["category"], "label", r0["label"]] and alias_row[0] == "alias"
    assert label_row[3:6] == [f"{r0['label_iou_search']:.3f}", f"{r0['label_iou_heldout']:.3f}",
                              f"{r0['objective']['label']:.3f}"]
    assert alias_row[2:5] == [f"{r0['alias_iou_search']:.3f}", f"{r0['alias_iou_heldout']:.3f}",
                              f"{r0['objective']['alias']:.3f}"]
    neg = r0["negatives"]["search"]
    assert label_row[6] == f"{neg['label_empty']}/{neg['n']}" and alias_row[5] == f"{neg['alias_empty']}/{neg['n']}"
    assert label_row[-2:] == [f"{r0['seconds']:.1f}", f"{r0['category_seconds']:.1f}"]


def test_report_names_the_images_left_out_of_an_overlay(synthetic):
    out = synthetic
    text = (out / "report.html").read_text()
    capped = [r for r in json.loads((out / "report.json").read_text())["rows"] if r["overlay_left_out"]]
    assert len(capped) == 1 and len(capped[0]["overlay_left_out"]) == 8
    section = text[text.index(f"id='{capped[0]['slug']}'"):]
    section = section[:section.index("</details>")]
    assert "Not in the overlay (8 images, the overlay shows at most 24 images)" in section
    for x in capped[0]["overlay_left_out"]:
        assert f"<code>{x['image_id']}</code> ({x['split'].replace('heldout', 'held-out')}" in section
    full = json.loads((out / f"{capped[0]['slug']}.json").read_text())
    every = {p["image_id"] for split in full["per_image"].values() for p in split}
    assert len(every) == 32  # 24 shown + 8 named


def test_results_table_shows_objective_negatives_and_both_times(synthetic):
    from rich.console import Console

    summary = json.loads((synthetic / "all_results.json").read_text())
    console = Console(record=True, width=200, file=io.StringIO())
    console.print(results_table(summary, "t"))
    text = console.export_text()
    for word in ("objective", "negatives", "empty search", "empty held-out", "search s", "category s"):
        assert word in text, word
    name, r = next(iter(summary["categories"].items()))
    line = next(ln for ln in text.splitlines() if name in ln and "label" in ln)
    assert f"{r['objective']['label']:.3f}" in line and f"{r['category_seconds']:.1f}" in line
    assert f"{r['seconds']:.1f}" in line and f"{r['negatives_empty']['label_search']:.2f}" in line
    alias_line = text.splitlines()[text.splitlines().index(line) + 1]
    assert "alias" in alias_line and f"{r['objective']['alias']:.3f}" in alias_line


def test_report_renders_in_headless_chromium(synthetic, tmp_path):
    if shot.chromium() is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); CI does not install it")
    png = shot.screenshot((synthetic / "report.html").resolve().as_uri(), tmp_path / "page.png", 1400, 1600)
    a = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert a.shape == (1600, 1400, 3)
    # the summary figure's label and alias markers are on screen (the page rendered, its images loaded)
    colour = lambda c: (np.abs(a - np.array(c)).sum(-1) < 30).sum()
    assert colour((0xf0, 0x8c, 0x14)) > 200 and colour((0x28, 0x78, 0xff)) > 200
