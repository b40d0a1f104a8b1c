"""What the engine keeps on disk: image features (keyed by pixels, prompt mode and a hash of every weight, stored in
the model's dtype) and XLA's persistent compilation cache."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..model.sam3 import Sam3


def enable_compilation_cache(path: str | None = None) -> str:
    """Persistent XLA compilation cache (re-runs skip compiling). Returns the directory used."""
    path = path or os.environ.get("JALIAS_JAX_CACHE") or str(Path.home() / ".cache" / "jalias" / "jax")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return path


def model_hash(model: Sam3) -> str:
    """sha256 of every weight (`jalias.weights.orbax_io.fingerprint`, ~1 s per GB) and the compute dtype: the disk
    cache's key, so fine-tuned or adapted weights never read another model's features. Computed once per params
    object."""
    from ..weights.orbax_io import fingerprint

    cached = getattr(model, "_content_hash", None)
    if cached is None or cached[0] is not model.params:
        cached = (model.params, fingerprint(model.params) + model.dtype.name)
        model._content_hash = cached
    return cached[1]


def save_ctx(path: Path, ctx: dict) -> None:
    """Write a context's leaves in their own dtype (bf16 stored as its 16-bit pattern), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(ctx)]
    arrays = {f"arr_{i}": (x.view(np.uint16) if x.dtype == jnp.bfloat16 else x) for i, x in enumerate(leaves)}
    np.savez(tmp, dtypes=np.asarray([x.dtype.name for x in leaves]), **arrays)
    os.replace(tmp, path)


def load_ctx(path: Path, like: dict) -> dict | None:
    """Read a cached context with the tree structure, shapes and dtypes of `like` (a `jax.eval_shape` result);
    None if absent, stale or corrupt (then it is recomputed, never fatal)."""
    try:
        want, treedef = jax.tree_util.tree_flatten(like)
        with np.load(path) as z:
            dtypes = [str(d) for d in z["dtypes"]]
            leaves = [z[f"arr_{i}"] for i in range(len(dtypes))]
        if len(leaves) != len(want):
            return None
        out = []
        for x, d, w in zip(leaves, dtypes, want):
            x = x.view(jnp.bfloat16) if d == "bfloat16" else x
            if x.shape != w.shape or x.dtype != w.dtype:
                return None
            out.append(jnp.asarray(x))
        return jax.tree_util.tree_unflatten(treedef, out)
    except Exception:
        return None
