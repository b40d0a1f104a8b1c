"""The evaluation budget: every exact score (N*k candidate-image evaluations) and every gradient
(engine.grad_cost*k) is charged, a method can never spend more than the budget, and the best candidates and the
history are tracked whenever exact full scores arrive. `Budget.evaluate` adds successive halving on top of
`score`."""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from jalias.search.base import HalvingConfig, ScoringEngine, objective, train_iou
from jalias.search.memo import ScoreMemo

@dataclass
class Scored:
    """Result of Budget.evaluate for N candidates.

    objective float32[N]: exact if full, else on the largest image subset reached (-inf if never scored).
    train_iou float32[N]: exact for full rows, NaN otherwise. rung int32[N]: last halving rung reached (-1 none).
    full bool[N]: scored on all images. refused bool[N]: never scored because `Budget.keep` refused it (not for
    want of budget).
    """

    objective: np.ndarray
    train_iou: np.ndarray
    rung: np.ndarray
    full: np.ndarray
    refused: Optional[np.ndarray] = None

    def __post_init__(self):
        if self.refused is None:
            self.refused = np.zeros(len(self.objective), bool)

    @property
    def unpaid(self) -> np.ndarray:
        """bool[N]: rows left unscored because the budget ran out."""
        return (self.rung < 0) & ~self.refused

    def best_full(self) -> Optional[int]:
        """Index of the best fully scored candidate (first on ties), or None."""
        if not self.full.any():
            return None
        obj = np.where(self.full, self.objective, -np.inf)
        return int(np.argmax(obj))


