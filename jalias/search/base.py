"""What every alias search method shares: the engine protocol, the objective, the evaluation budget, the
vocabulary filter, configs/results and checkpointing.

A method file (evolution.py, local.py, gcg.py, soft.py) defines `XConfig(SearchConfig)` and
`run(engine, config, *, on_checkpoint=None, resume_state=None) -> SearchResult`, and its `run` reads as the
algorithm. Everything else lives here:

- `Budget` wraps the engine and charges every exact score (N*k candidate-image evaluations) and every gradient
  (GRAD_COST*k); it never lets a method spend more than the budget, and it tracks the best candidates and the
  history whenever exact full scores arrive. `Budget.evaluate` adds successive halving on top of `score`.
- `SearchRun` builds the Budget, rng and allowed vocabulary for one run, restores them from a checkpoint, hands
  the loop state to `on_checkpoint` every iteration and assembles the SearchResult.

Resumption contract: a method's loop state plus the rng state plus the Budget state is all there is; each is
stored as plain JSON types (ints, floats, lists), and the loop reads from the same representation whether it
was just computed or just loaded, so an interrupted-and-resumed run equals an uninterrupted run exactly.
"""
from __future__ import annotations

import bisect
import dataclasses
import inspect
import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence, runtime_checkable

import numpy as np

GRAD_COST = 3  # a forward+backward pass costs about three forward passes
CLIP_SPECIAL_IDS = (49406, 49407)  # <|startoftext|>, <|endoftext|> (also CLIP's padding id)
STATE_VERSION = 1

Checkpoint = Callable[[dict], None]


@runtime_checkable
class ScoringEngine(Protocol):
    """What a search method needs from an engine (the real one lives in jalias/engine/, a toy in toy.py).

    Optional extras used when present: `special_ids` (ids never to propose, besides CLIP's start/end ids),
    `GRAD_COST` (default 3), a `negative_weight=` keyword on token_grad / soft_loss (the search passes its own),
    and `soft_loss_and_grad(embeds, images=None, negative_weight=None) -> (loss, grad[L, D])` (used by soft.py
    instead of jitting soft_loss itself).
    """

    n_images: int
    is_negative: np.ndarray  # bool[K]
    vocab_size: int
    max_length: int
    embedding_table: Any  # jnp float32[V, D]

    def score(self, ids: np.ndarray, images: Optional[np.ndarray] = None) -> np.ndarray:
        """float32[N, k] exact IoU of content-token candidates int32[N, L] on the selected images."""
        ...

    def token_grad(self, ids: np.ndarray, images: Optional[np.ndarray] = None) -> np.ndarray:
        """float32[L, V] gradient of the soft loss w.r.t. the one-hot encoding of ids int32[L]."""
        ...

    def soft_loss(self, embeds: Any, images: Optional[np.ndarray] = None) -> Any:
        """jnp scalar soft loss (lower is better) of continuous embeddings float32[L, D]."""
        ...


# --- objective --------------------------------------------------------------------------------------------------

def objective(iou: np.ndarray, is_negative: np.ndarray, negative_weight: float) -> np.ndarray:
    """float32[N] objective of candidates from their IoU float32[N, k] on k images (is_negative bool[k]).

    mean IoU over positive images - negative_weight * mean(1 - IoU) over negative images (IoU on a negative image
    is 1 when the prediction is empty); a missing kind of image contributes 0.
    """
    iou = np.asarray(iou, dtype=np.float32)
    neg = np.asarray(is_negative, dtype=bool)
    if iou.ndim != 2 or iou.shape[1] != neg.shape[0]:
        raise ValueError(f"iou must be [N, k] with k = len(is_negative) = {neg.shape[0]}, got {iou.shape}")
    out = np.zeros(iou.shape[0], np.float32)
    if (~neg).any():
        out += iou[:, ~neg].mean(axis=1)
    if neg.any():
        out -= np.float32(negative_weight) * (1.0 - iou[:, neg]).mean(axis=1)
    return out.astype(np.float32)


