"""Param shapes of the Flax model by abstract init (no memory): what random init and weight conversion build on."""

from __future__ import annotations

import jax
import numpy as np

from .config import Sam3Config


def module_shapes(module, *example_args, method=None) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Param path -> shape for any Flax module, by abstract init on example inputs (arrays or ShapeDtypeStructs)."""
    kw = {} if method is None else {"method": method}
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *example_args, **kw))
    flat = jax.tree_util.tree_flatten_with_path(shapes["params"])[0]
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def param_shapes(config: Sam3Config) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Every Flax param path of the whole model -> its shape."""
    from .sam3 import Sam3Module

    s, t = config.image_size, config.context_length
    mode = "meta" if config.geometry is not None else "hf"  # "meta" also creates the geometry encoder's params
    return module_shapes(Sam3Module(config, prompt_mode=mode), np.zeros((1, 3, s, s), np.float32),
                         np.zeros((1, t), np.int32), np.ones((1, t), np.int32))
