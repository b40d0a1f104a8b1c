"""The report's figures: overlay grids, search curves and the label-vs-alias summary plot (PNG files).

    overlay_png       a row per image: image | ground truth | label's mask | alias's mask. Masks are drawn over
                      the untinted image as an outline (the mask's boundary pixels in the column's colour, a dark
                      line just inside) plus a translucent fill; pixels outside a mask keep the image's values. Each prediction panel says
                      its IoU (and "empty" for an empty prediction); the header says how an image without the
                      concept is scored, the footer names the images a row cap left out.
    curves_png        all categories: best objective so far (monotone) and, below it, the mean IoU on the
                      positive search images of that best-objective candidate; the label's values at 0 evaluations
    category_curve_png  one category: the same two lines on one axes plus the label's objective and IoU
    summary_png       held-out IoU per category, label vs alias (a dot plot)

matplotlib figures are built by `*_figure` functions (tests read their lines) and saved atomically.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

PANEL = 192  # panel height in pixels
GT_COLOUR = (40, 200, 80)
LABEL_COLOUR = (240, 140, 20)
ALIAS_COLOUR = (40, 120, 255)
FILL_ALPHA = 0.35  # fill: image * (1 - alpha) + colour * alpha inside the mask
OUTLINE = 2  # outline width in panel pixels
HALO = (20, 20, 20)  # a 1-pixel dark line just inside the outline: visible on a background of the mask's colour
NEGATIVE_RULE = "an image without the concept (negative) scores IoU 1 when the prediction is empty, else 0"
_MPL = {"label": "#f08c14", "alias": "#2878ff"}


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


# ---- overlays ---------------------------------------------------------------------------------------------------
def mask_outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """bool[H, W]: the pixels of `mask` within `width` steps (4-neighbourhood) of a pixel outside it or of the
    image border."""
    mask = np.asarray(mask, bool)
    inner = mask.copy()
    for _ in range(max(1, int(width))):
        p = np.pad(inner, 1, constant_values=False)
        inner = inner & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~inner


def draw_mask(image: np.ndarray, mask: np.ndarray, colour: Sequence[int], alpha: float = FILL_ALPHA,
              width: int = OUTLINE, halo: Sequence[int] | None = HALO) -> np.ndarray:
    """uint8[H, W, 3]: `mask` bool[H, W] drawn over `image`: its outline (the `width` pixels at its boundary) set
    to `colour`, then (unless halo is None) the next pixel inwards set to `halo`, the rest of its inside blended
    towards `colour` by `alpha`; every pixel outside the mask unchanged."""
    mask = np.asarray(mask, bool)
    out = np.array(image, np.uint8, copy=True)
    edge = mask_outline(mask, width)
    ring = mask_outline(mask, width + 1) & ~edge if halo is not None else np.zeros_like(mask)
    fill = mask & ~edge & ~ring
    c = np.asarray(colour, np.float32)
    out[fill] = np.clip(np.rint(out[fill].astype(np.float32) * (1 - alpha) + c * alpha), 0, 255).astype(np.uint8)
    out[edge] = np.asarray(colour, np.uint8)
    if halo is not None:
        out[ring] = np.asarray(halo, np.uint8)
    return out


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType support
        return ImageFont.load_default()


def _resized(img: np.ndarray, height: int) -> np.ndarray:
    """uint8[height, w, 3] (bilinear) of an image, or bool[height, w] (nearest) of a mask."""
    from PIL import Image

    h, w = img.shape[:2]
    size = (max(1, round(w * height / h)), height)
    if img.dtype == bool:
        return np.asarray(Image.fromarray(img.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127
    return np.asarray(Image.fromarray(img).resize(size, Image.BILINEAR))


def _fit(draw, text: str, font, width: int) -> str:
    """Cut text with an ellipsis so it fits in `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def overlay_panels(r: OverlayRow, height: int = PANEL) -> list[np.ndarray]:
    """The four panels of a row at `height`: image, ground truth, label's mask, alias's mask (uint8[h, w, 3])."""
    base = _resized(np.asarray(r.image, np.uint8), height)
    masks = [(r.gt, GT_COLOUR), (r.label_mask, LABEL_COLOUR), (r.alias_mask, ALIAS_COLOUR)]
    return [base] + [draw_mask(base, _resized(np.asarray(m, bool), height), c) for m, c in masks]


def overlay_png(path: str | os.PathLike, rows: Sequence[OverlayRow], label: str, alias: str,
                left_out: Sequence[str] = ()) -> Path:
    """Draw the overlay grid to `path` (header: column titles and how masks and negatives are shown; a row per
    image; footer: the image ids in `left_out`, if any); returns it."""
    from PIL import Image, ImageDraw

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    font, small = _font(15), _font(13)
    gap, line = 6, 16
    panels = [overlay_panels(r) for r in rows]
    pw = max([p[0].shape[1] for p in panels] or [PANEL])
    width = 4 * pw + 5 * gap
    notes = ["Masks: outline (with a dark inner line) + translucent fill over the original image.",
             f"Scoring: {NEGATIVE_RULE}; IoU shown per panel."]
    foot = [f"Not shown ({len(left_out)} images, row cap; listed in the report): " + ", ".join(left_out)] \
        if left_out else []
    head = 22 + line * len(notes) + 4
    cap = 2 * line + 2
    height = head + len(rows) * (cap + PANEL + gap) + gap + line * len(foot)
    canvas = Image.new("RGB", (width, height), (250, 250, 250))
    draw = ImageDraw.Draw(canvas)
    titles = ["image", "ground truth", f"label: {label}", f"alias: {alias}"]
    colours = [(30, 30, 30), (20, 140, 50), (190, 100, 0), (20, 80, 210)]
    for j, (t, c) in enumerate(zip(titles, colours)):
        draw.text((gap + j * (pw + gap), 4), _fit(draw, t, font, pw), fill=c, font=font)
    for k, n in enumerate(notes):
        draw.text((gap, 22 + k * line), _fit(draw, n, small, width - 2 * gap), fill=(70, 70, 70), font=small)
    y = head
    for r, ps in zip(rows, panels):
        kind = "negative: the concept is not in the image" if r.negative else "positive"
        split = {"heldout": "held-out"}.get(r.split, r.split)
        draw.text((gap, y + 1), _fit(draw, f"{r.image_id}  ({split} image, {kind})", small, width - 2 * gap),
                  fill=(20, 20, 20), font=small)
        tags = ["", "empty (no concept)" if not np.any(r.gt) else ""]
        for iou, m in ((r.label_iou, r.label_mask), (r.alias_iou, r.alias_mask)):
            empty = not np.any(m)
            tags.append(f"IoU {iou:.3f}" + ("  (empty prediction)" if empty else
                                            "  (predicts something)" if r.negative else ""))
        for j, t in enumerate(tags):
            if t:
                draw.text((gap + j * (pw + gap), y + 1 + line), _fit(draw, t, small, pw), fill=(60, 60, 60),
                          font=small)
        y += cap
        for j, p in enumerate(ps):
            canvas.paste(Image.fromarray(p), (gap + j * (pw + gap), y))
        y += PANEL + gap
    for n in foot:
        draw.text((gap, y), _fit(draw, n, small, width - 2 * gap), fill=(150, 60, 0), font=small)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    canvas.save(tmp)
    os.replace(tmp, path)
    return path


# ---- plots ------------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, format="png")
    _plt().close(fig)
    os.replace(tmp, path)
    return path


def curve_series(history) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(evaluations, best objective so far, search IoU of the best-objective candidate) of a result's history
    rows [evals, best_objective, best_train_iou]. The best objective is made a running maximum (it already is
    for an uninterrupted search); the IoU is the one recorded with that candidate and can fall."""
    h = np.asarray(history, np.float64).reshape(-1, 3)
    return h[:, 0], np.maximum.accumulate(h[:, 1]) if len(h) else h[:, 1], h[:, 2]


def _objective_text(negative_weight: float | None) -> str:
    w = "w" if negative_weight is None else f"{negative_weight:g}"
    return f"objective = mean IoU on positives - {w} x mean(1 - IoU) on negatives"


def curves_figure(curves: dict[str, dict], negative_weight: float | None = None):
    """curves: name -> {"history", "label_objective", "label_iou"}: two panels sharing the x axis (best objective
    so far; search IoU of that candidate), a colour per category, the label's values as hollow circles at 0."""
    plt = _plt()
    n = len(curves)
    fig, (ax_o, ax_i) = plt.subplots(2, 1, sharex=True, figsize=(10 if n > 8 else 8, 6.4), dpi=100)
    cmap = plt.get_cmap("tab20" if n > 10 else "tab10")
    for k, (name, c) in enumerate(curves.items()):
        colour = cmap(k % cmap.N)
        ev, best, iou = curve_series(c["history"])
        if len(ev):
            ax_o.step(ev, best, where="post", color=colour, label=name)
            ax_i.step(ev, iou, where="post", color=colour, label=name)
        for ax, key in ((ax_o, "label_objective"), (ax_i, "label_iou")):
            if c.get(key) is not None:
                ax.plot([0], [c[key]], "o", mfc="none", color=colour, ms=7)
    ax_o.set_title(f"Best objective so far on the search images ({_objective_text(negative_weight)})", fontsize=9)
    ax_o.set_ylabel("best objective so far")
    ax_i.set_title("Mean IoU on the positive search images of the best-objective candidate "
                   "(can fall: a candidate cleaner on negatives may lead)", fontsize=9)
    ax_i.set_ylabel("search IoU (positives)")
    ax_i.set_xlabel("candidate-image evaluations (o at 0: the label)")
    for ax in (ax_o, ax_i):
        ax.grid(alpha=0.3)
    if n:
        ax_o.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 if n <= 14 else 2,
                    title="category", title_fontsize=8)
    fig.tight_layout()
    return fig


def curves_png(path: str | os.PathLike, curves: dict[str, dict], negative_weight: float | None = None) -> Path:
    return _save(curves_figure(curves, negative_weight), path)


def category_curve_figure(history, label_objective: float | None, label_iou: float | None,
                          negative_weight: float | None = None, title: str = ""):
    """One category's search: best objective so far (solid), the search IoU of that candidate (dotted), and the
    label's objective and IoU (dashed horizontal lines), each labelled."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.8), dpi=100)
    ev, best, iou = curve_series(history)
    ax.step(ev, best, where="post", color="#1f4e9c", lw=2, label="alias: best objective so far")
    ax.step(ev, iou, where="post", color="#2ca02c", lw=1.8, ls=":", zorder=3,  # on top: visible when equal
            label="alias: search IoU of that candidate")
    if label_objective is not None:
        ax.axhline(label_objective, color="#d07000", lw=1.3, ls="--", label="label: objective")
    if label_iou is not None:
        ax.axhline(label_iou, color="#d07000", lw=1, ls="-.", label="label: search IoU")
    ax.set_xlabel("candidate-image evaluations")
    ax.set_ylabel("value on the search images")
    what = f"search curve on the search images\n{_objective_text(negative_weight)}; IoU: mean over positives"
    ax.set_title(f"{title}: {what}" if title else what, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=4, frameon=False)
    fig.tight_layout()
    return fig


def category_curve_png(path: str | os.PathLike, history, label_objective: float | None, label_iou: float | None,
                       negative_weight: float | None = None, title: str = "") -> Path:
    return _save(category_curve_figure(history, label_objective, label_iou, negative_weight, title), path)


def summary_figure(rows: Sequence[tuple[str, float | None, float | None]], split: str = "held-out"):
    """rows: (category, label IoU, alias IoU) in table order: a dot plot, label and alias joined by a line, one
    line of the y axis per category (first at the top); categories without values are listed as 'n/a'."""
    plt = _plt()
    n = len(rows)
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.28 * max(n, 1)), dpi=100)
    y = np.arange(n)[::-1]
    for yi, (_, a, b) in zip(y, rows):
        if a is not None and b is not None:
            ax.plot([a, b], [yi, yi], color="#bbbbbb", lw=2, zorder=1)
    for key, k, style in (("label", 1, {"marker": "o", "s": 70, "facecolors": "none", "linewidths": 1.8}),
                          ("alias", 2, {"marker": "D", "s": 30})):
        pts = [(v[k], yi) for yi, v in zip(y, rows) if v[k] is not None]
        if pts:  # the label's hollow circle stays visible around the alias's diamond when they are equal
            ax.scatter(*zip(*pts), edgecolors=_MPL[key], color=_MPL[key], zorder=2 if k == 2 else 3, label=key,
                       **style)
    ax.set_yticks(y, [name if a is not None or b is not None else f"{name} (n/a)" for name, a, b in rows],
                  fontsize=8)
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlim(-0.02, 1.02)
    ax.set_xlabel(f"mean IoU on the positive {split} images")
    ax.set_title(f"{split.capitalize()} IoU per category: label vs alias", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right" if n > 3 else "best")
    fig.tight_layout()
    return fig


def summary_png(path: str | os.PathLike, rows, split: str = "held-out") -> Path:
    return _save(summary_figure(rows, split), path)
