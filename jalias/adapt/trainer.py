"""Training one adapter with optax: one jitted step for both teachers, a progress bar, resumable state.

    from jalias.adapt import AdaptConfig, alias_targets, image_contexts, teacher_outputs, train_adapter
    ctx = image_contexts(model, images)                                   # [K, ...] search images
    targets = alias_targets(ctx, teacher_outputs(model, alias_ids, ctx), cfg)   # or gt_targets(...)
    adapter = train_adapter(model, label_ids, targets, cfg, label="kiwi")

Each step sees every training image (full batch), so the run is a pure function of (model, targets, config): a
run resumed from its saved state ends with the same adapter, bit for bit, as an uninterrupted one. The optimiser
state holds the adapter params only (the base params are a non-differentiated argument of the step). Each image's
detect pass is rematerialised in the backward pass (`AdaptConfig.remat`), so activations are held for one image
at a time.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..engine.predict import layout
from ..model.sam3 import Sam3
from .adapters import (Adapter, expand_label, fresh_embed, fresh_lora, lora_targets, merge_lora, model_fingerprint,
                       slot_lookup)
from .config import AdaptConfig, AdaptError
from .loss import Targets, image_loss
from .store import load_state, save_state

_STEPS: dict = {}  # (config, dtype, mode, kind, label ids, scale, remat, optimiser) -> step shared by both teachers


def optimizer(cfg: AdaptConfig) -> optax.GradientTransformation:
    """Adam with linear warmup then cosine decay to 10% of the rate, after global-norm clipping. The warmup
    starts at lr / warmup (not 0, which would make the first step no update at all) and reaches lr at step
    `warmup`."""
    lr = cfg.lr_for()
    w = max(cfg.warmup, 1)
    sched = optax.warmup_cosine_decay_schedule(lr / w, lr, w, max(cfg.steps, cfg.warmup + 1), lr * 0.1)
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), optax.adam(sched))


def prompt_features(model: Sam3, kind: str, params: dict, base_params: dict, scale: float, ids, mask):
    """Features [B, T, D] of prompts ids/mask [B, T] with the adapter params, and the params detect runs with.
    embed: ids already laid out by `expand_label` (slot ids >= the vocabulary size take the learned rows)."""
    if kind == "embed":
        vocab = model.config.text.vocab_size
        emb = slot_lookup(lambda i: model.apply("embed_tokens", i, params=base_params), ids, params["rows"], vocab)
        return model.apply("encode_text", emb, mask, params=base_params)[0], base_params
    merged = merge_lora(base_params, params, scale)
    return model.apply("text_features", ids, mask, params=merged), merged


def embed_length(cfg: AdaptConfig, label_ids: Sequence[int], alias_length: int | None = None) -> int:
    """How many learned rows an embed adapter has: cfg.length; 0 -> the label's token count; -1 -> the alias's
    (alias_length), the label's when no alias is given."""
    if cfg.length > 0:
        return int(cfg.length)
    if cfg.length == -1 and alias_length:
        return int(alias_length)
    return len(label_ids)


def preserve_batch(model: Sam3, cfg: AdaptConfig, label_ids: Sequence[int] = ()) -> dict | None:
    """The prompts whose text features the preservation term keeps in place, and their base features:
    {"ids", "mask": int32[P, T], "base": float32[P, T, D]}; None when cfg.w_preserve is 0.

    For a multi-token label, cfg.preserve_neighbours of its neighbours (`label_neighbours`: its words in other
    company, the prompts a lora for this label is most likely to move); then cfg.preserve_prompts random prompts
    of 1-4 common words (CLIP's most frequent whole-word tokens). Seeded by cfg.seed.
    Their features' drift is the preservation term (see `make_step`). None for an embed adapter too: it changes
    only the exact label, so the drift would be 0."""
    if cfg.w_preserve <= 0 or cfg.kind == "embed":
        return None
    from ..data.planted import planted_vocab

    vocab = planted_vocab(2000)
    rng = np.random.default_rng([cfg.seed, 7])
    prompts = label_neighbours(label_ids, vocab, cfg.preserve_neighbours, np.random.default_rng([cfg.seed, 8]))
    prompts += [vocab[rng.integers(vocab.size, size=int(rng.integers(1, 5)))] for _ in range(cfg.preserve_prompts)]
    ids, mask = layout(prompts, model.config.context_length)
    return {"ids": jnp.asarray(ids), "mask": jnp.asarray(mask),
            "base": jnp.asarray(model.encode_text(ids, mask), jnp.float32)}


