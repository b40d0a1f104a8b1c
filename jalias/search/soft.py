"""PEZ-style soft prompt search with hard projections.

Continuous embeddings x [L, D] start at the embeddings of random (or the label's) tokens. Every step projects x
to the nearest allowed vocabulary tokens, scores that token sequence exactly (unless it is the same as the last
one scored), takes the gradient of the engine's soft loss AT THE PROJECTED embeddings and applies it, through
Adam, to the continuous x (the PEZ trick). The result is the best projected sequence seen.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jalias.search.base import Checkpoint, ScoringEngine, SearchConfig, SearchResult, coerce_config
from jalias.search.searchrun import SearchRun


@dataclass
class SoftConfig(SearchConfig):
    # Adam step size; with lr_relative it is in units of the RMS entry of the allowed embedding rows, so one value
    # works across embedding scales (1.0 ~ 0.02 absolute for CLIP-like tables; PEZ used 0.1 absolute). On the toy
    # engine 0.05..2 all converge, larger faster; 1.0 is a middle ground for a rougher real landscape.
    lr: float = 1.0
    lr_relative: bool = True
    weight_decay: float = 0.0  # AdamW-style decay of x (PEZ uses some); 0: plain Adam
    projection: str = "cosine"  # 'cosine' | 'l2' nearest token
    max_steps: Optional[int] = None  # None: until the budget is spent

    def validate(self, engine: ScoringEngine) -> None:
        super().validate(engine)
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.projection not in ("cosine", "l2"):
            raise ValueError(f"projection must be 'cosine' or 'l2', got {self.projection!r}")


def projection_keys(table: jax.Array, metric: str) -> tuple[jax.Array, jax.Array]:
    """(keys float32[M, D], bias float32[M]) such that the token nearest to x is argmax(x @ keys.T + bias).

    cosine: unit-norm rows, no bias (scaling x does not change the argmax); l2: argmin |x - t|^2 =
    argmax x.t - |t|^2 / 2.
    """
    if metric == "cosine":
        return table / (jnp.linalg.norm(table, axis=-1, keepdims=True) + 1e-12), jnp.zeros(table.shape[0])
    return table, -0.5 * jnp.sum(table * table, axis=-1)


@jax.jit
def nearest_tokens(x: jax.Array, keys: jax.Array, bias: jax.Array) -> jax.Array:
    """int32[L] row index into keys float32[M, D] of the token nearest to each row of x float32[L, D]."""
    return jnp.argmax(x @ keys.T + bias, axis=-1).astype(jnp.int32)



def encode_tree(tree: Any) -> list[dict]:
    """JSON-serialisable leaves of a pytree of arrays (exact for float32/int32)."""
    return [{"dtype": str(np.asarray(a).dtype), "shape": list(np.shape(a)), "data": np.asarray(a).ravel().tolist()}
            for a in jax.tree_util.tree_leaves(tree)]


def decode_tree(leaves: list[dict], like: Any) -> Any:
    """Pytree shaped like `like` from encode_tree output."""
    arrays = [jnp.asarray(np.asarray(d["data"], dtype=d["dtype"]).reshape(d["shape"])) for d in leaves]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), arrays)


def run(engine: ScoringEngine, config: Optional[SoftConfig] = None, *,
        on_checkpoint: Optional[Checkpoint] = None, resume_state: Optional[dict] = None,
        on_progress: Optional[Callable[[int], None]] = None) -> SearchResult:
    """PEZ-style search on `engine` within config.budget candidate-image evaluations."""
    config = coerce_config(config, SoftConfig, "soft")
    sr = SearchRun("soft", engine, config, on_checkpoint, resume_state, on_progress)
    budget, allowed = sr.budget, sr.allowed

    embeddings = jnp.asarray(engine.embedding_table, dtype=jnp.float32)  # [V, D]
    table = embeddings[jnp.asarray(allowed)]  # [M, D] the tokens a projection may land on
    keys, bias = projection_keys(table, config.projection)
    scale = float(jnp.sqrt(jnp.mean(table * table))) if config.lr_relative else 1.0
    if config.weight_decay > 0:
        opt = optax.adamw(config.lr * scale, weight_decay=config.weight_decay)
    else:
        opt = optax.adam(config.lr * scale)


    @functools.partial(jax.jit, donate_argnums=(0, 1))  # x and the Adam state are updated in place
    def adam_step(x, opt_state, grad):
        updates, opt_state = opt.update(grad, opt_state, x)
        return optax.apply_updates(x, updates), opt_state

    st = sr.state
    if st is None:
        x = embeddings[jnp.asarray(sr.initial_ids())]
        opt_state = opt.init(x)
        st = sr.checkpoint({"x": encode_tree(x), "opt_state": encode_tree(opt_state),
                            "last_scored": None, "step": 0})
    else:
        x = decode_tree(st["x"], jnp.zeros((config.length, embeddings.shape[1]), jnp.float32))
        opt_state = decode_tree(st["opt_state"], opt.init(x))

    while True:
        if config.max_steps is not None and st["step"] >= config.max_steps:
            return sr.result("steps")

        # 1. project to the nearest allowed tokens and score them exactly (once per distinct sequence; not at all
        #    when the projection does not round-trip, see SearchConfig.retokenize)
        ids = allowed[np.asarray(nearest_tokens(x, keys, bias))]
        if ids.tolist() != st["last_scored"]:
            if budget.remaining < budget.n_images:
                return sr.result("budget")
            budget.evaluate(ids[None])
            st["last_scored"] = ids.tolist()

        # 2. gradient at the projected embeddings, applied to the continuous ones
        if not budget.charge_grad():
            return sr.result("budget")
        _, grad = engine.soft_loss_and_grad(embeddings[jnp.asarray(ids)], None,
                                            negative_weight=config.negative_weight)
        x, opt_state = adam_step(x, opt_state, grad)

        st.update(x=encode_tree(x), opt_state=encode_tree(opt_state), step=st["step"] + 1)
        sr.checkpoint(st)