class Budget:
    """Engine wrapper that charges and caps candidate-image evaluations and keeps the best candidates.

    score(ids[N, L], images) charges N*k; when the remaining budget cannot pay for all rows it scores only the
    first floor(remaining / k) rows and returns those. grad / charge_grad charge engine.grad_cost*k or refuse.
    `top` holds up to keep_top distinct (ids, objective, train_iou), best first; `history` gets
    (used, best_objective, best_train_iou) whenever exact scores on all images arrive.

    With cache_size > 0 a `ScoreMemo` of that many sequences remembers every exact per-image IoU: score() then
    charges (and asks the engine for) only the (sequence, image) pairs it has not seen, a row repeated within
    one call included, and `saved` counts the pairs answered from memory. on_charge(used) is called after every
    charge (each scored batch, each gradient), e.g. to advance a progress bar.
    """

    def __init__(self, engine: ScoringEngine, budget: int, negative_weight: float,
                 halving: HalvingConfig, seed: int, keep_top: int = 10, keep: Optional[Callable] = None,
                 cache_size: int = 0, on_charge: Optional[Callable[[int], None]] = None):
        self.engine = engine
        self.on_charge = on_charge
        self.saved = 0  # candidate-image evaluations answered by the memo instead of the engine
        # keep(ids int32[N, L]) -> bool[N]: candidates worth scoring (e.g. engine.round_trips); others are never
        # charged, never scored by `evaluate`, and never enter `top`
        self.keep = keep
        self.rejected = 0
        self.budget = int(budget)
        self.negative_weight = float(negative_weight)
        self.keep_top = int(keep_top)
        self.n_images = int(engine.n_images)
        if self.n_images < 1:
            raise ValueError("the engine has no images to score on")
        self.is_negative = np.asarray(engine.is_negative, dtype=bool).reshape(-1)
        if self.is_negative.shape[0] != self.n_images:
            raise ValueError(f"engine.is_negative has {self.is_negative.shape[0]} entries for {self.n_images} images")
        self.grad_cost = int(engine.grad_cost)
        self.used = 0
        self.top: list[tuple[tuple[int, ...], float, float]] = []
        self.history: list[tuple[int, float, float]] = []
        self.image_order, self.rungs = halving_plan(self.is_negative, halving, seed)
        self.halving_eta = float(halving.eta)
        self.memo = ScoreMemo(cache_size, self.n_images) if cache_size > 0 else None

    @property
    def remaining(self) -> int:
        return self.budget - self.used

    @property
    def best_objective(self) -> float:
        return self.top[0][1] if self.top else -math.inf

    # ---- raw charged calls ----
    def score(self, ids: np.ndarray, images: Optional[np.ndarray] = None) -> np.ndarray:
        """float32[n, k] exact IoU of the first n <= N rows of ids int32[N, L] that the budget can pay for."""
        ids = np.asarray(ids, dtype=np.int32)
        if ids.ndim != 2:
            raise ValueError(f"ids must be int32[N, L], got shape {ids.shape}")
        k = self.n_images if images is None else int(np.asarray(images).size)
        if k == 0:
            return np.zeros((ids.shape[0], 0), np.float32)
        if self.memo is not None:
            iou = self._score_remembered(ids, images)
            n = iou.shape[0]
        else:
            n = min(ids.shape[0], max(self.remaining, 0) // k)
            if n == 0:
                return np.zeros((0, k), np.float32)
            iou = self._engine_score(ids[:n], images)
            self._charge(n * k)
        if n == 0:
            return iou
        if images is None or np.unique(np.asarray(images)).size == self.n_images:
            if images is not None:  # put columns in engine image order before computing the objective
                full = np.empty_like(iou)
                full[:, np.asarray(images)] = iou
                iou = full
            self._observe(ids[:n], objective(iou, self.is_negative, self.negative_weight),
                          train_iou(iou, self.is_negative))
        return iou

    def _engine_score(self, ids: np.ndarray, images: Optional[np.ndarray]) -> np.ndarray:
        iou = np.asarray(self.engine.score(ids, images), dtype=np.float32)
        k = self.n_images if images is None else int(np.asarray(images).size)
        if iou.shape != (ids.shape[0], k):
            raise ValueError(f"engine.score returned shape {iou.shape}, expected {(ids.shape[0], k)}")
        return iou

    def _charge(self, evals: int, notify: bool = False) -> None:
        self.used += int(evals)
        if self.on_charge is not None and (evals > 0 or notify):
            self.on_charge(self.used)

    def _score_remembered(self, ids: np.ndarray, images: Optional[np.ndarray]) -> np.ndarray:
        """float32[n, k] of the longest prefix of rows whose unremembered (sequence, image) pairs the budget can pay
        for; the engine scores only those pairs (one call per distinct pattern of missing images)."""
        cols = np.arange(self.n_images) if images is None else np.asarray(images, dtype=np.int64).reshape(-1)
        keys = [tuple(r) for r in ids.tolist()]
        iou = self.memo.lookup(keys, cols)
        first: dict[tuple[int, ...], int] = {}
        owner = np.array([first.setdefault(key, i) for i, key in enumerate(keys)], np.int64).reshape(-1)
        missing = np.isnan(iou) & (owner == np.arange(len(keys)))[:, None]  # repeated rows ride on the first
        cost = np.cumsum(missing.sum(axis=1))
        n = int(np.searchsorted(cost, max(self.remaining, 0), side="right"))
        if n == 0:
            return iou[:0]
        iou, missing, owner = iou[:n], missing[:n], owner[:n]
        todo = np.flatnonzero(missing.any(axis=1))
        if todo.size:
            patterns, group = np.unique(missing[todo], axis=0, return_inverse=True)
            for g, pattern in enumerate(patterns):  # usually one: every image, or a halving rung's new ones
                rows = todo[group.reshape(-1) == g]
                asked = None if images is None and pattern.all() else cols[pattern]
                iou[np.ix_(rows, np.flatnonzero(pattern))] = self._engine_score(ids[rows], asked)
        iou = iou[owner]  # repeated rows take their first occurrence's scores
        paid = int(cost[n - 1])
        self.saved += n * cols.size - paid
        self.memo.store(keys[:n], iou, cols)
        self._charge(paid)
        return iou

    def can_grad(self, images: Optional[np.ndarray] = None) -> bool:
        return self.remaining >= self._grad_price(images)

    def charge_grad(self, images: Optional[np.ndarray] = None) -> bool:
        """Charge one gradient (e.g. one value_and_grad of soft_loss); False, charging nothing, if unaffordable."""
        price = self._grad_price(images)
        if self.remaining < price:
            return False
        self._charge(price)
        return True

    def grad(self, ids: np.ndarray, images: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
        """float32[L, V] engine.token_grad of ids int32[L], or None (nothing charged) if unaffordable."""
        price = self._grad_price(images)
        if self.remaining < price:
            return None
        self.used += price  # charged first; on_charge hears of it once the gradient is computed (its time)
        g = self.engine.token_grad(np.asarray(ids, dtype=np.int32), images, negative_weight=self.negative_weight)
        self._charge(0, notify=True)
        return np.asarray(g, dtype=np.float32)

    def _grad_price(self, images) -> int:
        k = self.n_images if images is None else int(np.asarray(images).size)
        return self.grad_cost * k

    # ---- halving-aware evaluation ----
    def halving_active(self, n_candidates: int, min_keep: int = 1) -> bool:
        return len(self.rungs) > 1 and n_candidates > min_keep

    def evaluate(self, ids: np.ndarray, min_keep: int = 1) -> Scored:
        """Score candidates int32[N, L]; with successive halving only the best fraction reaches all images.

        Each rung scores the survivors on the images it adds (nothing is scored twice) and keeps the best
        max(min_keep, ceil(n / eta)) by objective on the images so far. Rows the budget cannot pay for, and rows
        `keep` refuses, stay unscored (rung -1, objective -inf).
        """
        ids = np.asarray(ids, dtype=np.int32)
        if self.keep is None or ids.shape[0] == 0:
            return self._evaluate(ids, min_keep)
        ok = np.asarray(self.keep(ids), bool)
        self.rejected += int((~ok).sum())
        if ok.all():
            return self._evaluate(ids, min_keep)
        part = self._evaluate(ids[ok], min_keep)
        n = ids.shape[0]
        out = Scored(np.full(n, -np.inf, np.float32), np.full(n, np.nan, np.float32), np.full(n, -1, np.int32),
                     np.zeros(n, bool), ~ok)
        for name in ("objective", "train_iou", "rung", "full"):
            getattr(out, name)[ok] = getattr(part, name)
        return out

    def _evaluate(self, ids: np.ndarray, min_keep: int) -> Scored:
        n = ids.shape[0]
        obj = np.full(n, -np.inf, np.float32)
        tr = np.full(n, np.nan, np.float32)
        rung = np.full(n, -1, np.int32)
        last = len(self.rungs) - 1
        if not self.halving_active(n, min_keep):
            iou = self.score(ids)
            m = iou.shape[0]
            obj[:m] = objective(iou, self.is_negative, self.negative_weight)
            tr[:m] = train_iou(iou, self.is_negative)
            rung[:m] = last  # all images at once: the same rung number as a halving survivor
            return Scored(obj, tr, rung, rung == last)

        iou = np.zeros((n, self.n_images), np.float32)
        alive = np.arange(n)
        start = 0
        for r, stop in enumerate(self.rungs):
            new_images = self.image_order[start:stop]
            got = self.score(ids[alive], new_images)
            alive = alive[: got.shape[0]]
            if alive.size == 0:
                break
            iou[np.ix_(alive, new_images)] = got
            seen = self.image_order[:stop]
            obj[alive] = objective(iou[np.ix_(alive, seen)], self.is_negative[seen], self.negative_weight)
            rung[alive] = r
            start = stop
            if r == last:
                # Canonical image order for the exact objective, the same as an unhalved score.
                obj[alive] = objective(iou[alive], self.is_negative, self.negative_weight)
                tr[alive] = train_iou(iou[alive], self.is_negative)
                self._observe(ids[alive], obj[alive], tr[alive])
                break
            keep = max(min_keep, math.ceil(alive.size / self.halving_eta))
            if keep < alive.size:
                best = np.argsort(-obj[alive], kind="stable")[:keep]
                alive = np.sort(alive[best])
        return Scored(obj, tr, rung, rung == last)

    # ---- best-so-far tracking ----
    def _observe(self, ids: np.ndarray, obj: np.ndarray, tr: np.ndarray) -> None:
        """Merge exactly, fully scored rows into `top` (distinct ids, stable on ties) and append to history."""
        worst = self.top[-1][1] if len(self.top) >= self.keep_top else -math.inf
        better = obj > worst
        if self.keep is not None and better.any():  # rows scored through `score` directly (e.g. soft's projection)
            better[better] = np.asarray(self.keep(ids[better]), bool)
        for i in np.flatnonzero(better):
            key = tuple(int(t) for t in ids[i])
            if any(key == t[0] for t in self.top):
                continue
            entry = (key, float(obj[i]), float(tr[i]))
            # bisect on negated objectives: equal objectives keep the earlier candidate first
            pos = bisect.bisect_right([-t[1] for t in self.top], -entry[1])
            self.top.insert(pos, entry)
            del self.top[self.keep_top:]
        if self.top:
            self.history.append((self.used, self.top[0][1], self.top[0][2]))

    # ---- checkpointing ----
    def state_dict(self) -> dict:
        return {
            "used": self.used,
            "rejected": self.rejected,
            "top": [[list(t[0]), t[1], t[2]] for t in self.top],
            "history": [list(h) for h in self.history],
            "saved": self.saved,
            "memo": self.memo.state_dict() if self.memo is not None else None,
        }

    def load_state_dict(self, d: dict) -> None:
        self.used = int(d["used"])
        self.rejected = int(d.get("rejected", 0))
        self.top = [(tuple(int(i) for i in t[0]), float(t[1]), float(t[2])) for t in d["top"]]
        self.history = [(int(h[0]), float(h[1]), float(h[2])) for h in d["history"]]
        self.saved = int(d.get("saved", 0))
        if self.memo is not None and d.get("memo"):  # a state saved without memory resumes with an empty one
            self.memo.load_state_dict(d["memo"])


def halving_plan(is_negative: np.ndarray, h: HalvingConfig, seed: int) -> tuple[np.ndarray, list[int]]:
    """(image order int[K], rung sizes list[int]) for successive halving; a single rung [K] when it is off.

    The order is a seeded shuffle that interleaves negatives among positives, so every prefix has both kinds in
    proportion; it is fixed for the run (derived from the seed only, so resuming needs no extra state).
    """
    k = is_negative.size
    rng = np.random.default_rng([seed, 7919])
    pos = rng.permutation(np.flatnonzero(~is_negative))
    neg = rng.permutation(np.flatnonzero(is_negative))
    keys = np.concatenate([(np.arange(pos.size) + 0.5) / max(pos.size, 1),
                           (np.arange(neg.size) + 0.5) / max(neg.size, 1)])
    order = np.concatenate([pos, neg])[np.argsort(keys, kind="stable")]
    on = h.mode == "on" or (h.mode == "auto" and k >= h.auto_min_images)
    if not on or h.min_images >= k:
        return order, [k]
    rungs, n = [], float(h.min_images)
    while n < k:
        rungs.append(int(n))
        n = max(math.ceil(n * h.eta), int(n) + 1)
    rungs.append(k)
    return order, rungs
