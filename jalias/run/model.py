"""The model a run uses: a checkpoint by path or name, or the embedded tiny model (built in memory when the
committed checkpoint is absent, e.g. in a non-editable install)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

TINY_SEED = 0  # weights/make_tiny.py: the embedded tiny checkpoint is random_params(tiny_config(), 0, 2.0)
TINY_PRESENCE_BIAS = 2.0


def embedded_tiny_path() -> Path:
    """<repo>/weights/tiny: the committed tiny checkpoint (absent from non-editable installs)."""
    return Path(__file__).resolve().parents[2] / "weights" / "tiny"


def tiny_model():
    """The embedded tiny model built in memory: same params as weights/tiny (bf16-rounded), float32 compute."""
    import jax
    import ml_dtypes

    from ..model import Sam3, tiny_config
    from ..model.init import random_params

    cfg = tiny_config()
    params = random_params(cfg, seed=TINY_SEED, presence_bias=TINY_PRESENCE_BIAS)
    # weights/tiny stores bfloat16; round the same way so both paths give identical models
    params = jax.tree_util.tree_map(lambda a: a.astype(ml_dtypes.bfloat16).astype(np.float32), params)
    return Sam3(cfg, params, dtype="float32")


def adapter_paths(paths) -> list[str]:
    """Adapter directories (or folders of them) -> the absolute adapter directories they name, in order
    (what run.json records; a path that holds no adapter fails here, before any model is loaded)."""
    from ..adapt.store import adapter_dirs

    return [str(d.resolve()) for p in (paths or []) for d in adapter_dirs(p)]


def load_model(weights: str, dtype: str | None = None, prompt_mode: str | None = None,
               adapters: Sequence[str] = ()):
    """-> (Sam3, note). adapters: adapter directories applied on top (see `adapter_paths`). `weights`: a checkpoint path (Orbax dir, HF dir, .safetensors, .bin, Meta .pt), a name
    under weights/ or $JALIAS_WEIGHTS, or "tiny" (embedded checkpoint, built in memory if it is absent).
    prompt_mode: "meta" | "hf" | None (the model's default: "meta" when it has the geometry encoder).
    dtype: compute dtype; None: `jalias.model.layers.default_dtype()` (float32 on every backend today).
    note: a one-line remark for the user, or "" (e.g. that the tiny model was built in memory)."""
    model, note = _load_base(weights, dtype, prompt_mode)
    if adapters:
        from ..adapt import apply_adapters, load_adapters

        model = apply_adapters(model, load_adapters(list(adapters)))
    return model, note


def _load_base(weights: str, dtype: str | None, prompt_mode: str | None):
    from ..model.layers import default_dtype
    from ..weights.convert import load, resolve

    dtype = default_dtype() if dtype is None else dtype
    if str(weights) == "tiny":
        try:
            path = resolve("tiny")
        except FileNotFoundError:
            path = None
        if path is None:
            if dtype not in (None, "float32"):
                raise ValueError("the in-memory tiny model computes in float32 only")
            return tiny_model().with_prompt_mode(prompt_mode), ("weights/tiny not found (non-editable install): built the same tiny random "
                                  "model in memory")
        return load(path, dtype=dtype, prompt_mode=prompt_mode), ""
    return load(weights, dtype=dtype, prompt_mode=prompt_mode), ""


def weights_spec(weights: str) -> str:
    """What run.json records for `weights`: an absolute path when it names one, else the name ("tiny")."""
    from ..weights.convert import resolve

    try:
        return str(resolve(weights).resolve())
    except FileNotFoundError:
        if str(weights) == "tiny":
            return "tiny"
        raise
