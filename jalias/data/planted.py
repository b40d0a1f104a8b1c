"""Planted-alias problems: a tiny SAM3 whose ground truth is a hidden token sequence's own prediction.

There are no real SAM3 weights on a CPU test machine, so search quality is measured on problems whose answer is
known: a tiny random SAM3 (`tiny_config`), synthetic images, and as ground truth the masks that a hidden token
sequence predicts on them. The hidden sequence scores IoU 1.0 by construction; a search method is good when it
finds a sequence that gets close to 1.0 with few evaluations.

A random SAM3 is nearly prompt-blind (every prompt fires the same queries, or none, with the same masks), which
would make such a problem degenerate. `make_planted` therefore first calibrates the random weights with a few
linear re-parametrisations inside the SAM3 architecture (`calibrate`), measured on random prompts, never on the GT:

* damped outputs of the decoder's text/vision cross-attention (each query's hidden state stays mostly its own),
  of CLIP's attention/MLP (tokens act more independently: a smoother landscape) and of the prompt
  cross-attention into the pixel path (a query's mask depends on the prompt, but less than which queries fire);
* whitened query-scoring and mask-embedding layers: queries differ in which prompts select them and in the masks
  they draw; a centred pixel embedding, plus a constant mask-logit offset, so one query's mask covers part of the
  image, not all of it;
* a centred, scaled prompt projection in the scorer (query logits spread by ~`LOGIT_STD` over prompts), a
  saturated presence score and a common logit offset chosen so that random prompts keep ~`TARGET_KEEP` queries
  per image: WHICH queries fire, and so the predicted union, depends on the prompt.

Two kinds of problem are then planted (`kind=`):

* "direction" (default; `plant_direction`): the model gets a concept direction. A random direction w of the
  pooled prompt feature (whitened over random prompts) drives the query scores: logit_q = offset + A * r_q * p(x)
  + DIRECTION_NOISE * (the calibrated random scores), where p(x) is the prompt's projection on w in units of the
  hidden sequence's and r_q a per-query weight. The hidden sequence is the vocabulary's best sequence along w
  (exhaustive coordinate ascent), so the prompt -> mask map is graded and smooth in the tokens, like a trained
  model's concept: random sequences fire ~`RANDOM_KEEP` queries per image and score low, each right token adds
  queries of the target, and the hidden sequence fires ~`HIDDEN_KEEP`. Here gradients carry information.
* "random": the calibrated random model as it is, and a hidden sequence drawn at random. Which queries fire is a
  random cell structure in prompt space; many sequences come close to the hidden one's masks and token gradients
  carry little information (the hidden token's gradient rank is ~1/4 of the vocabulary): a hard, unstructured
  control.

In both, the hidden sequence's tokens come from `allowed_vocab` (by default the 2,000 most frequent whole-word CLIP
tokens plus the label's tokens), and it is only accepted when its masks are non-trivial (never empty, not nearly
full on most images) and every GT pixel and every kept/dropped query is decided with a margin, so that the Engine
reproduces the GT exactly. Search methods must be given the same `allowed_vocab` (SearchConfig.allowed_tokens) for
a fair comparison. Typical difficulty, seed 0: "direction": random sequences score mean IoU ~0.1 (best of 256:
~0.6), one wrong token ~0.75; "random": random ~0.34 (best of 256: ~0.87), one wrong token 0.3-0.9. The natural
label means nothing to a random model and scores low. Everything is a pure function of the arguments.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from ..engine import scoring
from ..model.config import Sam3Config, tiny_config
from ..model.init import random_params
from ..model.preprocess import preprocess
from ..model.sam3 import Sam3, Sam3Module
from ..tokenizer import encode, token_strings
from .masks import iou
from .synthetic import CONCEPT_NAMES, make_dataset

DEFAULT_VOCAB_SIZE = 2000
DEFAULT_QUERIES = 16
TEXT_CROSS_ATTN_SCALE = 0.1  # decoder text cross-attention output (queries stay distinct from each other)
VISION_CROSS_ATTN_SCALE = 0.3  # decoder vision cross-attention output
TEXT_MIX_SCALE = 0.3  # CLIP attention/MLP outputs (smaller: tokens act more independently)
PIXEL_PROMPT_SCALE = 0.15  # prompt cross-attention into the image tokens (fusion encoder, mask decoder)
LOGIT_STD = 3.0  # spread of query logits over prompts after calibration
TARGET_KEEP = 2.0  # mean kept queries per (random prompt, image) after calibration
PRESENCE_LOGIT = 6.0  # mean presence logit after calibration (sigmoid ~ 0.998)
MASK_OFFSET = 0.5  # single-query mask logits are shifted down by this many standard deviations
CALIBRATION_PROMPTS = 96
WHITEN_REG = 0.01  # ridge (relative to the mean eigenvalue) when whitening
MIN_COVER, MAX_COVER = 0.02, 0.75  # a non-trivial GT mask covers this fraction of the image
MIN_GOOD_FRACTION = 0.75  # ... on at least this fraction of the images (and no GT mask is empty)
MARGIN = 2e-4  # |decision value| every GT pixel and kept/dropped query must clear (the Engine differs by ~3e-5)
MAX_TRIES = 500
KINDS = ("direction", "random")
DIRECTION_NOISE = 0.3  # weight of the calibrated random query scores next to the concept direction
DIRECTION_WHITEN = 0.05  # ridge when whitening the pooled prompt feature for the direction
DIRECTION_SWEEPS = 2  # coordinate-ascent sweeps that find the best sequence along the direction
DIRECTION_TRIES = 20  # directions drawn until the hidden sequence's masks are non-trivial
RANDOM_KEEP = 0.3  # mean kept queries per (random prompt, image) in a "direction" problem
HIDDEN_KEEP = 4.0  # mean kept queries per image for the hidden sequence in a "direction" problem


@dataclass
class PlantedProblem:
    """A search problem with a known answer.

    model: the calibrated tiny SAM3; hidden_ids int32[L]: the planted sequence (content ids, no start/end);
    search_/heldout_images: uint8[S, S, 3]; search_/heldout_masks: bool[S, S], the hidden sequence's predicted
    masks (never empty); label/label_ids int32[<=L]: the concept's natural label and its content ids;
    allowed_vocab int32[M] (sorted): the tokens searches may use (the hidden sequence is drawn from it);
    stats: calibration and difficulty numbers (kept queries, mask coverage, random/label IoU).
    """

    model: Sam3
    hidden_ids: np.ndarray
    search_images: list[np.ndarray]
    search_masks: list[np.ndarray]
    heldout_images: list[np.ndarray]
    heldout_masks: list[np.ndarray]
    label: str
    label_ids: np.ndarray
    allowed_vocab: np.ndarray
    seed: int
    stats: dict = field(default_factory=dict)


def planted_vocab(size: int = DEFAULT_VOCAB_SIZE, include: tuple[int, ...] = ()) -> np.ndarray:
    """int32[size] sorted: the `size` most frequent (lowest-id) CLIP tokens that are whole lowercase words of
    3+ letters ("the</w>", "day</w>", ...), with the ids in `include` swapped in for the last ones."""
    if size < 1 + len(include):
        raise ValueError(f"vocabulary size {size} too small (must exceed the {len(include)} forced tokens)")
    include = sorted(set(int(i) for i in include))
    words = [i for i, t in enumerate(token_strings()[:49406])
             if t.endswith("</w>") and re.fullmatch(r"[a-z]{3,}", t[:-4]) and i not in include]
    if len(words) + len(include) < size:
        raise ValueError(f"vocabulary size {size} exceeds the {len(words) + len(include)} available word tokens")
    return np.sort(np.asarray(words[: size - len(include)] + include, np.int32))


# ----------------------------------------------------------------------------------------------------------------
# forward passes (plain jax; the Engine is not used here so that the GT does not depend on it)

@functools.lru_cache(maxsize=4)
def _encode_fn(cfg: Sam3Config):
    """jitted (params, pixel_values [K, 3, S, S]) -> image context (cached per config: compiled once)."""
    module = Sam3Module(cfg)
    return jax.jit(lambda params, px: module.apply({"params": params}, px, method=Sam3Module.encode_image))


def _image_context(cfg: Sam3Config, params: dict, images: list[np.ndarray]) -> dict:
    px = np.concatenate([preprocess(im, cfg.image_size) for im in images])
    return _encode_fn(cfg)(params, jnp.asarray(px))


_CAPTURE = ("pixel_decoder", "text_proj", "query_proj", "mask_embedder")


@functools.lru_cache(maxsize=4)
def _forward_fn(cfg: Sam3Config, size: int):
    """jitted (params, ctx [K...], ids [n, T], mask [n, T]) -> dict of [K, n, ...] outputs on every image:
    pred bool[size, size] union mask, keep bool[Q], margin (closest decision to its threshold), and the
    intermediate values calibration needs (one compiled function serves both; cached per config and size)."""
    module = Sam3Module(cfg)
    rows = jnp.asarray(scoring.bilinear_matrix(size, 4 * cfg.vision.backbone.grid))

    def fwd(params, ctx, ids, mask):
        prompt = module.apply({"params": params}, ids, mask, method=Sam3Module.text_features)

        def one(c):
            c = jax.tree_util.tree_map(lambda x: x[None], c)
            out, state = module.apply(
                {"params": params}, c, prompt, mask, method=Sam3Module.detect,
                capture_intermediates=lambda mod, _: mod.name in _CAPTURE, mutable=["intermediates"])
            inter = state["intermediates"]
            score = scoring.query_scores(out["pred_logits"], out["presence_logits"])  # [n, Q]
            keep = scoring.query_keep(out["pred_logits"], out["presence_logits"])
            best = scoring.union_decision(out["pred_masks"], keep, rows, rows)  # [n, size, size]
            return {
                "pred": best > 0, "keep": keep,
                # smallest distance of any decision to its threshold: pixels (of the union) and queries
                "margin": jnp.minimum(jnp.min(jnp.abs(best), axis=(1, 2)), jnp.min(jnp.abs(score - scoring.KEEP_THRESHOLD), axis=1)),
                "logits": out["pred_logits"], "presence": out["presence_logits"][:, 0],
                "mask_std": jnp.std(out["pred_masks"], axis=(1, 2, 3)),
                "pixel_mean": inter["mask_decoder"]["pixel_decoder"]["__call__"][0].mean((1, 2)),
                "pt": inter["dot_product_scoring"]["text_proj"]["__call__"][0],
                "pq": inter["dot_product_scoring"]["query_proj"]["__call__"][0],
                "emb": inter["mask_decoder"]["mask_embedder"]["__call__"][0],
            }

        return jax.lax.map(one, ctx)

    return jax.jit(fwd)


def _chunked(call, ids: np.ndarray, chunk: int):
    """Yield (call(input_ids [chunk, T], mask [chunk, T]), n valid rows) over ids int[N, L] in fixed-size chunks;
    the last chunk is padded by repeating its final row, so every call has one compiled shape."""
    ids = np.asarray(ids, np.int32)
    for s in range(0, len(ids), chunk):
        part = ids[s:s + chunk]
        n = len(part)
        input_ids, mask = scoring.layout_prompts(np.concatenate([part, np.repeat(part[-1:], chunk - n, 0)]))
        yield call(jnp.asarray(input_ids), jnp.asarray(mask)), n


def _run(fn, params, ctx, ids: np.ndarray, chunk: int = 64) -> dict:
    """Apply a `_forward_fn` to ids int[N, L] in fixed-size chunks -> dict of numpy [N, K, ...]."""
    outs = [{k: np.swapaxes(np.asarray(v), 0, 1)[:n] for k, v in o.items()}
            for o, n in _chunked(lambda i, m: fn(params, ctx, i, m), ids, chunk)]
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


@functools.lru_cache(maxsize=4)
def _prompt_feature_fn(cfg: Sam3Config):
    """jitted (params, ids [n, T], mask [n, T]) -> the scorer's projected pooled prompt [n, D] (the text side of
    the query logits; no image needed, so scanning the vocabulary is cheap)."""
    module = Sam3Module(cfg)

    def pooled(m, ids, mask):
        prompt = m.text_features(ids, mask)
        return m.dot_product_scoring(jnp.zeros((ids.shape[0], 1, prompt.shape[-1]), prompt.dtype), prompt, mask)

    def fwd(params, ids, mask):
        _, state = module.apply({"params": params}, ids, mask, method=pooled,
                                capture_intermediates=lambda mod, _: mod.name == "text_proj", mutable=["intermediates"])
        return state["intermediates"]["dot_product_scoring"]["text_proj"]["__call__"][0]

    return jax.jit(fwd)


def _prompt_features(cfg: Sam3Config, params: dict, ids: np.ndarray, chunk: int = 512) -> np.ndarray:
    """float64[N, D] `_prompt_feature_fn` of ids int[N, L], in fixed-size chunks."""
    fn = _prompt_feature_fn(cfg)
    return np.concatenate([np.asarray(o, np.float64)[:n]
                           for o, n in _chunked(lambda i, m: fn(params, i, m), ids, chunk)])


def _acceptable(o: dict) -> np.ndarray:
    """bool[n]: which rows of a `_run` output have non-trivial masks decided with a margin (see the docstring)."""
    cover = o["pred"].mean((-2, -1))  # [n, K]
    good = (cover >= MIN_COVER) & (cover <= MAX_COVER)
    return (cover > 0).all(1) & (good.mean(1) >= MIN_GOOD_FRACTION) & (o["margin"].min(1) > MARGIN)


def predict(model: Sam3, images: list[np.ndarray], ids: np.ndarray, size: int | None = None) -> np.ndarray:
    """bool[N, K, size, size]: the masks a float32 SAM3 predicts for candidates ids int[N, L] on K images (the
    Engine's rule: kept queries' bilinearly resized mask logits > 0, union). size: GT resolution (default: the
    images' height)."""
    if model.dtype != jnp.float32:
        raise ValueError(f"predict needs a float32 model, got {model.dtype}")
    size = int(size or images[0].shape[0])
    return _run(_forward_fn(model.config, size), model.params, _image_context(model.config, model.params, images),
                ids)["pred"]


# ----------------------------------------------------------------------------------------------------------------
# calibration

def _whiten(x: np.ndarray, reg: float) -> tuple[np.ndarray, np.ndarray]:
    """x [..., Q, D] -> (mean [D], M [D, D]) with (x - mean) @ M having identity within-query covariance."""
    x = x.astype(np.float64).reshape(-1, x.shape[-2], x.shape[-1])
    within = x - x.mean(0, keepdims=True)
    cov = np.einsum("nqd,nqe->de", within, within) / (within.shape[0] * within.shape[1])
    ev, u = np.linalg.eigh(cov)
    ev = np.maximum(ev, 0.0)
    return x.mean((0, 1)), u @ np.diag(1.0 / np.sqrt(ev + reg * ev.mean() + 1e-12)) @ u.T


def _affine(layer: dict, mean: np.ndarray, m: np.ndarray) -> None:
    """Make a dense layer output (y - mean) @ m instead of y (in place)."""
    layer["kernel"] = (layer["kernel"].astype(np.float64) @ m).astype(np.float32)
    layer["bias"] = ((layer["bias"].astype(np.float64) - mean) @ m).astype(np.float32)


def calibrate(cfg: Sam3Config, params: dict, ctx: dict, prompts: np.ndarray, size: int) -> tuple[dict, dict]:
    """Calibrated copy of random `params` (see the module docstring) from random prompts int[N, L] on the image
    context `ctx` (calibration leaves the image side alone, so contexts stay valid). Returns (params, stats)."""
    p = jax.tree_util.tree_map(lambda a: np.array(a, np.float32), params)
    dec = p["detr_decoder"]
    for name in [k for k in dec if k.startswith("layers_")]:
        for attn, f in (("text_cross_attn", TEXT_CROSS_ATTN_SCALE), ("vision_cross_attn", VISION_CROSS_ATTN_SCALE)):
            dec[name][attn]["o_proj"]["kernel"] *= np.float32(f)
            dec[name][attn]["o_proj"]["bias"] *= np.float32(f)

    for attn in [p["detr_encoder"][k]["cross_attn"] for k in p["detr_encoder"]] + [
            p["mask_decoder"]["prompt_cross_attn"]]:
        attn["o_proj"]["kernel"] *= np.float32(PIXEL_PROMPT_SCALE)
        attn["o_proj"]["bias"] *= np.float32(PIXEL_PROMPT_SCALE)
    for layer in p["text_encoder"]["text_model"]["encoder"].values():
        for a, b in (("self_attn", "out_proj"), ("mlp", "fc2")):
            layer[a][b]["kernel"] *= np.float32(TEXT_MIX_SCALE)
            layer[a][b]["bias"] *= np.float32(TEXT_MIX_SCALE)

    fn = _forward_fn(cfg, size)
    o = _run(fn, p, ctx, prompts)

    # 1. centre the pixel embedding (a single query's mask then covers about half the image, not all of it) and
    #    whiten the query-side layers so that queries differ from each other more than prompts move them
    md, sc = p["mask_decoder"], p["dot_product_scoring"]
    inst = md["instance_projection"]
    inst["bias"] = (-o["pixel_mean"].reshape(-1, o["pixel_mean"].shape[-1]).mean(0) @ inst["kernel"][0, 0]
                    ).astype(np.float32)
    _affine(md["mask_embedder"]["layers_2"], *_whiten(o["emb"], WHITEN_REG))
    _affine(sc["query_proj"], *_whiten(o["pq"], WHITEN_REG))
    pt = o["pt"][:, 0]  # [N, D]: the pooled prompt does not depend on the image
    sc["text_proj"]["bias"] = (sc["text_proj"]["bias"] - pt.mean(0)).astype(np.float32)
    o = _run(fn, p, ctx, prompts)

    # 2. scale the logits; channel 0 of the query/prompt projections and of the pixel/query mask embeddings
    #    becomes a constant, so that a common offset can be added to every query logit and to every mask logit
    a = np.float32(LOGIT_STD / max(float(o["logits"].std()), 1e-6))
    sc["text_proj"]["kernel"] *= a
    sc["text_proj"]["bias"] *= a
    for layer, value in ((sc["query_proj"], 1.0), (sc["text_proj"], 0.0), (inst, 1.0)):
        layer["kernel"][..., 0] = 0.0
        layer["bias"][0] = value
    mask_std = float(np.sqrt(np.mean(o["mask_std"] ** 2)))
    emb = md["mask_embedder"]["layers_2"]
    emb["kernel"][:, 0] = 0.0
    emb["bias"][0] = np.float32(-MASK_OFFSET * mask_std)
    o = _run(fn, p, ctx, prompts)

    # 3. presence: saturated (~PRESENCE_LOGIT), so that the keep rule is a threshold on the query logit alone and
    #    images do not differ in how hard they are to fire on; then bisect the common query-logit offset so that
    #    random prompts keep TARGET_KEEP queries per image on average
    shift = PRESENCE_LOGIT - float(o["presence"].mean())
    p["detr_decoder"]["presence_head"]["layer3"]["bias"] += np.float32(shift)
    logits, presence = o["logits"], o["presence"] + shift

    def mean_keep(c: float) -> float:
        # the keep rule (its numpy twin) on stored logits: only the offset to add to them is sought here
        return float(scoring.np_query_keep(logits + c, presence[..., None]).sum(-1).mean())

    lo, hi = -20.0, 20.0
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if mean_keep(mid) > TARGET_KEEP else (mid, hi)
    offset = 0.5 * (lo + hi)
    sc["text_proj"]["bias"][0] = np.float32(offset * np.sqrt(sc["text_proj"]["bias"].shape[0]))
    stats = {"text_proj_scale": float(a), "mask_logit_std": mask_std, "presence_shift": shift,
             "logit_offset": offset}
    return p, stats


def plant_direction(cfg: Sam3Config, params: dict, ctx: dict, prompts: np.ndarray, allowed: np.ndarray,
                    length: int, rng: np.random.Generator, size: int) -> tuple[dict, np.ndarray, dict]:
    """Give calibrated `params` a concept direction and find its best sequence ("direction" kind, see the module
    docstring). prompts int[N, L]: random calibration prompts. Returns (params, hidden int32[L], stats); raises
    RuntimeError when no direction in DIRECTION_TRIES gives non-trivial masks."""
    fn = _forward_fn(cfg, size)
    o = _run(fn, params, ctx, prompts)
    pt = o["pt"][:, 0].astype(np.float64)  # [N, D] projected pooled prompt (the same on every image)
    d = pt.shape[1]
    mu = pt.mean(0)
    ev, u = np.linalg.eigh(np.cov(pt.T))
    ev = np.maximum(ev, 0.0)
    for attempt in range(DIRECTION_TRIES):
        w = u @ ((u.T @ rng.normal(size=d)) / np.sqrt(ev + DIRECTION_WHITEN * ev.mean()))
        along = lambda ids: (_prompt_features(cfg, params, ids) - mu) @ w  # noqa: E731
        hidden = allowed[rng.integers(allowed.size, size=length)]
        for _ in range(DIRECTION_SWEEPS):  # exhaustive coordinate ascent: each position's best token in turn
            for i in range(length):
                cands = np.repeat(hidden[None], allowed.size, 0)
                cands[:, i] = allowed
                hidden = cands[int(np.argmax(along(cands)))]
        top = float(along(hidden[None])[0])
        proj = np.append((pt - mu) @ w / top, 1.0)  # p(x): random prompts, then the hidden sequence (= 1)
        oh = _run(fn, params, ctx, hidden[None])
        pq = np.concatenate([o["pq"], oh["pq"]]).astype(np.float64)  # [N+1, K, Q, D] query side of the logits
        weight = pq[..., 1]  # r_q: whitened, ~N(0, 1) over queries
        noise = np.einsum("nkqd,nd->nkq", pq[..., 2:], np.append(pt, oh["pt"][:, 0], 0)[:, 2:]) / np.sqrt(d)

        def mean_keep(offset: float, a: float, rows: slice) -> float:
            logits = offset + a * proj[rows, None, None] * weight[rows] + DIRECTION_NOISE * noise[rows]
            return float((logits > 0).sum(-1).mean())

        offset = _bisect(lambda c: mean_keep(c, 0.0, slice(0, -1)), RANDOM_KEEP, -50.0, 50.0)
        a = _bisect(lambda c: mean_keep(offset, c, slice(-1, None)), HIDDEN_KEEP, 0.0, 500.0)
        # text_proj: channel 0 = offset (the query side's channel 0 is 1), channel 1 = A * p(x), others damped
        tp = {k: np.asarray(v, np.float64) for k, v in params["dot_product_scoring"]["text_proj"].items()}
        kernel, bias = DIRECTION_NOISE * tp["kernel"], DIRECTION_NOISE * tp["bias"]
        kernel[:, 0], bias[0] = 0.0, offset * np.sqrt(d)
        kernel[:, 1] = a * np.sqrt(d) * (tp["kernel"] @ w) / top
        bias[1] = a * np.sqrt(d) * ((tp["bias"] - mu) @ w) / top
        planted = jax.tree_util.tree_map(lambda x: x, params)
        planted["dot_product_scoring"]["text_proj"] = {"kernel": kernel.astype(np.float32),
                                                       "bias": bias.astype(np.float32)}
        # A GT pixel within MARGIN of its threshold is common among 16 x 4096 pixels: before drawing a new
        # direction, shift every mask logit by a few multiples of the margin (a negligible change of the masks).
        emb = planted["mask_decoder"]["mask_embedder"]["layers_2"] = dict(
            params["mask_decoder"]["mask_embedder"]["layers_2"])
        bias0 = emb["bias"]
        for nudge in (0, 1, -1, 2, -2, 3, -3):
            emb["bias"] = bias0.copy()
            emb["bias"][0] += np.float32(4 * MARGIN * nudge)
            if _acceptable(_run(fn, planted, ctx, hidden[None]))[0]:
                stats = {"direction_tries": attempt + 1, "direction_scale": a, "direction_offset": offset,
                         "mask_nudge": 4 * MARGIN * nudge, "random_projection_std": float(proj[:-1].std()),
                         "random_projection_max": float(proj[:-1].max())}
                return planted, hidden.astype(np.int32), stats
    raise RuntimeError(f"no concept direction with non-trivial masks in {DIRECTION_TRIES} draws")


def _bisect(f, target: float, lo: float, hi: float, steps: int = 60) -> float:
    """x in [lo, hi] where the non-decreasing f(x) crosses target."""
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
    return 0.5 * (lo + hi)


def mean_iou(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """pred bool[N, K, H, W], gt bool[K, H, W] -> float32[N] mean IoU over images (empty vs empty = 1)."""
    return iou(pred, gt[None]).mean(-1).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------

def make_planted(seed: int, n_search: int = 8, n_heldout: int = 8, length: int = 4, config: Sam3Config | None = None,
                 image_size: int = 64, vocab=None, kind: str = "direction") -> PlantedProblem:
    """Build a planted problem (deterministic in all arguments).

    config: the SAM3 config (default tiny_config(image_size=56, width=32, queries=16)); image_size: synthetic image
    and GT mask size; vocab: None (the default 2,000-word vocabulary), an int (that many words) or a sequence of
    allowed token ids; kind: "direction" or "random" (see the module docstring). The images are
    `n_search + n_heldout` synthetic images of one concept (picked by the seed), whose natural label becomes
    `label_ids`.
    """
    if n_search < 1 or n_heldout < 0:
        raise ValueError(f"need n_search >= 1 and n_heldout >= 0, got {n_search}, {n_heldout}")
    if not 1 <= length <= 30:
        raise ValueError(f"length must be in [1, 30], got {length}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    cfg = config or tiny_config(image_size=56, width=32, queries=DEFAULT_QUERIES)
    concept = CONCEPT_NAMES[seed % len(CONCEPT_NAMES)]
    ds = make_dataset(n_search + n_heldout, image_size, concepts=[concept], seed=seed)
    images = [s.image for s in ds.samples]
    label = ds.concepts[0].label
    label_ids = np.asarray(encode(label)[:length], np.int32)
    if vocab is None or isinstance(vocab, (int, np.integer)):
        allowed = planted_vocab(DEFAULT_VOCAB_SIZE if vocab is None else int(vocab), tuple(label_ids))
    else:
        allowed = np.unique(np.asarray(vocab, np.int64)).astype(np.int32)
        if allowed.size < 2 or allowed.min() < 0 or allowed.max() >= 49406:
            raise ValueError("vocab must hold at least 2 content token ids in [0, 49406)")

    rng = np.random.default_rng([seed, 1])
    base = random_params(cfg, seed)
    # Calibration sees random prompts on all images (never the GT); one image set keeps one compiled shape.
    ctx = _image_context(cfg, base, images)
    prompts = allowed[rng.integers(allowed.size, size=(CALIBRATION_PROMPTS, length))]
    params, stats = calibrate(cfg, base, ctx, prompts, image_size)
    fn = _forward_fn(cfg, image_size)
    if kind == "direction":
        params, hidden, more = plant_direction(cfg, params, ctx, prompts, allowed, length, rng, image_size)
        stats.update(more)
    else:
        cand = allowed[rng.integers(allowed.size, size=(MAX_TRIES, length))]
        for start in range(0, MAX_TRIES, 64):
            ok = _acceptable(_run(fn, params, ctx, cand[start:start + 64]))
            if ok.any():
                hidden = cand[start + int(np.argmax(ok))]
                stats["hidden_tries"] = start + int(np.argmax(ok)) + 1
                break
        else:
            raise RuntimeError(f"no hidden sequence with non-trivial masks in {MAX_TRIES} draws (seed {seed})")
    model = Sam3(cfg, params)
    o = _run(fn, params, ctx, hidden[None])
    gt = o["pred"][0]

    # difficulty: fresh random sequences and the label against the planted GT (search images)
    rand = _run(fn, params, ctx, allowed[rng.integers(allowed.size, size=(CALIBRATION_PROMPTS, length))])
    lab = _run(fn, params, ctx, label_ids[None])
    r_iou = mean_iou(rand["pred"][:, :n_search], gt[:n_search])
    stats.update(
        kind=kind,
        hidden_cover=[float(c) for c in gt.mean((-2, -1))],
        hidden_keep=[int(k) for k in o["keep"][0].sum(-1)],
        random_keep_mean=float(rand["keep"].sum(-1).mean()),
        random_iou_mean=float(r_iou.mean()),
        random_iou_max=float(r_iou.max()),
        label_iou=float(mean_iou(lab["pred"][:, :n_search], gt[:n_search])[0]),
    )
    return PlantedProblem(
        model=model, hidden_ids=hidden.astype(np.int32),
        search_images=images[:n_search], search_masks=list(gt[:n_search]),
        heldout_images=images[n_search:], heldout_masks=list(gt[n_search:]),
        label=label, label_ids=label_ids, allowed_vocab=allowed, seed=seed, stats=stats)
