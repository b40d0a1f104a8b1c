"""Batched, cached, jitted scoring of candidate prompts (see engine.py)."""

from .engine import GRAD_COST, Engine, enable_compilation_cache

__all__ = ["Engine", "GRAD_COST", "enable_compilation_cache"]