def train_iou(iou: np.ndarray, is_negative: np.ndarray) -> np.ndarray:
    """float32[N] mean IoU over the positive images of iou float32[N, k] (NaN without positives)."""
    iou = np.asarray(iou, dtype=np.float32)
    pos = ~np.asarray(is_negative, dtype=bool)
    if not pos.any():
        return np.full(iou.shape[0], np.nan, np.float32)
    return iou[:, pos].mean(axis=1).astype(np.float32)


# --- configs and results ----------------------------------------------------------------------------------------

@dataclass
class HalvingConfig:
    """Successive halving: score a batch on a few images, keep the best 1/eta, add images, repeat up to all.

    mode: 'auto' (on when the engine has >= auto_min_images images), 'on' or 'off'.
    Rungs use min_images, min_images*eta, ... images and finally all of them.
    """

    mode: str = "auto"
    min_images: int = 4
    eta: float = 2.0
    auto_min_images: int = 16


@dataclass
class SearchConfig:
    """Settings shared by every method (method configs subclass this and add their own)."""

    length: int = 4  # content tokens per candidate
    budget: int = 10_000  # candidate-image evaluations (score: N*k, gradient: GRAD_COST*k)
    seed: int = 0
    negative_weight: float = 0.5
    init: str = "random"  # 'random' | 'label'
    label_ids: Optional[list[int]] = None  # the natural label's content ids, for init='label'
    exclude_special: bool = True  # start/end/padding ids are never proposed; False is refused
    ascii_only: bool = False  # only ASCII letter/digit word pieces (needs jalias.tokenizer or allowed_tokens)
    allowed_tokens: Optional[list[int]] = None  # explicit whitelist, intersected with the other filters
    halving: HalvingConfig = field(default_factory=HalvingConfig)
    keep_top: int = 10  # distinct best candidates kept in the result

    def __post_init__(self):
        # Plain JSON types, so that the config can go into checkpoints and results as it is.
        if isinstance(self.halving, dict):
            self.halving = HalvingConfig(**self.halving)
        if self.label_ids is not None:
            self.label_ids = [int(i) for i in np.asarray(self.label_ids).reshape(-1)]
        if self.allowed_tokens is not None:
            self.allowed_tokens = [int(i) for i in np.asarray(self.allowed_tokens).reshape(-1)]

    def validate(self, engine: ScoringEngine) -> None:
        """Raise ValueError naming the first bad field."""
        max_len = int(engine.max_length)
        if not 1 <= self.length <= max_len:
            raise ValueError(f"length must be in [1, {max_len}] (engine max_length), got {self.length}")
        if self.budget < 0:
            raise ValueError(f"budget must be >= 0 candidate-image evaluations, got {self.budget}")
        if self.init not in ("random", "label"):
            raise ValueError(f"init must be 'random' or 'label', got {self.init!r}")
        if self.init == "label":
            if not self.label_ids:
                raise ValueError("init='label' needs label_ids (the label's content token ids)")
            if len(self.label_ids) > self.length:
                raise ValueError(f"the label has {len(self.label_ids)} tokens, more than length={self.length}")
            if min(self.label_ids) < 0 or max(self.label_ids) >= engine.vocab_size:
                raise ValueError(f"label_ids out of range [0, {engine.vocab_size}): {self.label_ids}")
        if not self.exclude_special:
            raise ValueError("exclude_special=False is not supported: special tokens are never proposed")
        if self.negative_weight < 0:
            raise ValueError(f"negative_weight must be >= 0, got {self.negative_weight}")
        if self.keep_top < 1:
            raise ValueError(f"keep_top must be >= 1, got {self.keep_top}")
        h = self.halving
        if h.mode not in ("auto", "on", "off"):
            raise ValueError(f"halving.mode must be 'auto', 'on' or 'off', got {h.mode!r}")
        if h.min_images < 1 or h.eta <= 1:
            raise ValueError(f"halving needs min_images >= 1 and eta > 1, got {h.min_images}, {h.eta}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SearchConfig":
        """The config of this class from a dict (e.g. to_dict() output); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
        return cls(**d)


def coerce_config(config: Any, cls: type) -> SearchConfig:
    """A `cls` instance from None, a dict, an instance of cls, or a plain SearchConfig (its common fields).

    A config of another method's class is refused, so that its settings are not silently ignored.
    """
    if config is None:
        return cls()
    if isinstance(config, dict):
        return cls.from_dict(config)
    if isinstance(config, cls):
        return config
    if type(config) is SearchConfig:
        common = {f.name: getattr(config, f.name) for f in dataclasses.fields(SearchConfig)}
        return cls(**common)
    raise ValueError(f"expected {cls.__name__} or SearchConfig, got {type(config).__name__}")


@dataclass
class Candidate:
    ids: list[int]
    text: str
    objective: float
    train_iou: float


@dataclass
class SearchResult:
    """Outcome of one search. best: distinct candidates, best first. history: (evals, best_obj, best_train_iou)."""

    method: str
    best: list[Candidate]
    history: list[tuple[int, float, float]]
    evals_used: int
    wall_time_s: float
    config: dict
    stop_reason: str = ""
    iterations: int = 0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["history"] = [list(h) for h in self.history]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SearchResult":
        d = dict(d)
        d["best"] = [Candidate(**c) for c in d["best"]]
        d["history"] = [tuple(h) for h in d["history"]]
        return cls(**d)


def negative_weight_kwargs(fn: Callable, negative_weight: float) -> dict:
    """{'negative_weight': w} if the engine function fn takes that argument (the real engine does), else {}.

    Passing it keeps the engine's soft loss weighted like the exact objective of this search.
    """
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    return {"negative_weight": float(negative_weight)} if "negative_weight" in params else {}


def detokenize_or_str(ids: Sequence[int]) -> str:
    """Text of content ids through jalias.tokenizer, or str(ids) where it is unavailable (toy vocabularies)."""
    try:
        from jalias.tokenizer import detokenize
        return detokenize([int(i) for i in ids])
    except Exception:  # noqa: BLE001 - any tokenizer failure (missing module, id out of range) -> plain ids
        return str([int(i) for i in ids])


# --- vocabulary filter ------------------------------------------------------------------------------------------

_WORD_PIECE_RE = re.compile(r"[A-Za-z0-9]+")


def ascii_word_piece_mask(strings: Sequence[str]) -> np.ndarray:
    """bool[len(strings)]: True where a token string (CLIP style, '</w>' marks a word end) is ASCII letters/digits."""
    out = np.zeros(len(strings), bool)
    for i, s in enumerate(strings):
        piece = s[:-4] if s.endswith("</w>") else s
        out[i] = _WORD_PIECE_RE.fullmatch(piece.strip()) is not None
    return out


def _tokenizer_strings() -> Optional[list[str]]:
    try:
        from jalias.tokenizer import token_strings
    except ImportError:
        return None
    return list(token_strings())


def allowed_token_ids(
    config: SearchConfig,
    vocab_size: int,
    special_ids: Sequence[int] = (),
    token_strings: Optional[Sequence[str]] = None,
) -> np.ndarray:
    """int32[M] sorted ids a method may propose: not special, in config.allowed_tokens if given, and ASCII
    word pieces if config.ascii_only (token strings from the argument, else jalias.tokenizer)."""
    ok = np.ones(vocab_size, bool)
    for s in tuple(CLIP_SPECIAL_IDS) + tuple(special_ids):
        if 0 <= s < vocab_size:
            ok[s] = False
    if config.allowed_tokens is not None:
        wl = np.asarray(config.allowed_tokens, dtype=np.int64)
        if wl.size and (wl.min() < 0 or wl.max() >= vocab_size):
            raise ValueError(f"allowed_tokens has ids outside [0, {vocab_size})")
        keep = np.zeros(vocab_size, bool)
        keep[wl] = True
        ok &= keep
    if config.ascii_only:
        strings = token_strings if token_strings is not None else _tokenizer_strings()
        if strings is None:
            if config.allowed_tokens is None:
                raise ValueError("ascii_only needs jalias.tokenizer.token_strings() or an explicit allowed_tokens")
        else:
            mask = np.zeros(vocab_size, bool)
            n = min(vocab_size, len(strings))
            mask[:n] = ascii_word_piece_mask(strings[:n])
            ok &= mask
    ids = np.flatnonzero(ok).astype(np.int32)
    if ids.size == 0:
        raise ValueError("the vocabulary filter leaves no token to propose")
    return ids


def random_ids(allowed: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """int32[length] tokens drawn uniformly (with replacement) from the allowed ids int32[M]."""
    return allowed[rng.integers(allowed.size, size=length)].astype(np.int32)


def initial_ids(config: SearchConfig, allowed: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """int32[length] starting sequence: random allowed tokens, or the label padded with random allowed tokens."""
    ids = random_ids(allowed, config.length, rng)
    if config.init == "label":
        label = np.asarray(config.label_ids, dtype=np.int32)
        ids[: label.size] = label
    return ids


def mutate(ids: np.ndarray, allowed: np.ndarray, rng: np.random.Generator, n: int = 1) -> np.ndarray:
    """int32[L] copy of ids int32[L] with n distinct random positions set to other random allowed tokens."""
    out = np.asarray(ids, dtype=np.int32).copy()
    m = allowed.size
    for pos in rng.permutation(out.size)[:n]:
        c = int(np.searchsorted(allowed, out[pos]))
        if c < m and allowed[c] == out[pos] and m > 1:
            j = int(rng.integers(m - 1))
            j += j >= c  # skip the current token
        else:
            j = int(rng.integers(m))
        out[pos] = allowed[j]
    return out


# --- budget -----------------------------------------------------------------------------------------------------

@dataclass
class Scored:
    """Result of Budget.evaluate for N candidates.

    objective float32[N]: exact if full, else on the largest image subset reached (-inf if never scored).
    train_iou float32[N]: exact for full rows, NaN otherwise. rung int32[N]: last halving rung reached (-1 none).
    full bool[N]: scored on all images.
    """

    objective: np.ndarray
    train_iou: np.ndarray
    rung: np.ndarray
    full: np.ndarray

    def best_full(self) -> Optional[int]:
        """Index of the best fully scored candidate (first on ties), or None."""
        if not self.full.any():
            return None
        obj = np.where(self.full, self.objective, -np.inf)
        return int(np.argmax(obj))


class Budget:
    """Engine wrapper that charges and caps candidate-image evaluations and keeps the best candidates.

    score(ids[N, L], images) charges N*k; when the remaining budget cannot pay for all rows it scores only the
    first floor(remaining / k) rows and returns those. grad / charge_grad charge GRAD_COST*k or refuse.
    `top` holds up to keep_top distinct (ids, objective, train_iou), best first; `history` gets
    (used, best_objective, best_train_iou) whenever exact scores on all images arrive.
    """

    def __init__(self, engine: ScoringEngine, budget: int, negative_weight: float,
                 halving: HalvingConfig, seed: int, keep_top: int = 10):
        self.engine = engine
        self.budget = int(budget)
        self.negative_weight = float(negative_weight)
        self.keep_top = int(keep_top)
        self.n_images = int(engine.n_images)
        if self.n_images < 1:
            raise ValueError("the engine has no images to score on")
        self.is_negative = np.asarray(engine.is_negative, dtype=bool).reshape(-1)
        if self.is_negative.shape[0] != self.n_images:
            raise ValueError(f"engine.is_negative has {self.is_negative.shape[0]} entries for {self.n_images} images")
        self.grad_cost = int(getattr(engine, "GRAD_COST", GRAD_COST))
        self.used = 0
        self.top: list[tuple[tuple[int, ...], float, float]] = []
        self.history: list[tuple[int, float, float]] = []
        self.image_order, self.rungs = _halving_plan(self.is_negative, halving, seed)
        self.halving_eta = float(halving.eta)

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
        n = min(ids.shape[0], max(self.remaining, 0) // k)
        if n == 0:
            return np.zeros((0, k), np.float32)
        iou = np.asarray(self.engine.score(ids[:n], images), dtype=np.float32)
        self.used += n * k
        if iou.shape != (n, k):
            raise ValueError(f"engine.score returned shape {iou.shape}, expected {(n, k)}")
        if images is None or np.unique(np.asarray(images)).size == self.n_images:
            if images is not None:  # put columns in engine image order before computing the objective
                full = np.empty_like(iou)
                full[:, np.asarray(images)] = iou
                iou = full
            self._observe(ids[:n], objective(iou, self.is_negative, self.negative_weight),
                          train_iou(iou, self.is_negative))
        return iou

    def can_grad(self, images: Optional[np.ndarray] = None) -> bool:
        return self.remaining >= self._grad_price(images)

    def charge_grad(self, images: Optional[np.ndarray] = None) -> bool:
        """Charge one gradient (e.g. one value_and_grad of soft_loss); False, charging nothing, if unaffordable."""
        price = self._grad_price(images)
        if self.remaining < price:
            return False
        self.used += price
        return True

    def grad(self, ids: np.ndarray, images: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
        """float32[L, V] engine.token_grad of ids int32[L], or None (nothing charged) if unaffordable."""
        if not self.charge_grad(images):
            return None
        kw = negative_weight_kwargs(self.engine.token_grad, self.negative_weight)
        g = self.engine.token_grad(np.asarray(ids, dtype=np.int32), images, **kw)
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
        max(min_keep, ceil(n / eta)) by objective on the images so far. Rows the budget cannot pay for stay
        unscored (rung -1).
        """
        ids = np.asarray(ids, dtype=np.int32)
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
        for i in np.flatnonzero(obj > worst):
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
            "top": [[list(t[0]), t[1], t[2]] for t in self.top],
            "history": [list(h) for h in self.history],
        }

    def load_state_dict(self, d: dict) -> None:
        self.used = int(d["used"])
        self.top = [(tuple(int(i) for i in t[0]), float(t[1]), float(t[2])) for t in d["top"]]
        self.history = [(int(h[0]), float(h[1]), float(h[2])) for h in d["history"]]


def _halving_plan(is_negative: np.ndarray, h: HalvingConfig, seed: int) -> tuple[np.ndarray, list[int]]:
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


# --- one run: budget + rng + vocabulary + checkpoints -----------------------------------------------------------

class SearchRun:
    """State shared by a method's loop, restorable from a checkpoint.

    Attributes: config, budget (Budget), rng (numpy Generator), allowed (int32[M] proposable ids),
    allowed_mask (bool[V]), state (the method's loop state from resume_state, or None on a fresh start),
    iteration (checkpoints made so far).
    """

    def __init__(self, method: str, engine: ScoringEngine, config: SearchConfig,
                 on_checkpoint: Optional[Checkpoint] = None, resume_state: Optional[dict] = None):
        config.validate(engine)
        self.method = method
        self.engine = engine
        self.config = config
        self.on_checkpoint = on_checkpoint
        self.allowed = allowed_token_ids(config, int(engine.vocab_size), getattr(engine, "special_ids", ()))
        self.allowed_mask = np.zeros(int(engine.vocab_size), bool)
        self.allowed_mask[self.allowed] = True
        self.budget = Budget(engine, config.budget, config.negative_weight, config.halving, config.seed,
                             config.keep_top)
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
        )
