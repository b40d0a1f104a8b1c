"""Alias search methods behind one interface (base.py); one file per method, sharing budget.py, vocab.py and
searchrun.py.

    from jalias.search import run_search, SearchConfig
    result = run_search("gcg", engine, SearchConfig(budget=50_000, seed=0))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from jalias.search import evolution, gcg, local, soft
from jalias.search.base import (
    Candidate,
    HalvingConfig,
    ScoringEngine,
    SearchConfig,
    SearchResult,
    objective,
    train_iou,
)
from jalias.search.budget import Budget
from jalias.search.evolution import EvolutionConfig
from jalias.search.gcg import GCGConfig
from jalias.search.local import LocalConfig
from jalias.search.soft import SoftConfig


@dataclass(frozen=True)
class Method:
    name: str
    config_cls: type
    run: Callable[..., SearchResult]


METHODS: dict[str, Method] = {
    "evolution": Method("evolution", EvolutionConfig, evolution.run),
    "local": Method("local", LocalConfig, local.run),
    "gcg": Method("gcg", GCGConfig, gcg.run),
    "soft": Method("soft", SoftConfig, soft.run),
}


def run_search(method: str, engine: ScoringEngine, config: Any = None, *,
               on_checkpoint: Optional[Callable[[dict], None]] = None,
               resume_state: Optional[dict] = None,
               on_progress: Optional[Callable[[int], None]] = None) -> SearchResult:
    """Run one search method by name.

    config: None (defaults), a dict of fields, the method's own config, or a plain SearchConfig (its common
    fields; the method's own fields keep their defaults). on_checkpoint(state) gets a JSON-serialisable dict
    after every iteration; pass such a dict back as resume_state to continue exactly where it was taken.
    on_progress(used) gets the evaluations used so far each time some are charged (every scored batch and
    gradient), e.g. to advance a progress bar between checkpoints.
    """
    if method not in METHODS:
        raise ValueError(f"unknown search method {method!r}; choose from {', '.join(METHODS)}")
    return METHODS[method].run(engine, config, on_checkpoint=on_checkpoint, resume_state=resume_state,
                               on_progress=on_progress)


__all__ = [
    "Budget", "Candidate", "EvolutionConfig", "GCGConfig", "HalvingConfig", "LocalConfig", "METHODS",
    "Method", "ScoringEngine", "SearchConfig", "SearchResult", "SoftConfig", "objective", "run_search", "train_iou",
]
