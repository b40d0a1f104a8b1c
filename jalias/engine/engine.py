"""Batched scoring engine: many candidate token sequences x a fixed set of images -> IoU.

What it does per `score(ids[N, L])`:
  1. lays candidates out as SAM3 prompts (START ids END PAD..), pads N up to a bucket size (no recompiles);
  2. text-prefix cache: candidates are sorted by how long a prefix they share with a reference sequence; the
     reference's CLIP token states and keys/values are computed once and every chunk only runs its differing
     suffix, over the shortest text bucket holding the longest prompt;
  3. per image (features cached on device; optionally on disk), the prompt-dependent part of SAM3 (fusion
     encoder, decoder, heads) and the exact mask IoU run in one jitted call over the chunk, which skips unselected
     images and runs the mask head only on groups of rows in which one keeps a query (`mask_gate`). In "meta"
     prompt mode the image cache also holds the geometry encoder's CLS token (one per image), which `detect` appends to
     every candidate's prompt (one more prompt token), and token id 0 is masked out of the detect-side prompt
     as in Meta's SAM3 (CLIP still reads it). The soft surrogate (`soft_loss*`) has no ids: all its content
     positions count as valid;
  4. with several devices the candidate axis is sharded over a 1-D mesh: by default this process's local devices;
     with `devices=jax.devices()` after `jalias.engine.distributed.initialize()`, every device of every process
     (each process then calls `score` with the same candidates, computes its devices' rows and receives all rows).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ..model import layers
from ..model.preprocess import load_image, preprocess
from ..model.sam3 import Sam3
from ..tokenizer import CONTEXT_LENGTH, END_ID, START_ID, round_trips, tokenize
from . import scoring
from .caches import enable_compilation_cache, load_ctx, model_hash, save_ctx
from .chunks import prefix_bucket, row_bucket, shared_prefix

# what `detect_fast` reads of an image context (`Sam3.encode_image`): the engine holds only these
CONTEXT_KEYS = ("enc0", "terms", "geo")
# auto chunk size on CPU: larger chunks are slower there (benchmarks/RESULTS.md, "Engine at scale")
CPU_CHUNK = 128
GRAD_COST = 3  # a value-and-grad call costs about 3 forward evaluations per image (what a search is charged)


@dataclass
class _Targets:
    """Every image's GT, padded to one bucket shape (Hb, Wb) so that one compiled program scores any mix of
    resolutions: the padding is False in the GT and gets a zero row/column in the resize matrices, so the
    predicted mask there is 0 (not > 0) and IoU counts exactly the real pixels."""

    gt: jax.Array  # bool [K, Hb, Wb]
    rows: jax.Array  # [K, Hb, m] bilinear resize matrices (rows >= the image's H are zero)
    cols: jax.Array  # [K, Wb, m]


class Engine:
    """Score candidate prompts on a fixed image set.

    model: a loaded `Sam3`; images: uint8 [H, W, 3] arrays or image paths; gt_masks: bool [H', W'] per image
    (the union of the concept's instances; empty for a negative image); negative: per-image flags (images where
    the alias should predict nothing); chunk_size: candidates per compiled step (None: chosen from free memory);
    prefix_cache: reuse CLIP keys/values of shared prefixes; cache_dir: on-disk image-feature cache;
    prompt_mode: "meta" | "hf" | None (the model's own, see `Sam3`): which reference SAM3 the scores follow.
    gt_bucket: GT masks are padded to the largest H and W rounded up to a multiple of this, so one compiled
    program scores every mix of resolutions (and every image set whose largest size rounds alike, e.g. COCO's).
    text_bucket: prompts run up to the longest one's END rounded up to a multiple of this (0: the whole context).
    mask_gate: per image, a chunk's candidates are split into this many groups (those keeping a query first) and the
    mask head (most of the per-candidate work) runs only on groups with a candidate keeping a query (0 or 1: the
    whole chunk is one group); same IoUs. On one device the detector also runs in this many groups of rows, and a
    group of padding rows (a chunk is padded to a power-of-two bucket) is skipped.
    max_kept: tiers of kept-query counts: when no candidate of a group keeps more queries than a tier, only each
    candidate's first (tier) queries in kept-first order get masks (computed and resized); beyond the largest tier
    all queries do (`scoring.exact_iou`); same IoUs.
    """

    vocab_size: int
    max_length: int = CONTEXT_LENGTH - 2
    special_ids: tuple[int, ...] = (START_ID, END_ID)  # never proposed: CLIP's start / end (= padding) ids
    grad_cost: int = GRAD_COST

    def __init__(self, model: Sam3, images: Sequence, gt_masks: Sequence, negative: Sequence[bool] | None = None,
                 chunk_size: int | None = None, prefix_cache: bool = True, cache_dir: str | None = None,
                 threshold: float = 0.5, negative_weight: float = 0.5, devices: Sequence | None = None,
                 compilation_cache: bool = True, prompt_mode: str | None = None, gt_bucket: int = 64,
                 text_bucket: int = 8, mask_gate: int = 8, max_kept: int | Sequence[int] = (4, 8, 16)):
        if len(images) == 0:
            raise ValueError("Engine needs at least one image")
        if len(images) != len(gt_masks):
            raise ValueError(f"got {len(images)} images but {len(gt_masks)} GT masks")
        if compilation_cache:
            enable_compilation_cache()
        self.model = model = model.with_prompt_mode(prompt_mode)
        self.prompt_mode = model.prompt_mode
        self.config = model.config
        self.vocab_size = model.config.text.vocab_size
        self.threshold = float(threshold)
        self.negative_weight = float(negative_weight)
        # a model whose token embeddings depend on the whole prompt (jalias.adapt's embed adapters) cannot reuse
        # another prompt's cached prefix
        self.prefix_cache = prefix_cache and getattr(model, "prefix_cacheable", True)
        self.evals = 0
        self.is_negative = np.zeros(len(images), bool) if negative is None else np.asarray(negative, bool)
        if self.is_negative.shape != (len(images),):
            raise ValueError("negative flags must have one entry per image")
        self.devices = list(devices) if devices is not None else jax.local_devices()
        self.mesh = Mesh(np.array(self.devices), ("cand",))
        self.gts = [self._check_gt(m, i) for i, m in enumerate(gt_masks)]
        if gt_bucket < 1:
            raise ValueError(f"gt_bucket must be >= 1 pixel, got {gt_bucket}")
        if text_bucket < 0:
            raise ValueError(f"text_bucket must be >= 0 tokens (0: the whole context), got {text_bucket}")
        self.text_bucket = int(text_bucket)
        if mask_gate < 0:
            raise ValueError(f"mask_gate must be >= 0 (0: off), got {mask_gate}")
        self.mask_gate = int(mask_gate)
        self.max_kept = scoring.kept_tiers(max_kept)
        self._jit_encode = jax.jit(self._encode_fn)
        # the image contexts, stacked [K, ...] once and held once (exact scoring and the soft loss read the same copy)
        rep = NamedSharding(self.mesh, P())
        self._ctx = jax.device_put(jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs, 0),
                                                          *self._image_contexts(images, cache_dir)), rep)
        self._targets = self._make_targets(gt_bucket, rep)
        self._soft = self._make_soft_targets(rep)
        self.chunk_size = self._round_chunk(chunk_size) if chunk_size else self._auto_chunk()
        self._jit_text = jax.jit(self._text_fn, static_argnames=("prefix",))
        self._jit_iou = jax.jit(self._iou_fn, static_argnames=("batch",))
        self._jit_soft = jax.jit(jax.value_and_grad(self._soft_loss_fn), static_argnames=("grad_batch",))
        self.grad_batch = 1  # images per step of the soft loss's image loop (see _soft_loss_fn)

    # ------------------------------------------------------------------------------------------------------------
    # setup
    def _check_gt(self, m, i: int) -> np.ndarray:
        m = np.asarray(m)
        if m.ndim != 2:
            raise ValueError(f"GT mask {i} must be bool[H, W], got shape {list(m.shape)}")
        m = m.astype(bool)
        if not m.any() and not self.is_negative[i]:
            raise ValueError(f"GT mask {i} is empty but the image is not marked negative")
        return m

    def _image_contexts(self, images, cache_dir) -> list[dict]:
        """Per image, what the prompt-dependent path (`detect_fast`) reads: the first encoder self-attention block,
        the pixel decoder's skip terms (and Meta's CLS token), in the model's dtype; computed once (the FPN maps
        themselves are dropped) or read from the on-disk cache, keyed by the image's pixels, the prompt mode and a
        hash of every weight (a fine-tuned or adapted checkpoint never reuses another's features)."""
        size = self.config.image_size
        key_of = (model_hash(self.model) + self.prompt_mode).encode() if cache_dir else b""
        out = []
        for i, im in enumerate(images):
            arr = load_image(im) if isinstance(im, (str, os.PathLike)) else np.asarray(im)
            px = preprocess(arr, size)
            ctx = None
            path = None
            if cache_dir:
                path = Path(cache_dir) / f"{hashlib.sha256(px.tobytes() + key_of).hexdigest()[:32]}.npz"
                if path.exists():
                    ctx = load_ctx(path, jax.eval_shape(self._jit_encode, self.model.params, px))
            if ctx is None:
                ctx = self._jit_encode(self.model.params, jnp.asarray(px))
                if path is not None:
                    save_ctx(path, ctx)
            out.append(ctx)
        return out

    def _encode_fn(self, params, px) -> dict:
        ctx = self.model.apply("encode_image", px, params=params)
        return {k: jax.tree_util.tree_map(lambda a: a.astype(self.model.dtype), v)
                for k, v in ctx.items() if k in CONTEXT_KEYS}

    @property
    def contexts(self) -> list[dict]:
        """Per-image contexts (batch 1), sliced from the one stacked copy on access."""
        return [jax.tree_util.tree_map(lambda x: x[i:i + 1], self._ctx) for i in range(self.n_images)]

    def _make_targets(self, bucket: int, rep) -> _Targets:
        up = lambda n: -(-n // bucket) * bucket  # noqa: E731
        hb, wb = up(max(g.shape[0] for g in self.gts)), up(max(g.shape[1] for g in self.gts))
        m = 4 * self.config.vision.backbone.grid
        gt = np.zeros((self.n_images, hb, wb), bool)
        rows = np.zeros((self.n_images, hb, m), np.float32)
        cols = np.zeros((self.n_images, wb, m), np.float32)
        for i, g in enumerate(self.gts):
            h, w = g.shape
            gt[i, :h, :w] = g
            rows[i, :h] = scoring.bilinear_matrix(h, m)
            cols[i, :w] = scoring.bilinear_matrix(w, m)
        return _Targets(*(jax.device_put(x, rep) for x in (gt, rows, cols)))

    def _make_soft_targets(self, rep) -> dict:
        """The soft surrogate's per-image targets (the contexts are not copied: the loss reads `self._ctx`)."""
        m = 4 * self.config.vision.backbone.grid
        gt = np.stack([scoring.area_resize(g, m) for g in self.gts])
        return {"gt": jax.device_put(gt, rep), "neg": jax.device_put(self.is_negative, rep)}

    def _auto_chunk(self) -> int:
        """Candidates per step from free device memory and a per-candidate activation estimate, rounded down
        (OOM halving in the run pipeline stays the safety net), at most CPU_CHUNK on a CPU."""
        free = _free_memory(self.devices[0])
        c = self.config
        g2 = c.vision.backbone.grid ** 2
        d, q, m2 = c.encoder.hidden_size, c.decoder.num_queries, (4 * c.vision.backbone.grid) ** 2
        item = self.model.dtype.itemsize
        # blocked attention holds about two [q_block, k_block] logit blocks, not the whole [g2, g2]
        blocked = g2 * g2 >= self.model.attention.blocked_min_pairs
        pairs = 2 * layers.Q_BLOCK * layers.K_BLOCK if blocked else g2 * g2
        per = (c.encoder.num_attention_heads * pairs * 4  # encoder attention logits (fp32)
               + 12 * g2 * max(c.encoder.intermediate_size, d) * item  # encoder/decoder activations
               + 6 * m2 * d * item + 2 * q * m2 * 4)  # pixel decoder + mask logits
        per *= 2  # headroom for fusion temporaries
        cap = CPU_CHUNK if self.devices[0].platform == "cpu" else 1024
        n = max(len(self.devices), min(int(free * 0.5 // max(per, 1)), cap))
        # the largest power of two (times the device count) within the estimate: never more than it allows
        k = len(self.devices)
        return k * (1 << ((n // k).bit_length() - 1))

    def _round_chunk(self, n: int) -> int:
        k = len(self.devices)
        n = max(k, int(n))
        return 1 << (n - 1).bit_length() if n <= 1024 else n - n % k

    # ------------------------------------------------------------------------------------------------------------
    # jitted pieces
    def _text_fn(self, params, ids, mask, ref_feats, ref_kv, prefix: int):
        """Prompt features [n, T, D] for ids [n, T]; positions < prefix are taken from the reference's cache."""
        sam = lambda method, *a, **k: self.model.apply(method, *a, params=params, **k)
        if prefix == 0:
            return sam("text_features", ids, mask)
        emb = sam("embed_tokens", ids[:, prefix:])
        past = [(k[:, :prefix], v[:, :prefix]) for k, v in ref_kv]
        feats, _ = sam("encode_text", emb, mask, start=prefix, past=past)
        head = jnp.broadcast_to(ref_feats[:, :prefix], (ids.shape[0], prefix, feats.shape[-1]))
        return jnp.concatenate([head.astype(feats.dtype), feats], axis=1)

    def _ref_fn(self, params, ids, mask):
        emb = self.model.apply("embed_tokens", ids, params=params)
        return self.model.apply("encode_text", emb, mask, params=params)

    def _iou_fn(self, params, prompt, mask, valid, selected, ctx, gt, rows, cols, batch: int):
        """prompt [n, T, D] x the K images (ctx, gt [K, Hb, Wb], rows [K, Hb, m], cols [K, Wb, m]) -> iou [n, K].

        Images are mapped sequentially (bounded memory); an image whose `selected` [K] flag is False is skipped
        (`lax.cond`: not computed, its column 0), so one compiled program serves every image subset. Rows whose
        `valid` [n] flag is False are padding: on one device, with `mask_gate` groups, the detector runs group by
        group and skips groups of only padding rows, so a padded chunk costs its real rows rounded up to n /
        mask_gate (on several devices the rows stay sharded and padding is computed: slicing sharded rows per group
        would gather them onto every device). Per image the mask head (most of the work) runs only where it can
        matter: the rows are ordered so those keeping a query come first and split into `mask_gate` groups; a group
        in which no row keeps a query is skipped (its rows predict nothing, an IoU that needs no mask)."""
        n = prompt.shape[0]
        groups = self.mask_gate if self.mask_gate and n % self.mask_gate == 0 else 1
        detect_groups = groups if len(self.devices) == 1 else 1

        def one(args):
            sel, c, g, r, cl = args
            c = jax.tree_util.tree_map(lambda x: x[None], c)
            apply = lambda method, *a: self.model.apply(method, *a, params=params)  # noqa: E731

            def detect():
                if detect_groups == 1:
                    return apply("detect_scores", c, prompt, mask)
                size = n // detect_groups

                def part(i):  # detector outputs of rows [i * size, (i + 1) * size), zeros for a padding group
                    rows_of = lambda x: jax.lax.dynamic_slice_in_dim(x, i * size, size, 0)  # noqa: E731
                    do = lambda _: apply("detect_scores", c, rows_of(prompt), rows_of(mask))  # noqa: E731
                    shapes = jax.eval_shape(do, None)
                    return jax.lax.cond(rows_of(valid).any(), do, lambda _: jax.tree_util.tree_map(
                        lambda s: jnp.zeros(s.shape, s.dtype), shapes), None)

                return jax.tree_util.tree_map(lambda x: x.reshape(n, *x.shape[2:]),
                                              jax.lax.map(part, jnp.arange(detect_groups)))

            def run(_):
                out, parts = detect()
                keep_any = scoring.query_keep(out["pred_logits"], out["presence_logits"], self.threshold).any(-1)
                keep_any = keep_any & valid
                empty = jnp.where(jnp.any(g), 0.0, 1.0).astype(jnp.float32)  # IoU of an empty prediction

                def group(rows_idx):  # exact IoU of these rows, their masks computed only if one keeps a query
                    def masks(_):
                        take = lambda x: x[rows_idx]  # noqa: E731
                        o = jax.tree_util.tree_map(take, out)
                        p = jax.tree_util.tree_map(take, parts)
                        pixels = apply("mask_pixels_fast", c, p)  # most of the cost; the queries' masks below

                        def masks_of(order):  # only the queries the IoU resizes
                            h = p["hidden"] if order is None else jnp.take_along_axis(p["hidden"], order[..., None], 1)
                            return apply("mask_logits_from", h, pixels)

                        return scoring.exact_iou(o, g, r, cl, self.threshold, batch, self.max_kept, masks_of)

                    return jax.lax.cond(keep_any[rows_idx].any(), masks,
                                        lambda _: jnp.full(rows_idx.shape, empty, jnp.float32), None)

                if groups == 1:
                    return group(jnp.arange(n))
                order = jnp.argsort(~keep_any, stable=True)  # rows keeping a query first
                ious = jax.lax.map(group, order.reshape(groups, n // groups))
                return jnp.zeros((n,), jnp.float32).at[order].set(ious.reshape(n))

            return jax.lax.cond(sel, run, lambda _: jnp.zeros((n,), jnp.float32), None)

        return jax.lax.map(one, (selected, ctx, gt, rows, cols)).T

    def _soft_loss_fn(self, embeds, params, idx, weights, negative_weight, ctx, soft, grad_batch: int = 1):
        """embeds [L, Ct] continuous content-token embeddings -> 1 - soft objective (scalar) on the images `idx`
        int [K] weighted by `weights` [K]; an entry of weight 0 (padding) is skipped by `lax.cond`, so only the
        selected images are computed (with grad_batch > 1 the images are vmapped and a batch computes its padding).

        ctx: the stacked image contexts [K, ...]; soft: {"gt": [K, m, m] area-resized GT, "neg": bool [K]} — passed
        as arguments (not closed over) so images are not baked into the compiled program. Each image's detect pass
        is rematerialised in the backward pass (`jax.checkpoint`): `grad_batch` images' activations are live at a
        time (vmapped together: faster on a GPU; out-of-memory on the gradient path halves it).
        """
        length = embeds.shape[0]
        ids, mask = scoring.layout_prompts(np.zeros((1, length), np.int32))
        table = self.model.apply("token_table", params=params)
        tok = table[jnp.asarray(ids[0])].astype(embeds.dtype)
        tok = tok.at[1:1 + length].set(embeds)[None]
        prompt, _ = self.model.apply("encode_text", tok.astype(self.model.dtype), jnp.asarray(mask), params=params)

        @jax.checkpoint
        def score(i):
            c = jax.tree_util.tree_map(lambda x: x[i][None], ctx)
            # exact derivatives: SAM3's training-time stop-gradient at the box refinement would bias the search
            out = self.model.apply("detect_fast", c, prompt, jnp.asarray(mask), params=params, detach_boxes=False)
            return scoring.soft_scores(out, soft["gt"][i], soft["neg"][i])[0]

        def one(args):
            i, w = args  # padding (weight 0) is skipped: not computed, not differentiated
            return jax.lax.cond(w > 0, score, lambda _: jnp.zeros((), jnp.float32), i)

        s = jax.lax.map(one, (idx, weights), batch_size=grad_batch if grad_batch > 1 else None)  # [K]
        neg = soft["neg"][idx]
        wpos = weights * (~neg)
        wneg = weights * neg
        pos_term = jnp.sum(s * wpos) / jnp.maximum(jnp.sum(wpos), 1e-9)
        neg_term = jnp.sum((1 - s) * wneg) / jnp.maximum(jnp.sum(wneg), 1e-9)
        return 1.0 - (pos_term - negative_weight * neg_term)

    # ------------------------------------------------------------------------------------------------------------
    # public API
    @property
    def n_images(self) -> int:
        return len(self.gts)

    @property
    def embedding_table(self) -> jax.Array:
        return self.model.apply("token_table")

    def round_trips(self, ids) -> np.ndarray:
        """bool[N]: whether each candidate int[N, L]'s text tokenizes back to the same ids (the CLIP tokenizer's
        `round_trips`; what `SearchConfig.retokenize` filters on)."""
        return round_trips(ids)

    def score(self, ids, images: Sequence[int] | None = None, reference: Sequence[int] | None = None) -> np.ndarray:
        """ids int[N, L] content tokens -> float32 [N, k] exact IoU on the selected images (default all).

        `reference`: the sequence most candidates derive from (default: the first row); only affects speed.
        """
        ids = np.asarray(ids, np.int32)
        input_ids, mask = scoring.layout_prompts(ids, self.config.context_length)
        return self._score_layout(input_ids, mask, images, ids[0] if reference is None and len(ids) else reference)

    def score_text(self, texts: Sequence[str], images: Sequence[int] | None = None) -> np.ndarray:
        """Strings -> float32 [N, k] IoU (tokenised with the CLIP BPE, truncated to the context)."""
        input_ids, mask = tokenize(list(texts), self.config.context_length)
        return self._score_layout(input_ids, mask, images, None)

    def _score_layout(self, input_ids, mask, images, reference) -> np.ndarray:
        sel = np.arange(self.n_images) if images is None else np.asarray(images, int)
        n = len(input_ids)
        result = np.zeros((n, len(sel)), np.float32)
        if n == 0 or len(sel) == 0:
            return result
        # shortest text bucket: CLIP is causal and every later stage masks padding, so the positions after the
        # longest prompt's END change nothing; run only up to it (rounded up to text_bucket: few programs)
        b = self.text_bucket
        width = input_ids.shape[1] if b == 0 else min(input_ids.shape[1], -(-int(mask.sum(1).max()) // b) * b)
        # a model whose embed adapters replace a label by more tokens needs room for them (`min_text_width`)
        width = min(input_ids.shape[1], max(width, getattr(self.model, "min_text_width", 0)))
        input_ids, mask = input_ids[:, :width], mask[:, :width]
        # prefix grouping: order candidates by shared-prefix length with the reference
        if self.prefix_cache and reference is not None:
            ref_ids, ref_mask = scoring.layout_prompts(np.asarray(reference, np.int32)[None], self.config.context_length)
            ref_ids, ref_mask = ref_ids[:, :width], ref_mask[:, :width]
            shared = shared_prefix(input_ids, mask, ref_ids[0], ref_mask[0])
            order = np.argsort(-shared, kind="stable")
            ref_feats, ref_kv = self._ref(ref_ids, ref_mask)
        else:
            shared = np.zeros(n, int)
            order = np.arange(n)
            ref_feats = ref_kv = None
        # pipelined: chunk i+1 is dispatched (jax runs it asynchronously) before chunk i's IoUs are read back.
        # Nothing is donated: no output has an input's shape, and a chunk's inputs are freed when it finishes
        pending = None
        for start in range(0, n, self.chunk_size):
            idx = order[start:start + self.chunk_size]
            prefix = prefix_bucket(int(shared[idx].min())) if ref_kv is not None else 0
            nxt = (idx, self._score_chunk(input_ids[idx], mask[idx], sel, ref_feats, ref_kv, prefix))
            if pending is not None:
                result[pending[0]] = _fetch(pending[1])[:len(pending[0])][:, sel]
            pending = nxt
        result[pending[0]] = _fetch(pending[1])[:len(pending[0])][:, sel]
        self.evals += n * len(sel)
        return result

    def _ref(self, ids, mask):
        if not hasattr(self, "_jit_ref"):
            self._jit_ref = jax.jit(self._ref_fn)
        return self._jit_ref(self.model.params, jnp.asarray(ids), jnp.asarray(mask))

    def _score_chunk(self, ids, mask, sel, ref_feats, ref_kv, prefix) -> jax.Array:
        """Dispatch one chunk -> its IoUs [bucket, k] on device (padding rows included; not yet read back)."""
        n = len(ids)
        bucket = row_bucket(n, self.chunk_size, len(self.devices))
        ids = np.concatenate([ids, np.repeat(ids[-1:], bucket - n, 0)])
        mask = np.concatenate([mask, np.repeat(mask[-1:], bucket - n, 0)])
        cand = NamedSharding(self.mesh, P("cand"))
        ids_d, mask_d = jax.device_put(ids, cand), jax.device_put(mask, cand)
        prompt = self._jit_text(self.model.params, ids_d, mask_d, ref_feats, ref_kv, prefix=prefix)
        detect_mask = jax.device_put(self.model.prompt_mask(ids, mask), cand)
        t = self._targets
        selected = np.zeros(self.n_images, bool)
        selected[np.asarray(sel, int)] = True
        batch = max(1, min(bucket, int(2e8 // (self.config.decoder.num_queries * t.gt.shape[-1] * t.gt.shape[-2] * 4))))
        valid = jax.device_put(np.arange(bucket) < n, cand)
        return self._jit_iou(self.model.params, prompt, detect_mask, valid, jnp.asarray(selected), self._ctx, t.gt,
                             t.rows, t.cols, batch=batch)  # [bucket, K] on device

    # soft / gradient interface ------------------------------------------------------------------------------------
    def _subset(self, images) -> tuple[jax.Array, jax.Array, int]:
        """Selected images -> (indices int32 [K], weights float32 [K], k): the k selected images first, then padding
        (the first selected image again) at weight 0, which the loss skips; always K long, so one compiled gradient
        program serves every subset successive halving asks for."""
        sel = np.arange(self.n_images) if images is None else np.asarray(images, int)
        k = len(sel)
        idx = np.concatenate([sel, np.repeat(sel[:1], self.n_images - k)]).astype(np.int32)
        w = np.concatenate([np.ones(k, np.float32), np.zeros(self.n_images - k, np.float32)])
        return jnp.asarray(idx), jnp.asarray(w), k

    def soft_loss(self, embeds, images=None, negative_weight: float | None = None) -> jax.Array:
        """Differentiable loss (1 - soft objective) of continuous content embeddings [L, Ct]."""
        nw = self.negative_weight if negative_weight is None else negative_weight
        idx, w, _ = self._subset(images)
        return self._soft_loss_fn(embeds, self.model.params, idx, w, nw, self._ctx, self._soft)

    def soft_loss_and_grad(self, embeds, images=None, negative_weight: float | None = None):
        """-> (loss float, grad [L, Ct]) via one jitted value_and_grad call over the selected images only."""
        nw = self.negative_weight if negative_weight is None else negative_weight
        idx, w, k = self._subset(images)
        loss, grad = self._jit_soft(jnp.asarray(embeds, jnp.float32), self.model.params, idx, w, nw, self._ctx,
                                    self._soft, grad_batch=min(self.grad_batch, len(idx)))
        self.evals += self.grad_cost * k
        return float(loss), grad

    def token_grad(self, ids, images=None, negative_weight: float | None = None) -> np.ndarray:
        """Gradient of the soft loss w.r.t. the one-hot encoding of ids [L] -> float32 [L, V]."""
        table = self.embedding_table.astype(jnp.float32)
        embeds = table[jnp.asarray(np.asarray(ids, np.int32))]
        _, g = self.soft_loss_and_grad(embeds, images, negative_weight)
        return np.asarray(g @ table.T)


# ----------------------------------------------------------------------------------------------------------------
def _fetch(x: jax.Array) -> np.ndarray:
    """A device array as numpy; one sharded over other processes' devices too is gathered from all of them."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _free_memory(device) -> int:
    try:
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    except Exception:  # CPU backends have no memory stats
        pass
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except Exception:
        return 4 << 30
