"""Shared pytest setup.

Without a CUDA plugin for JAX installed, pin JAX to the CPU backend so it does not probe for
accelerators; with one (``pip install -e '.[cuda]'``) leave the choice to JAX so GPU tests can run.
An explicit JAX_PLATFORMS from the caller always wins.
"""

import importlib.util
import os


def _has_jax_cuda_plugin() -> bool:
    for name in ("jax_cuda12_plugin", "jax_plugins.xla_cuda12"):
        try:
            if importlib.util.find_spec(name) is not None:
                return True
        except ModuleNotFoundError:
            pass
    return False


if "JAX_PLATFORMS" not in os.environ and not _has_jax_cuda_plugin():
    os.environ["JAX_PLATFORMS"] = "cpu"