def label_neighbours(label_ids: Sequence[int], vocab: np.ndarray, n: int, rng: np.random.Generator) -> list:
    """Up to n prompts that share tokens with a multi-token label without containing it: each of its tokens alone,
    then the label with one token swapped for a random vocabulary word ("blue triangle" -> "blue cargo", "pencil
    triangle"). A lora that makes the label do something new tends to move exactly these (they share its tokens'
    states). A one-token label has none: every prompt holding its token contains the label, and may change with it
    (measured: keeping "tomato cargo" in place keeps "tomato" from learning, benchmarks/RESULTS.md)."""
    label = [int(t) for t in label_ids]
    if len(label) < 2:
        return []
    out = [[t] for t in label][:n]
    while len(out) < n:
        w = int(vocab[rng.integers(vocab.size)])
        if w not in label:
            pos = int(rng.integers(len(label)))
            out.append(label[:pos] + [w] + label[pos + 1:])
    return out


def rel_sq(x, target, weight=1.0):
    """Relative squared distance: sum(weight * (x - target)^2) / sum(weight * target^2) (floored at 1e-12), in
    float32; weight broadcasts against both (a validity mask, or 1)."""
    x, target = x.astype(jnp.float32), target.astype(jnp.float32)
    return jnp.sum((x - target) ** 2 * weight) / jnp.maximum(jnp.sum(target ** 2 * weight), 1e-12)


def make_step(model: Sam3, cfg: AdaptConfig, label_ids: Sequence[int]) -> SimpleNamespace:
    """.step: jit(step)(params, opt_state, base_params, ids, mask, detect_mask, ctx, targets, weights, keep)
    -> (params, opt_state, loss, parts[6]); .loss: jit(loss_fn)(params, base_params, ...) -> (loss, parts).
    parts: query, presence, union (image terms, `loss.image_loss`), drift, gap and state gap. feat
    (`feature_args`, or None): embed: the alias's prompt features; the loss then adds w_features * on * gap, gap =
    the sum of squared differences of the label's prompt features to them over the alias's valid positions / the
    sum of their squares. lora: the alias's query states and fused image tokens per image; the loss adds
    w_states * on * state gap, the mean over images of the same relative distance for each of the two. One
    function (and one compiled program per shape) for both teachers: the teacher only changes the target arrays
    and the term weights, which are arguments. keep (`preserve_batch`, or None): other prompts
    whose prompt features should not move; the loss then adds w_preserve * drift, drift = sum of squared feature
    changes over their valid positions / the sum of their squared base features (0 for an embed adapter: those
    prompts never are the label)."""
    scale = cfg.alpha / cfg.rank if cfg.kind == "lora" else 0.0
    # models with the same config, dtype, mode and attention share a step (params are arguments, not constants)
    key = (model.config.to_json(), model.dtype.name, model.prompt_mode, repr(model.attention), cfg.kind,
           tuple(label_ids), scale, cfg.remat, cfg.lr_for(), cfg.steps, cfg.warmup, cfg.clip_norm, cfg.w_preserve,
           cfg.w_features, cfg.w_states)
    if key in _STEPS:
        return _STEPS[key]
    opt = optimizer(cfg)

    def loss_fn(params, base_params, ids, mask, dmask, ctx, targets, weights, keep=None, feat=None):
        if keep is not None:  # one text pass over the label and the prompts to preserve
            ids, mask = jnp.concatenate([ids, keep["ids"]]), jnp.concatenate([mask, keep["mask"]])
        feats, det_params = prompt_features(model, cfg.kind, params, base_params, scale, ids, mask)
        prompt = feats[:1]
        states = feat is not None and "hidden" in feat  # lora: the alias's detector states per image

        def one(args):
            c, t, st = args
            c = jax.tree_util.tree_map(lambda x: x[None], c)
            out, inner = model.apply("detect_fast_parts", c, prompt, dmask, params=det_params)
            loss, parts = image_loss(out, t, weights)
            if not states:
                return loss, parts, jnp.float32(0.0)
            return loss, parts, rel_sq(inner["hidden"][0], st["hidden"]) + rel_sq(inner["enc"][0], st["enc"])

        if cfg.remat:
            one = jax.checkpoint(one)
        st = {"hidden": feat["hidden"], "enc": feat["enc"]} if states else None
        losses, parts, state_gaps = jax.lax.map(one, (ctx, targets, st))
        loss, drift = jnp.mean(losses), jnp.float32(0.0)
        if keep is not None:
            valid = keep["mask"][..., None].astype(jnp.float32)
            drift = rel_sq(feats[1:], keep["base"], valid)
            loss = loss + cfg.w_preserve * drift
        gap, state_gap = jnp.float32(0.0), jnp.mean(state_gaps)
        if states:  # the detector's query states and fused image tokens against the alias's, image by image
            loss = loss + cfg.w_states * feat["on"] * state_gap
        elif feat is not None:  # the label's prompt features against the alias's, position by position
            m, want = feat["mask"][:, None], feat["target"]
            gap = rel_sq(prompt[0], want, m)
            loss = loss + cfg.w_features * feat["on"] * gap
        return loss, jnp.concatenate([jnp.mean(parts, axis=0), drift[None], gap[None], state_gap[None]])

    def step(params, opt_state, base_params, ids, mask, dmask, ctx, targets, weights, keep=None, feat=None):
        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, base_params, ids, mask, dmask,
                                                                        ctx, targets, weights, keep, feat)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, parts

    # the adapter's params and optimiser state are donated (updated in place; the caller passes them in and keeps
    # only what the step returns)
    _STEPS[key] = SimpleNamespace(step=jax.jit(step, donate_argnums=(0, 1)), loss=jax.jit(loss_fn))
    return _STEPS[key]


