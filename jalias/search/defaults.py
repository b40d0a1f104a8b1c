"""The measured default settings of each search method: the one table that `jalias search`, `jalias demo`,
`jalias.search_dataset`, `run_search` (config None or a dict) and the benchmarks all read.

Each row is what benchmarks/planted.py measured as that method's best setting (see the comment above its
SETTINGS and benchmarks/RESULTS.md): GCG with search width 64, top-64 tokens per position, a 1-image first
screen passing the best 1/8 on, and restarts after 20 steps without a new best (nanoGCG's LLM setting, width 512
and top-k 256, buys only ~3 steps of a 10,000-evaluation budget here). A method config's class defaults are the
un-tuned base values; a row changes only the fields it names. Soft prompts keep their class defaults (their
learning rate was chosen on the toy engine, not measured on the planted benchmark).
"""

from __future__ import annotations

import copy
from types import MappingProxyType
from typing import Mapping

MEASURED: Mapping[str, Mapping] = MappingProxyType({
    "evolution": MappingProxyType(dict(population=32, generations=None,
                                       halving=dict(mode="on", min_images=2, eta=4.0))),
    "local": MappingProxyType(dict(n_candidates=64, halving=dict(mode="on", min_images=2, eta=2.0))),
    "gcg": MappingProxyType(dict(search_width=64, topk=64, patience=20,
                                 halving=dict(mode="on", min_images=1, eta=8.0))),
    "soft": MappingProxyType({}),
})


def measured(method: str) -> dict:
    """A fresh, mutable copy of `method`'s measured settings ({} for a method without a row)."""
    return copy.deepcopy(dict(MEASURED.get(method, {})))
