"""Flax port of SAM3's text-prompted image path (one module per stage)."""

from .config import Sam3Config, tiny_config
from .sam3 import Sam3, Sam3Module

__all__ = ["Sam3", "Sam3Config", "Sam3Module", "tiny_config"]