def label_layout(model: Sam3, label_ids: Sequence[int], length: int | None = None):
    """The label's prompt row as training sees it: (ids, mask, detect mask) jax int32[1, T]. For an embed
    adapter (length = its row count) the row the adapted model lays out: START, `length` slot ids, END."""
    ids, mask = layout([label_ids], model.config.context_length)
    if length is not None:
        vocab = model.config.text.vocab_size
        ids, mask = expand_label(ids, mask, label_ids, range(vocab, vocab + length))
    return jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(model.prompt_mask(ids, mask))


def feature_args(model: Sam3, cfg: AdaptConfig, targets: Targets, ids, mask) -> dict | None:
    """The step's `feat` argument, the same shapes for both teachers so that they run one compiled step.

    lora: None when cfg.w_states is 0 (the term off; the default is 100); else {"hidden": float32[K, Q, D],
    "enc": float32[K, g*g, D], "on"}: the alias's decoder query states and fused image tokens on each training
    image (`Targets.states`, on = 1), or zeros with on = 0 (gt teacher). They line up whatever the two prompts'
    lengths.
    embed: {"target": float32[T, D], "mask": float32[T], "on"}: the alias's prompt features
    (`Targets.feature_target`, on = 1) when cfg.w_features > 0 and the label's prompt (ids / mask [1, T]) is as
    long as the alias's, else zeros with on = 0."""
    if cfg.kind == "lora":
        if cfg.w_states <= 0:
            return None
        if targets.states is not None:
            return {"hidden": jnp.asarray(targets.states["hidden"], jnp.float32),
                    "enc": jnp.asarray(targets.states["enc"], jnp.float32), "on": jnp.float32(1.0)}
        c = jax.tree_util.tree_map(lambda x: x[:1], targets.ctx)
        prompt = jax.eval_shape(lambda: model.apply("text_features", ids, mask))
        _, inner = jax.eval_shape(lambda p: model.apply("detect_fast_parts", c, p, mask), prompt)
        k = targets.n_images
        return {"hidden": jnp.zeros((k, *inner["hidden"].shape[1:]), jnp.float32),
                "enc": jnp.zeros((k, *inner["enc"].shape[1:]), jnp.float32), "on": jnp.float32(0.0)}
    got = targets.feature_target(int(np.sum(mask))) if cfg.w_features > 0 else None
    if got is not None:
        return {**got, "on": jnp.float32(1.0)}
    shape = jax.eval_shape(lambda: model.apply("text_features", ids, mask)).shape  # [1, T, D]
    return {"target": jnp.zeros(shape[1:], jnp.float32), "mask": jnp.zeros(shape[1:2], jnp.float32),
            "on": jnp.float32(0.0)}


def fresh_params(model: Sam3, cfg: AdaptConfig, label_ids: Sequence[int],
                 length: int | None = None) -> tuple[dict, tuple[str, ...]]:
    if cfg.kind == "embed":
        return fresh_embed(model, label_ids, length), ()
    targets = tuple(lora_targets(model, cfg.target_patterns()))
    return fresh_lora(model, targets, cfg.rank, cfg.seed), targets


def _bar(enabled: bool, total: int, done: int, title: str):
    if not enabled:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), console=Console(stderr=True))
    bar.start()
    bar.task = bar.add_task(title, total=total, completed=done, loss="-")
    return bar


