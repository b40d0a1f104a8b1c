"""SAM3 weights for jalias: torch -> Flax mapping, checkpoint conversion to Orbax, loading by path or name.

    from jalias.weights import load, convert, from_torch
    model = load("tiny")                                   # weights/tiny (committed random-weight model)
    convert("~/sam3-hf", "weights/sam3", dtype="bfloat16")  # HF dir / .safetensors / .bin / Meta sam3.pt -> Orbax
    model = load("weights/sam3")
"""

from .convert import convert, convert_command, detect_layout, load, read_checkpoint, save_params
from .load import from_torch
from .mapping import WeightError

__all__ = ["WeightError", "convert", "convert_command", "detect_layout", "from_torch", "load", "read_checkpoint",
           "save_params"]
