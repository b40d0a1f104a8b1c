"""What every alias search method shares: the engine protocol, the objective, configs and results.

A method file (evolution.py, local.py, gcg.py, soft.py) defines `XConfig(SearchConfig)` and
`run(engine, config, *, on_checkpoint=None, resume_state=None, on_progress=None) -> SearchResult`, and its
`run` reads as the algorithm. Around it: `budget.py` (the evaluation budget and successive halving), `memo.py`
(the search memory of exact scores), `vocab.py` (which tokens may be proposed, and drawing them) and
`searchrun.py` (`SearchRun`: budget, rng and vocabulary of one run, checkpoints and resumption).
"""
from __future__ import annotations

import dataclasses
import numbers
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence, runtime_checkable

import numpy as np

from .defaults import measured

Checkpoint = Callable[[dict], None]


@runtime_checkable
class ScoringEngine(Protocol):
    """What a search method needs from an engine (the real one is jalias.engine.Engine; tests use a toy one).

    The search passes its own negative_weight to token_grad and soft_loss_and_grad, so the soft loss is weighted
    like the exact objective of that search (None: the engine's own weight).
    """

    n_images: int
    is_negative: np.ndarray  # bool[K]
    vocab_size: int
    max_length: int
    embedding_table: Any  # jnp float32[V, D]
    special_ids: tuple[int, ...]  # ids never to propose (besides CLIP's start/end ids)
    grad_cost: int  # candidate-image evaluations one gradient costs per image

    def score(self, ids: np.ndarray, images: Optional[np.ndarray] = None) -> np.ndarray:
        """float32[N, k] exact IoU of content-token candidates int32[N, L] on the selected images."""
        ...

    def token_grad(self, ids: np.ndarray, images: Optional[np.ndarray] = None,
                   negative_weight: Optional[float] = None) -> np.ndarray:
        """float32[L, V] gradient of the soft loss w.r.t. the one-hot encoding of ids int32[L]."""
        ...

    def soft_loss_and_grad(self, embeds: Any, images: Optional[np.ndarray] = None,
                           negative_weight: Optional[float] = None) -> tuple[float, Any]:
        """(soft loss, lower is better; its gradient float32[L, D]) of continuous embeddings float32[L, D]."""
        ...

    def round_trips(self, ids: np.ndarray) -> np.ndarray:
        """bool[N]: whether each candidate int32[N, L]'s text tokenizes back to the same ids (what
        `SearchConfig.retokenize` filters on; an engine without a tokenizer, like the tests' toy engine, says
        True for every row)."""
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
    budget: int = 10_000  # candidate-image evaluations (score: N*k, gradient: engine.grad_cost*k)
    seed: int = 0
    negative_weight: float = 0.5
    init: str = "random"  # 'random' | 'label'
    label_ids: Optional[list[int]] = None  # the natural label's content ids, for init='label'
    exclude_special: bool = True  # start/end/padding ids are never proposed; False is refused
    ascii_only: bool = False  # only ASCII letter/digit word pieces (needs jalias.tokenizer or allowed_tokens)
    allowed_tokens: Optional[list[int]] = None  # explicit whitelist, intersected with the other filters
    halving: HalvingConfig = field(default_factory=HalvingConfig)
    keep_top: int = 10  # distinct best candidates kept in the result
    # only candidates whose text tokenizes back to the same ids are scored and reported, so an alias works as a
    # plain prompt (jalias eval --prompt, Meta's or HF's processor); filters on engine.round_trips
    retokenize: bool = True
    # search memory: the exact per-image IoUs of up to this many distinct sequences are remembered, so a sequence
    # scored once is never paid for (nor scored) again on the same image; 0 turns it off (search/memo.py)
    cache_size: int = 20_000

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
        if self.cache_size < 0:
            raise ValueError(f"cache_size must be >= 0 sequences (0: no search memory), got {self.cache_size}")
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
        check_field_types(cls, d)
        return cls(**d)


_TYPES = {"int": numbers.Integral, "float": numbers.Real, "bool": bool, "str": str}


def check_field_types(cls: type, values: dict) -> None:
    """Raise a one-line ValueError when a value does not have its config field's type (e.g.
    `--set search_width=abc`). Optional fields also take None; structured fields (halving, token lists) are
    checked by the config itself."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        hint = hints.get(key)
        args = typing.get_args(hint)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        name = getattr(base, "__name__", "")
        ok = _TYPES.get(name)
        if ok is None or (value is None and optional):
            continue
        if isinstance(value, bool) and name != "bool" or not isinstance(value, ok):
            want = f"{name} or null" if optional else name
            raise ValueError(f"option {key} expects {want}, got {value!r}")


def coerce_config(config: Any, cls: type, method: str) -> SearchConfig:
    """A `cls` instance from None, a dict, an instance of cls, or a plain SearchConfig (its common fields).

    None, a dict and a plain SearchConfig start from `method`'s measured settings (search/defaults.py); a dict's
    fields override them. An instance of cls is used as it is. A config of another method's class is refused, so
    that its settings are not silently ignored.
    """
    if config is None:
        return cls.from_dict(measured(method))
    if isinstance(config, dict):
        return cls.from_dict({**measured(method), **config})
    if isinstance(config, cls):
        return config
    if type(config) is SearchConfig:
        common = {f.name: getattr(config, f.name) for f in dataclasses.fields(SearchConfig)}
        rows = measured(method)
        own = {k: v for k, v in rows.items() if k not in common}
        if "halving" in rows and config.halving == HalvingConfig():  # halving left at its default: measured one
            common["halving"] = rows["halving"]
        return cls(**{**common, **own})
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
    rejected: int = 0  # proposals never scored because their text does not tokenize back (config.retokenize)
    evals_saved: int = 0  # candidate-image evaluations answered from the search memory, not paid (cache_size)

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


def detokenize_or_str(ids: Sequence[int]) -> str:
    """Text of content ids through jalias.tokenizer, or str(ids) where it is unavailable (toy vocabularies)."""
    try:
        from jalias.tokenizer import detokenize
        return detokenize([int(i) for i in ids])
    except Exception:  # noqa: BLE001 - any tokenizer failure (missing module, id out of range) -> plain ids
        return str([int(i) for i in ids])
