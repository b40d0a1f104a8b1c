"""GCG (greedy coordinate gradient) for aliases.

Each step: gradient of the soft loss w.r.t. the one-hot tokens of the current sequence -> for every position the
top-k allowed tokens with the most negative gradient -> a large batch of candidates, each replacing n_replace
random positions by random top-k tokens -> exact scores of the batch in one call -> move to the batch best (or
only when it improves, with keep_if_better). With `patience`, a walk that has not beaten its own best for that many
steps restarts from random tokens. The result is always the best sequence seen.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from jalias.search.base import Checkpoint, ScoringEngine, SearchConfig, SearchResult, coerce_config
from jalias.search.searchrun import SearchRun


@dataclass
class GCGConfig(SearchConfig):
    search_width: int = 512  # candidates per step
    topk: int = 256  # tokens per position taken from the gradient
    n_replace: int = 1  # positions changed per candidate
    keep_if_better: bool = False  # False: move to the batch best even if worse (as nanoGCG)
    max_steps: Optional[int] = None  # None: until the budget is spent
    patience: Optional[int] = None  # restart from random tokens after this many steps without a new walk best

    def validate(self, engine: ScoringEngine) -> None:
        super().validate(engine)
        if self.search_width < 1 or self.topk < 1:
            raise ValueError(f"search_width and topk must be >= 1, got {self.search_width}, {self.topk}")
        if not 1 <= self.n_replace <= self.length:
            raise ValueError(f"n_replace must be in [1, length={self.length}], got {self.n_replace}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 or None, got {self.patience}")


def top_k_tokens(grad: np.ndarray, allowed_mask: np.ndarray, k: int) -> np.ndarray:
    """int32[L, k'] per position the allowed token ids with the most negative gradient, best first.

    grad: float32[L, V]; allowed_mask: bool[V]; k' = min(k, #allowed). Ties go to the lower id.
    """
    k = min(k, int(allowed_mask.sum()))
    g = np.where(allowed_mask[None, :], grad, np.inf)
    part = np.argpartition(g, k - 1, axis=1)[:, :k]
    # argpartition leaves the k smallest unordered: sort them by (gradient, id) for a deterministic order
    vals = np.take_along_axis(g, part, axis=1)
    order = np.lexsort((part, vals), axis=1)
    return np.take_along_axis(part, order, axis=1).astype(np.int32)


def sample_ids_from_grad(ids: np.ndarray, top: np.ndarray, search_width: int, n_replace: int,
                         rng: np.random.Generator) -> np.ndarray:
    """int32[search_width, L] candidates: ids int32[L] with n_replace distinct random positions each set to a
    random token from that position's row of top int32[L, k]."""
    length, k = top.shape
    cands = np.repeat(ids[None, :], search_width, axis=0)
    positions = np.argsort(rng.random((search_width, length)), axis=1)[:, :n_replace]
    picks = rng.integers(k, size=(search_width, n_replace))
    rows = np.arange(search_width)[:, None]
    cands[rows, positions] = top[positions, picks]
    return cands


def unique_rows(cands: np.ndarray, exclude: np.ndarray) -> np.ndarray:
    """int32[M, L] the distinct rows of cands int32[N, L] in first-seen order, without the row `exclude` int32[L]."""
    _, first = np.unique(cands, axis=0, return_index=True)
    cands = cands[np.sort(first)]
    return cands[~(cands == exclude[None, :]).all(axis=1)]


def run(engine: ScoringEngine, config: Optional[GCGConfig] = None, *,
        on_checkpoint: Optional[Checkpoint] = None, resume_state: Optional[dict] = None,
        on_progress: Optional[Callable[[int], None]] = None) -> SearchResult:
    """GCG on `engine` within config.budget candidate-image evaluations."""
    config = coerce_config(config, GCGConfig, "gcg")
    sr = SearchRun("gcg", engine, config, on_checkpoint, resume_state, on_progress)
    budget, rng = sr.budget, sr.rng

    def start_from(ids: np.ndarray) -> Optional[dict]:
        scored = budget.evaluate(ids[None])
        if not scored.full[0]:
            return None
        obj = float(scored.objective[0])
        return {"ids": ids.tolist(), "objective": obj, "walk_best": obj, "stale": 0}

    st = sr.state
    if st is None:
        st = start_from(sr.initial_ids())
        if st is None:
            return sr.result("budget")
        st.update(step=0, restarts=0)
        sr.checkpoint(st)
    else:  # a checkpoint written before restarts existed
        st.setdefault("walk_best", st["objective"])
        st.setdefault("stale", 0)
        st.setdefault("restarts", 0)

    while True:
        if config.max_steps is not None and st["step"] >= config.max_steps:
            return sr.result("steps")
        # a step is only worth starting if it can pay for the gradient and one fully scored candidate
        if budget.remaining < budget.grad_cost * budget.n_images + budget.n_images:
            return sr.result("budget")
        ids = np.asarray(st["ids"], dtype=np.int32)
        current = np.float32(st["objective"])

        # 1. token gradient -> top-k tokens per position
        grad = budget.grad(ids)
        top = top_k_tokens(grad, sr.allowed_mask, config.topk)

        # 2. a batch of candidates from the top-k tokens, scored exactly
        cands = sample_ids_from_grad(ids, top, config.search_width, config.n_replace, rng)
        cands = unique_rows(cands, ids)
        scored = budget.evaluate(cands)
        best = scored.best_full()

        # 3. move to the batch best
        if best is not None and (not config.keep_if_better or scored.objective[best] > current):
            st.update(ids=cands[best].tolist(), objective=float(scored.objective[best]))
        if st["objective"] > st["walk_best"]:
            st.update(walk_best=st["objective"], stale=0)
        else:
            st["stale"] += 1
        # 4. a walk that stopped improving starts over (the best candidates seen stay in the result)
        if config.patience is not None and st["stale"] >= config.patience:
            fresh = start_from(sr.random_ids())
            if fresh is None:
                return sr.result("budget")
            st.update(fresh)
            st["restarts"] += 1
        st["step"] += 1
        sr.checkpoint(st)
