"""jalias: search SAM3 prompt-token "aliases" with a JAX/Flax engine.

    import jalias
    model = jalias.load("tiny")                        # or a converted checkpoint / HF dir / sam3.pt
    engine = jalias.Engine(model, images, gt_masks)    # engine.score(ids[N, L]) -> IoU float32[N, K]
    jalias.demo()                                      # the `jalias demo` pipeline
    jalias.adapt("runs/demo")                          # adapters: the label learns what the alias does
    jalias.load("small", adapter="runs/demo/adapters/embed-alias")   # a model with adapters applied
    jalias.search_dataset("weights/sam3", "ann.json", "images/", categories=["kiwi"], budget=20_000)

Everything except the tokenizer is imported on first use, so `import jalias` stays light (no jax import).
"""

from importlib import import_module
from types import ModuleType

from jalias.tokenizer import content_ids, detokenize, tokenize

# public name -> module it lives in (imported lazily by __getattr__)
_LAZY = {
    "from_torch": "jalias.weights",
    "load": "jalias.adapt",  # jalias.weights.load + adapter=DIR
    "convert": "jalias.weights",
    "Engine": "jalias.engine",
    "demo": "jalias.run.api",
    "search_dataset": "jalias.run.api",
    "evaluate_prompt": "jalias.run.api",
    "export_run": "jalias.run.export",
}

# subpackages reachable as attributes without their own import (jalias.search.run_search(...))
_SUBPACKAGES = ("model", "weights", "engine", "search", "data", "train", "adapt", "run")


class _CallableAdapt(ModuleType):
    """`jalias.adapt` is the adapters package and also callable: `jalias.adapt(run_dir, kind=..., teacher=...)`
    is `jalias.run.adapt.adapt_run` (one adapter per finished category of a search run)."""

    def __call__(self, *args, **kwargs):
        return import_module("jalias.run.adapt").adapt_run(*args, **kwargs)


__all__ = ["tokenize", "detokenize", "content_ids", "adapt", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value  # cache: later lookups skip __getattr__
        return value
    if name in _SUBPACKAGES:
        return import_module(f"jalias.{name}")
    raise AttributeError(f"module 'jalias' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_SUBPACKAGES))
