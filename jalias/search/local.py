"""Greedy coordinate search.

Pick a position (cycling, or at random), try many replacement tokens there in one batched exact score, keep the
best if it improves the current sequence; after a whole sweep of positions without improvement, restart from
random tokens (the best candidates found so far stay in the result).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from jalias.search.base import Checkpoint, ScoringEngine, SearchConfig, SearchResult, coerce_config
from jalias.search.searchrun import SearchRun


@dataclass
class LocalConfig(SearchConfig):
    n_candidates: int = 512  # replacement tokens tried per step, all scored in one call
    order: str = "cycle"  # 'cycle' | 'random' position order
    restart: bool = True  # restart from random tokens after a full sweep without improvement
    max_steps: Optional[int] = None  # None: until the budget is spent

    def validate(self, engine: ScoringEngine) -> None:
        super().validate(engine)
        if self.n_candidates < 1:
            raise ValueError(f"n_candidates must be >= 1, got {self.n_candidates}")
        if self.order not in ("cycle", "random"):
            raise ValueError(f"order must be 'cycle' or 'random', got {self.order!r}")


def position_candidates(ids: np.ndarray, pos: int, allowed: np.ndarray, n: int,
                        rng: np.random.Generator) -> np.ndarray:
    """int32[M, L] copies of ids int32[L] with position pos replaced by M = min(n, #other tokens) distinct
    allowed tokens other than ids[pos], drawn at random (all of them when there are at most n)."""
    others = allowed[allowed != ids[pos]]
    if others.size > n:
        others = others[rng.choice(others.size, size=n, replace=False)]
    cands = np.repeat(ids[None, :], others.size, axis=0)
    cands[:, pos] = others
    return cands


def run(engine: ScoringEngine, config: Optional[LocalConfig] = None, *,
        on_checkpoint: Optional[Checkpoint] = None, resume_state: Optional[dict] = None,
        on_progress: Optional[Callable[[int], None]] = None) -> SearchResult:
    """Greedy coordinate search on `engine` within config.budget candidate-image evaluations."""
    config = coerce_config(config, LocalConfig, "local")
    sr = SearchRun("local", engine, config, on_checkpoint, resume_state, on_progress)
    budget, rng, allowed = sr.budget, sr.rng, sr.allowed
    length = config.length
    exhaustive = allowed.size - 1 <= config.n_candidates  # every replacement is tried at each step

    def start_from(ids: np.ndarray) -> Optional[dict]:
        scored = budget.evaluate(ids[None])
        if not scored.full[0]:
            return None
        return {"ids": ids.tolist(), "objective": float(scored.objective[0]), "position": 0, "stuck": 0}

    st = sr.state
    if st is None:
        st = start_from(sr.initial_ids())
        if st is None:
            return sr.result("budget")
        st.update(step=0, restarts=0)
        sr.checkpoint(st)

    while True:
        if config.max_steps is not None and st["step"] >= config.max_steps:
            return sr.result("steps")
        if budget.remaining < budget.n_images:
            return sr.result("budget")
        ids = np.asarray(st["ids"], dtype=np.int32)
        current = np.float32(st["objective"])

        # 1. position to change
        if config.order == "cycle":
            pos = st["position"]
            st["position"] = (pos + 1) % length
        else:
            pos = int(rng.integers(length))

        # 2. all replacements at that position in one batch, exactly scored
        cands = position_candidates(ids, pos, allowed, config.n_candidates, rng)
        if cands.shape[0] == 0:
            return sr.result("vocabulary")
        scored = budget.evaluate(cands)
        best = scored.best_full()

        # 3. keep the best if it improves; restart (or stop) after a sweep without improvement
        if best is not None and scored.objective[best] > current:
            st.update(ids=cands[best].tolist(), objective=float(scored.objective[best]), stuck=0)
        else:
            st["stuck"] += 1
        if st["stuck"] >= length:
            if config.restart:
                fresh = start_from(sr.random_ids())
                if fresh is None:
                    return sr.result("budget")
                st.update(fresh)
                st["restarts"] += 1
            elif exhaustive:
                return sr.result("converged")
        st["step"] += 1
        sr.checkpoint(st)