def train_adapter(model: Sam3, label_ids: Sequence[int], targets: Targets, cfg: AdaptConfig, label: str = "",
                  category: str = "", state_dir: str | Path | None = None, resume: bool = False,
                  progress: bool = True, log: Callable[[str], None] | None = None,
                  stop_after: int | None = None, alias_length: int | None = None) -> Adapter:
    """Train an adapter so that prompting `model` with label_ids reproduces `targets` (loss: `loss.py`).

    model: the base model (not an AdaptedSam3); label_ids: the label's content ids; state_dir: where the
    training state is saved (every cfg.checkpoint_every_s seconds, on Ctrl-C / SIGTERM and at the end); resume:
    continue from it (AdaptError if it belongs to another model, label, teacher or config); stop_after: stop (as
    if interrupted: state saved, KeyboardInterrupt) once this many steps are done (tests); alias_length: the
    alias's token count (an embed adapter's row count when cfg.length is -1).
    Returns the Adapter; metrics: loss_first (before any update), loss_last, loss per step ("losses").
    """
    cfg.validate()
    if getattr(model, "base", None) is not None:
        raise AdaptError("train an adapter on the base model, not on a model with adapters applied")
    label_ids = tuple(int(i) for i in label_ids)
    if not label_ids:
        raise AdaptError(f"label {label!r} has no tokens")
    fp = model_fingerprint(model)
    length = embed_length(cfg, label_ids, alias_length) if cfg.kind == "embed" else None
    params, lora_paths = fresh_params(model, cfg, label_ids, length)
    opt = optimizer(cfg)
    opt_state = opt.init(params)
    owner = {"fingerprint": fp, "label_ids": list(label_ids), "length": length, "teacher": targets.teacher,
             "config": cfg.to_dict(), "prompt_mode": model.prompt_mode}
    start, losses, parts_log = 0, [], []
    state_dir = Path(state_dir) if state_dir is not None else None
    if resume and state_dir is not None:
        got = load_state(state_dir, opt_state, cfg.kind)
        if got is not None:
            saved_params, saved_opt, meta = got
            if meta.get("owner") != owner:
                diff = [k for k in owner if meta.get("owner", {}).get(k) != owner[k]]
                raise AdaptError(f"the training state in {state_dir} is for another {'/'.join(diff)} (start over "
                                 f"without --resume)")
            params = jax.tree_util.tree_map(jnp.asarray, saved_params)
            opt_state = jax.tree_util.tree_map(jnp.asarray, saved_opt)
            start, losses, parts_log = int(meta["step"]), list(meta["losses"]), list(meta["parts"])
            if log:
                log(f"resumed {label or label_ids} at step {start}/{cfg.steps}")
    step = make_step(model, cfg, label_ids)
    ids, mask, dmask = label_layout(model, label_ids, length)
    arrays, weights = targets.arrays(), jnp.asarray(targets.weights)
    feat = feature_args(model, cfg, targets, ids, mask)
    args = (model.params, ids, mask, dmask, targets.ctx, arrays, weights, preserve_batch(model, cfg, label_ids), feat)

    def save(done: int):
        # an interrupt that lands between a step's call and the assignment of its result leaves the donated
        # arrays deleted: then the last saved state stands (it loses the steps since, never finished work)
        if state_dir is not None and not any(x.is_deleted() for x in jax.tree_util.tree_leaves((params, opt_state))
                                             if isinstance(x, jax.Array)):
            save_state(state_dir, params, opt_state, {"owner": owner, "step": done, "losses": losses,
                                                      "parts": parts_log}, cfg.kind)

    bar = _bar(progress, cfg.steps, start, f"adapt {label or list(label_ids)} ({cfg.kind}, {targets.teacher})")
    old = _sigterm_as_interrupt()
    last_save = time.monotonic()
    try:
        for i in range(start, cfg.steps):
            if stop_after is not None and i >= stop_after:
                raise KeyboardInterrupt
            params, opt_state, loss, parts = step.step(params, opt_state, *args)
            losses.append(float(loss))
            parts_log.append([float(x) for x in parts])
            if bar is not None:
                bar.update(bar.task, completed=i + 1, loss=f"{losses[-1]:.4f}")
            if time.monotonic() - last_save > cfg.checkpoint_every_s:
                save(i + 1)
                last_save = time.monotonic()
    except KeyboardInterrupt:
        save(len(losses))
        raise
    finally:
        if bar is not None:
            bar.stop()
        _restore_sigterm(old)
    save(cfg.steps)
    final = float(step.loss(params, *args)[0])
    first = losses[0] if losses else final
    metrics = {"loss_first": first, "loss_last": final, "losses": losses,
               "loss_parts_last": parts_log[-1] if parts_log else None,
               "feature_term": bool(feat is not None and feat["on"])}
    return Adapter(kind=cfg.kind, label=label, label_ids=label_ids,
                   params=jax.tree_util.tree_map(np.asarray, params), fingerprint=fp, category=category,
                   teacher=targets.teacher, steps=cfg.steps, rank=cfg.rank if cfg.kind == "lora" else 0,
                   alpha=cfg.alpha if cfg.kind == "lora" else 0.0, targets=lora_paths,
                   prompt_mode=model.prompt_mode, metrics=metrics)


def _sigterm_as_interrupt():
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None


def _restore_sigterm(old) -> None:
    if old is not None:
        try:
            signal.signal(signal.SIGTERM, old)
        except ValueError:
            pass
