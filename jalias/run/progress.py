"""What a run shows: a rich progress bar per category and the results table."""

from __future__ import annotations

import math
import time
from typing import Callable

from .io import fmt


def _best(budget_state: dict) -> str:
    return f"{budget_state['top'][0][2]:.3f}" if budget_state["top"] else "-"


def clock_text(seconds: float | None) -> str:
    """h:mm:ss, or -:--:-- when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-:--:--"
    s = max(0, int(round(seconds)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Throughput:
    """Evaluations/s and the time left of one search, from the evaluations charged so far.

    The clock starts at the first charge seen (the first chunk also pays for compiling, so it only starts the
    clock); rate = evaluations charged since then / seconds between that charge and the latest; eta = (total -
    used) / rate. Both are None until a later chunk has arrived at least `min_seconds` after the first (two
    chunks charged in quick succession say nothing about speed). A drop in `used` (an out-of-memory retry
    resuming from the last checkpoint) restarts the clock.
    """

    def __init__(self, total: int, used: int, clock: Callable[[], float] = time.monotonic,
                 min_seconds: float = 0.5):
        self.total, self.used, self.clock, self.min_seconds = int(total), int(used), clock, float(min_seconds)
        self._first: tuple[float, int] | None = None
        self._last: tuple[float, int] | None = None

    def add(self, used: int) -> None:
        now, used = self.clock(), int(used)
        if self._first is None or used < self.used:
            self._first = (now, used)
        self._last = (now, used)
        self.used = used

    @property
    def rate(self) -> float | None:
        if self._first is None or self._last is None:
            return None
        dt, de = self._last[0] - self._first[0], self._last[1] - self._first[1]
        return de / dt if dt >= self.min_seconds and dt > 0 and de > 0 else None

    @property
    def eta(self) -> float | None:
        rate = self.rate
        return None if rate is None else max(self.total - self.used, 0) / rate


class Progress:
    """Rich progress bar per category: evaluations / budget, best search IoU, evaluations/s, ETA.

    `advance` moves the bar each time the search charges evaluations (`run_search(on_progress=...)`: every
    scored batch and gradient), `update` at every checkpoint (best IoU so far), `finish` fills it to the budget
    when the search ends, whether it spent the whole budget or stopped early (the status says how many
    evaluations it used and why it stopped). The ETA is the evaluations left over the measured evaluations/s.
    """

    def __init__(self, enabled: bool = True, console=None, clock: Callable[[], float] = time.monotonic):
        self.enabled = enabled
        self._bar = None
        self._console = console
        self._clock = clock
        self._speed: dict = {}  # task -> Throughput

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn

            self._bar = RichProgress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("best IoU {task.fields[best]}"), TextColumn("{task.fields[rate]} evals/s"),
                TextColumn("ETA {task.fields[eta]}"), TextColumn("{task.fields[status]}"),
                console=self._console or Console(stderr=True), transient=False)
            self._bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)
        return False

    def start(self, name: str, budget: int, state: dict | None):
        """A bar for one category's search; `state`: the search state it resumes from, or None."""
        if self._bar is None:
            return None
        used = state["budget"]["used"] if state else 0
        best = _best(state["budget"]) if state else "-"
        # until the first step is done (its programs compile then) the bar would look stuck: say why
        task = self._bar.add_task(name, total=budget, completed=used, best=best, rate="-", eta=clock_text(None),
                                  status="compiling / first step...")
        self._speed[task] = Throughput(budget, used, self._clock)
        return task

    def advance(self, task, used: int) -> None:
        """The search has now used `used` evaluations (called per charged chunk)."""
        if self._bar is None or task is None:
            return
        speed = self._speed[task]
        speed.add(used)
        rate = speed.rate
        self._bar.update(task, completed=used, rate="-" if rate is None else f"{rate:.0f}",
                         eta=clock_text(speed.eta))

    def update(self, task, state: dict) -> None:
        """A checkpoint: the first step is done (compiled) and the best so far is known."""
        if self._bar is None or task is None:
            return
        b = state["budget"]
        self.advance(task, b["used"])
        self._bar.update(task, best=_best(b), status="")

    def finish(self, task, used: int, stop_reason: str = "") -> None:
        """The search ended after `used` evaluations: the bar ends at the budget."""
        if self._bar is None or task is None:
            return
        total = self._speed[task].total
        why = f", {stop_reason}" if stop_reason and stop_reason != "budget" else ""
        status = "done" if used >= total else f"done ({used} evals used{why})"
        self._bar.update(task, completed=total, eta=clock_text(0), status=status)

    def stop(self, task) -> None:
        if self._bar is not None and task is not None:
            self._bar.stop_task(task)
        self._speed.pop(task, None)


def _frac(x) -> str:
    return "-" if x is None else f"{x:.2f}"


TABLE_CAPTION = ("IoU: mean over positive images. objective: what the search maximises on the search images (mean "
                 "IoU on positives - w x mean(1 - IoU) on negatives). negatives empty: fraction of the negative "
                 "images (without the concept) predicted empty; such an image scores IoU 1 when the prediction is "
                 "empty, else 0. search s: the search's wall time; category s: the whole category.")


def results_table(summary: dict, title: str | None = None):
    """rich Table of an all_results dict, a label row and an alias row per category: IoU on search and held-out
    images, the search objective, the fraction of negative images predicted empty (search, held-out), evals,
    search seconds and the whole category's seconds."""
    from rich.table import Table

    table = Table(title=title, caption=TABLE_CAPTION)
    right = {"justify": "right"}
    for col, kw in (("concept", {"no_wrap": True}), ("prompt", {}), ("IoU\nsearch", right),
                    ("IoU\nheld-out", right), ("objective\nsearch", right), ("negatives\nempty search", right),
                    ("negatives\nempty held-out", right), ("evals", right), ("search s", right),
                    ("category s", right)):
        table.add_column(col, **kw)
    for name, r in summary["categories"].items():
        alias = repr(r["alias_text"]) if r.get("alias_beat_label", True) else "= label (no alias beat the label)"
        obj, neg = r.get("objective") or {}, r.get("negatives_empty") or {}
        cat_s = r.get("category_seconds")
        for who, text in (("label", repr(r["label"])), ("alias", alias)):
            first = who == "label"
            table.add_row(name if first else "", f"{who} {text}", fmt(r[f"{who}_iou_search"]),
                          fmt(r[f"{who}_iou_heldout"]), fmt(obj.get(who)), _frac(neg.get(f"{who}_search")),
                          _frac(neg.get(f"{who}_heldout")), str(r["evals"]) if first else "",
                          f"{r['seconds']:.1f}" if first else "",
                          ("-" if cat_s is None else f"{cat_s:.1f}") if first else "", end_section=not first)
    return table
