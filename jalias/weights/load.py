"""Load SAM3 weights into jalias: from a torch model / state dict (`from_torch`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..model.config import Sam3Config
from ..model.sam3 import Sam3
from .mapping import state_dict_to_params


def as_config(config: Any) -> Sam3Config:
    """Sam3Config | transformers.Sam3Config | dict (HF layout) | path to config.json -> Sam3Config."""
    if isinstance(config, Sam3Config):
        return config
    if hasattr(config, "to_dict"):
        return Sam3Config.from_hf_dict(config.to_dict())
    if isinstance(config, dict):
        return Sam3Config.from_hf_dict(config)
    if isinstance(config, str) or hasattr(config, "__fspath__"):
        return Sam3Config.from_json_file(config)
    raise TypeError(f"cannot use {type(config).__name__} as a SAM3 config")


def _tensor_to_numpy(t: Any) -> np.ndarray:
    if hasattr(t, "detach"):  # torch tensor (bf16 has no numpy dtype: go through float32)
        t = t.detach().cpu()
        if str(t.dtype) in ("torch.bfloat16", "torch.float16"):
            t = t.float()
        return t.numpy()
    return np.asarray(t)


def from_torch(model_or_state_dict: Any, config: Any = None, dtype: str = "float32",
               prompt_mode: str | None = None) -> Sam3:
    """A `transformers.Sam3Model` (or its state dict plus its config) -> loaded jalias `Sam3`.

    prompt_mode: "hf" reproduces transformers' Sam3Model exactly; None/"meta" is Meta's SAM3 (see `Sam3`).
    Missing, mis-shaped or unexpected weights raise `WeightError` naming the tensor.
    """
    if hasattr(model_or_state_dict, "state_dict"):
        state_dict = model_or_state_dict.state_dict()
        config = config if config is not None else model_or_state_dict.config
    else:
        state_dict = model_or_state_dict
    if config is None:
        raise ValueError("from_torch: a state dict needs its config (pass config=...)")
    cfg = as_config(config)
    params = state_dict_to_params(state_dict, cfg, to_numpy=_tensor_to_numpy)
    return Sam3(cfg, params, dtype=dtype, prompt_mode=prompt_mode)
