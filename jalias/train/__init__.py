"""Training the small SAM3 on the procedural world (`jalias.data.world`)."""

from .config import CONFIGS, TrainConfig, small_config
from .loop import TrainError, TrainResult, train

__all__ = ["CONFIGS", "TrainConfig", "TrainError", "TrainResult", "small_config", "train"]
