"""`SearchRun`: the Budget, rng and allowed vocabulary of one search, restored from a checkpoint, handing the loop
state to `on_checkpoint` every iteration and assembling the SearchResult.

Resumption contract: a method's loop state plus the rng state plus the Budget state is all there is; each is
stored as plain JSON types (ints, floats, lists), and the loop reads from the same representation whether it
was just computed or just loaded, so an interrupted-and-resumed run equals an uninterrupted run exactly.
"""
from __future__ import annotations

import json
import time
from typing import Callable, Optional

import numpy as np

from jalias.search.base import Candidate, Checkpoint, ScoringEngine, SearchConfig, SearchResult, detokenize_or_str
from jalias.search.budget import Budget
from jalias.search.vocab import allowed_token_ids, initial_ids, random_ids

STATE_VERSION = 1

class SearchRun:
    """State shared by a method's loop, restorable from a checkpoint.

    Attributes: config, budget (Budget), rng (numpy Generator), allowed (int32[M] proposable ids),
    allowed_mask (bool[V]), state (the method's loop state from resume_state, or None on a fresh start),
    iteration (checkpoints made so far). on_progress(used) is called whenever evaluations are charged (every
    scored batch and gradient, finer than checkpoints), e.g. by a progress bar.
    """

    def __init__(self, method: str, engine: ScoringEngine, config: SearchConfig,
                 on_checkpoint: Optional[Checkpoint] = None, resume_state: Optional[dict] = None,
                 on_progress: Optional[Callable[[int], None]] = None):
        config.validate(engine)
        self.method = method
        self.engine = engine
        self.config = config
        self.on_checkpoint = on_checkpoint
        self.allowed = allowed_token_ids(config, int(engine.vocab_size), engine.special_ids)
        self.allowed_mask = np.zeros(int(engine.vocab_size), bool)
        self.allowed_mask[self.allowed] = True
        self.round_trips = engine.round_trips if config.retokenize else None
        self.budget = Budget(engine, config.budget, config.negative_weight, config.halving, config.seed,
                             config.keep_top, keep=self.round_trips, cache_size=config.cache_size,
                             on_charge=on_progress)
        self.rng = np.random.default_rng(config.seed)
        self.state: Optional[dict] = None
        self.iteration = 0
        self._elapsed_before = 0.0
        self._t0 = time.perf_counter()
        if resume_state is not None:
            self._resume(resume_state)

    def _resume(self, s: dict) -> None:
        if s.get("version") != STATE_VERSION:
            raise ValueError(f"checkpoint version {s.get('version')!r} is not {STATE_VERSION}")
        if s.get("method") != self.method:
            raise ValueError(f"checkpoint is for method {s.get('method')!r}, not {self.method!r}")
        mine = json.loads(json.dumps(self.config.to_dict()))
        saved = dict(s["config"])
        diff = sorted(k for k in set(mine) | set(saved) if k != "budget" and mine.get(k) != saved.get(k))
        if diff:
            raise ValueError(f"checkpoint config differs in: {', '.join(diff)} (only budget may change on resume)")
        self.rng.bit_generator.state = s["rng"]
        self.budget.load_state_dict(s["budget"])
        self.state = s["method_state"]
        self.iteration = int(s["iteration"])
        self._elapsed_before = float(s["elapsed_s"])

    def elapsed(self) -> float:
        return self._elapsed_before + time.perf_counter() - self._t0

    def checkpoint(self, method_state: dict) -> dict:
        """Record the loop state (plain JSON types) and pass the full run state to on_checkpoint; returns it."""
        self.state = method_state
        self.iteration += 1
        if self.on_checkpoint is not None:
            self.on_checkpoint(self.state_dict())
        return method_state

    def state_dict(self) -> dict:
        """Everything needed to resume: JSON-serialisable; copies, so later iterations do not alter it."""
        return {
            "version": STATE_VERSION,
            "method": self.method,
            "config": json.loads(json.dumps(self.config.to_dict())),
            "rng": self.rng.bit_generator.state,
            "budget": self.budget.state_dict(),
            "method_state": json.loads(json.dumps(self.state)),
            "iteration": self.iteration,
            "elapsed_s": self.elapsed(),
        }

    def result(self, stop_reason: str) -> SearchResult:
        best = [Candidate(list(ids), detokenize_or_str(ids), obj, tr) for ids, obj, tr in self.budget.top]
        return SearchResult(
            method=self.method,
            best=best,
            history=list(self.budget.history),
            evals_used=self.budget.used,
            wall_time_s=self.elapsed(),
            config=self.config.to_dict(),
            stop_reason=stop_reason,
            iterations=self.iteration,
            rejected=self.budget.rejected,
            evals_saved=self.budget.saved,
        )

    # ---- starting points ----
    def initial_ids(self) -> np.ndarray:
        """int32[L] a method's first sequence (`vocab.initial_ids`), redrawn while it does not round-trip."""
        return self._drawn(lambda: initial_ids(self.config, self.allowed, self.rng))

    def random_ids(self) -> np.ndarray:
        """int32[L] a fresh random sequence (restarts), redrawn while it does not round-trip."""
        return self._drawn(lambda: random_ids(self.allowed, self.config.length, self.rng))

    def _drawn(self, draw, tries: int = 200) -> np.ndarray:
        ids = draw()
        for _ in range(tries):
            if self.round_trips is None or bool(self.round_trips(ids[None])[0]):
                break
            ids = draw()
        return ids
