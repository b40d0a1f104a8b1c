"""Train the small SAM3 with optax: one jitted step (forward through every stage, set loss, AdamW), resumable.

    from jalias.train import train, TrainConfig
    result = train(TrainConfig(), out="runs/train-small")   # stage 1 (6,000 steps) + stage 2 (1,500 steps)

State (params, optimiser state, step) is written atomically to out/state every `checkpoint_every_s` seconds, on
Ctrl-C/SIGTERM and at the end; `resume=True` continues from it, and because the batch of step i depends only on
(seed, i), a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..atomic import write_json_atomic
from ..model.sam3 import Sam3Module
from .batches import build_pool, reserved_tokens, sample_batch
from .config import CONFIGS, TrainConfig
from .init import initial_params
from .loss import set_loss

STATE_FORMAT = "jalias.train_state"


class TrainError(RuntimeError):
    """Bad training input or state (one-line message)."""


@dataclass
class TrainResult:
    params: dict
    step: int
    losses: list[float]  # mean loss of each logged window
    seconds: float


def optimizer(train: TrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, train.lr, train.warmup, max(train.steps, train.warmup + 1),
                                                  train.lr * train.final_lr_fraction)

    def decay_mask(params):
        return jax.tree_util.tree_map_with_path(lambda path, _: "token_embedding" not in jax.tree_util.keystr(path),
                                                params)

    tx = optax.chain(optax.clip_by_global_norm(train.clip_norm),
                     optax.adamw(schedule, weight_decay=train.weight_decay, mask=decay_mask))
    if train.decoder_lr_scale != 1.0:  # the DETR decoder's steps scaled (its learning rate x this)
        def decoder(params):
            return jax.tree_util.tree_map_with_path(lambda path, _: "detr_decoder" in jax.tree_util.keystr(path),
                                                    params)

        tx = optax.chain(tx, optax.masked(optax.scale(train.decoder_lr_scale), decoder))
    return tx


def make_step(cfg, train: TrainConfig, opt: optax.GradientTransformation) -> Callable:
    module = Sam3Module(cfg)
    p = train.prompts_per_image

    def loss_fn(params, batch):
        def run(method, *a, **k):
            return module.apply({"params": params}, *a, method=getattr(Sam3Module, method), **k)

        image = run("encode_image", batch["pixel_values"])
        image = jax.tree_util.tree_map(lambda x: jnp.repeat(x, p, axis=0), image)
        prompt, _ = run("encode_text", run("embed_tokens", batch["input_ids"]), batch["attention_mask"])
        out = run("detect", image, prompt, batch["attention_mask"])
        anchors = jax.nn.sigmoid(params["detr_decoder"]["reference_points"]["embedding"])
        return set_loss(out, batch, train, anchors)

    def step(params, opt_state, batch):
        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, parts

    # params and optimiser state are donated: the new ones are written over the old, so a step holds one copy of
    # the model and its AdamW moments, not two (the caller must not read the arrays it passed in)
    return jax.jit(step, donate_argnums=(0, 1))


@functools.lru_cache(maxsize=8)
def stage_step(cfg, train: TrainConfig) -> Callable:
    """`make_step` with the recipe's own optimiser, built once per (model config, recipe) in a process: a resumed
    or repeated run reuses the compiled step (its Hungarian host callback keeps it out of XLA's persistent
    cache, so every new step object would compile again)."""
    return make_step(cfg, train, optimizer(train))


# ---- state on disk ------------------------------------------------------------------------------------------------
def save_state(path: Path, params, opt_state, step: int, train: TrainConfig, losses: list[float]) -> None:
    """Atomically replace `path` with the training state (Orbax pytree of flat leaves + JSON)."""
    import orbax.checkpoint as ocp

    leaves = jax.tree_util.tree_leaves((params, opt_state))
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        ocp.PyTreeCheckpointer().save(tmp / "arrays", args=ocp.args.PyTreeSave(
            {f"{i:05d}": np.asarray(x) for i, x in enumerate(leaves)}))
        write_json_atomic(tmp / "state.json", {"format": STATE_FORMAT, "step": step, "train": train.to_dict(),
                                               "losses": losses}, indent=None)
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        if path.exists():
            os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_state(path: Path, like, train: TrainConfig):
    """(params, opt_state, step, losses) from `path`; `like` = (params, opt_state) gives the tree structure."""
    import orbax.checkpoint as ocp

    try:
        meta = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TrainError(f"cannot read training state {path}: {e}") from None
    if meta.get("format") != STATE_FORMAT:
        raise TrainError(f"{path} is not a jalias training state")
    saved = TrainConfig(**meta["train"])
    if saved != train:
        diff = [k for k, v in saved.to_dict().items() if train.to_dict()[k] != v and k != "checkpoint_every_s"]
        if diff:
            raise TrainError(f"--resume with other settings than the run in {path.parent}: {', '.join(diff)}")
    leaves, treedef = jax.tree_util.tree_flatten(like)
    arrays = ocp.PyTreeCheckpointer().restore(path / "arrays")
    restored = [jnp.asarray(arrays[f"{i:05d}"], dtype=x.dtype) for i, x in enumerate(leaves)]
    params, opt_state = jax.tree_util.tree_unflatten(treedef, restored)
    return params, opt_state, int(meta["step"]), list(meta.get("losses", []))


# ---- the loop -----------------------------------------------------------------------------------------------------
def train(train: TrainConfig = TrainConfig(), out: str | os.PathLike = "runs/train-small", resume: bool = False,
          progress: bool = True, stop_after: int | None = None, log: Callable[[str], None] = print) -> TrainResult:
    """Train from scratch (or resume) and return the final params. stop_after: stop (state saved) after this many
    steps of this call, as a kill would (tests use it)."""
    if train.config not in CONFIGS:
        raise TrainError(f"unknown model config '{train.config}'; choose from: {', '.join(CONFIGS)}")
    if train.class_target not in ("matched", "iou"):
        raise TrainError(f"class_target must be 'matched' or 'iou', got {train.class_target!r}")
    if train.steps < 1 or train.stage2_steps < 0:
        raise TrainError(f"steps must be >= 1 and stage2_steps >= 0, got {train.steps}, {train.stage2_steps}")
    cfg = CONFIGS[train.config]()
    out = Path(os.path.expanduser(os.fspath(out))).absolute()
    state_path = out / "state"
    if state_path.exists() and not resume:
        raise TrainError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    total = train.total_steps
    params = jax.tree_util.tree_map(jnp.asarray, initial_params(cfg, train))
    opt_state = optimizer(train).init(params)  # stage 2's fresh AdamW has the same tree
    step, losses = 0, []
    if resume and state_path.exists():
        params, opt_state, step, losses = load_state(state_path, (params, opt_state), train)
        log(f"resumed at step {step}/{total}")
    pool = build_pool(cfg, train)
    reserved = reserved_tokens()
    recipes = (train, train.stage2())

    stopping = {"now": False}

    def on_signal(signum, frame):
        stopping["now"] = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if _main_thread() else {}
    bar = _bar(total, step, progress)
    last_save, window, done_here = time.time(), [], 0
    start = time.time()
    try:
        while step < total and not stopping["now"]:
            k, index = train.stage_at(step)
            if step == train.steps:  # stage 2 starts from a fresh optimiser state
                opt_state = optimizer(recipes[1]).init(params)
            batch = {n: jnp.asarray(v) for n, v in sample_batch(pool, recipes[k], index, reserved).items()}
            # the stage's jitted step, built on entering the stage and kept by stage_step's cache
            params, opt_state, loss, parts = stage_step(cfg, recipes[k])(params, opt_state, batch)
            step += 1
            done_here += 1
            window.append(float(loss))
            if not np.isfinite(window[-1]):
                raise TrainError(f"loss became {window[-1]} at step {step}; lower --lr")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(window[-50:]):.3f}", presence=f"{float(parts['presence']):.3f}",
                                stage=k + 1)
            if step % 100 == 0:
                losses.append(float(np.mean(window)))
                window = []
            if time.time() - last_save > train.checkpoint_every_s:
                save_state(state_path, params, opt_state, step, train, losses)
                last_save = time.time()
            if stop_after is not None and done_here >= stop_after:
                break
        save_state(state_path, params, opt_state, step, train, losses)
    finally:
        if bar is not None:
            bar.close()
        for s, h in old.items():
            signal.signal(s, h)
    return TrainResult(jax.tree_util.tree_map(np.asarray, params), step, losses, time.time() - start)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _bar(total: int, initial: int, on: bool):
    if not on:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
