"""What a run shows: a rich progress bar per category and the results table."""

from __future__ import annotations

import time

from .io import fmt


def _best(budget_state: dict) -> str:
    return f"{budget_state['top'][0][2]:.3f}" if budget_state["top"] else "-"


class Progress:
    """Rich progress bar per category: evaluations / budget, best search IoU, evaluations/s, ETA."""

    def __init__(self, enabled: bool = True, console=None):
        self.enabled = enabled
        self._bar = None
        self._console = console

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn
            from rich.progress import TimeRemainingColumn

            self._bar = RichProgress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("best IoU {task.fields[best]}"), TextColumn("{task.fields[rate]} evals/s"),
                TimeRemainingColumn(), TextColumn("{task.fields[status]}"), console=self._console or Console(stderr=True), transient=False)
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
        task = self._bar.add_task(name, total=budget, completed=used, best=best, rate="-",
                                  status="compiling / first step...")
        self._t0, self._used0 = time.monotonic(), used
        return task

    def update(self, task, state: dict) -> None:
        if self._bar is None or task is None:
            return
        b = state["budget"]
        dt = time.monotonic() - self._t0
        rate = f"{(b['used'] - self._used0) / dt:.0f}" if dt > 0 else "-"
        self._bar.update(task, completed=b["used"], best=_best(b), rate=rate, status="")

    def stop(self, task) -> None:
        if self._bar is not None and task is not None:
            self._bar.stop_task(task)


def results_table(summary: dict, title: str | None = None):
    """rich Table of an all_results dict: concept, label, label IoU, alias, alias IoU, evals, seconds."""
    from rich.table import Table

    table = Table(title=title)
    right = {"justify": "right"}
    for col, kw in (("concept", {"no_wrap": True}), ("label", {}), ("label IoU\nsearch / held-out", right),
                    ("alias", {}), ("alias IoU\nsearch / held-out", right), ("evals", right), ("seconds", right)):
        table.add_column(col, **kw)
    for name, r in summary["categories"].items():
        alias = repr(r["alias_text"]) if r.get("alias_beat_label", True) else "no alias beat the label"
        table.add_row(name, r["label"], f"{fmt(r['label_iou_search'])} / {fmt(r['label_iou_heldout'])}",
                      alias, f"{fmt(r['alias_iou_search'])} / {fmt(r['alias_iou_heldout'])}",
                      str(r["evals"]), f"{r['seconds']:.1f}")
    return table
