"""Batched, cached, jitted scoring of candidate prompts (see engine.py)."""

from .caches import enable_compilation_cache
from .engine import GRAD_COST, Engine

__all__ = ["Engine", "GRAD_COST", "enable_compilation_cache"]
