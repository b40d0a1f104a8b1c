"""A toy scoring engine: the test fixture for the search methods (no SAM3 involved).

It implements the ScoringEngine protocol of jalias/search/base.py with a hidden target sequence:

- A candidate's "text feature" is z(ids) = sum_i R_i E[ids_i] (E the random embedding table, R_i one random
  orthogonal matrix per position), so every position matters and the landscape is not separable per token.
- s = cos(z(candidate), z(target)) is about (#positions equal to the target) / L for near-random candidates
  and exactly 1 for the target.
- Positive image j has a ground-truth blob M_j and a per-pixel field xi_j, uniform in (0, 1); the predicted mask
  keeps the blob pixels with xi_j < q_j(s) (q_j grows linearly with s and exceeds 1 at s = 1), so exact IoU is
  1.0 for the target, roughly s for partial matches and near 0 for random tokens.
- A second hidden sequence (`everything_ids`) lights up every pixel of every image, including the negative
  images (GT empty), so "segment everything" is penalised only when negatives are present.

soft_loss_and_grad / token_grad use the same logits through a sigmoid (soft masks, soft IoU), so their gradient
points towards the target. All arrays are small (default V = 2,000, D = 64, 16x16 masks), everything is jitted once per
shape and the jitted functions are shared by all instances of the same size.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jalias.engine import GRAD_COST  # the real engine's price of a gradient, so both charge alike

_S_NOISE_FLOOR = 0.05  # q(s) = gain * s - floor: random tokens (s ~ 0 +- 0.2) get IoU close to 0
_EVERYTHING_MID, _EVERYTHING_TEMP = 0.6, 0.08
_SOFT_TEMP = 0.05


def _smooth_field(rng: np.random.Generator, size: int, blur: int = 2) -> np.ndarray:
    """float64[size, size] smooth random field, rank-normalised to be uniform in (0, 1)."""
    x = rng.normal(size=(size + 2 * blur, size + 2 * blur))
    kernel = np.ones(2 * blur + 1) / (2 * blur + 1)
    x = np.apply_along_axis(lambda r: np.convolve(r, kernel, mode="valid"), 0, x)
    x = np.apply_along_axis(lambda r: np.convolve(r, kernel, mode="valid"), 1, x)
    ranks = np.argsort(np.argsort(x.ravel(), kind="stable"), kind="stable")
    return ((ranks + 0.5) / ranks.size).reshape(size, size)


def _logits(embeds, proj, z_target, z_every, gt, xi, gain):
    """Mask logits float32[N, K, H, W] of candidates given their embeddings float32[N, L, D].

    proj: [L_max, D, D]; z_target, z_every: [D]; gt: bool-as-float [K, H, W]; xi: [K, H, W]; gain: [K].
    """
    n_pos = embeds.shape[1]
    z = jnp.einsum("nld,lde->ne", embeds, proj[:n_pos])
    z = z / (jnp.linalg.norm(z, axis=-1, keepdims=True) + 1e-8)
    s = z @ z_target  # [N]
    s_every = z @ z_every
    q = gain[None, :] * s[:, None] - _S_NOISE_FLOOR  # [N, K]
    every = jax.nn.sigmoid((s_every - _EVERYTHING_MID) / _EVERYTHING_TEMP)  # [N]
    inside = q[:, :, None, None] - xi[None]  # blob pixels switch on as q passes their xi
    logits = jnp.where(gt[None] > 0, inside, -1.0) + 3.0 * every[:, None, None, None]
    return logits


@jax.jit
def _exact_iou(ids, table, proj, z_target, z_every, gt, xi, gain):
    """float32[N, K] exact IoU; an empty prediction on an empty ground truth counts as 1."""
    pred = _logits(table[ids], proj, z_target, z_every, gt, xi, gain) > 0
    gt_b = gt[None] > 0
    inter = jnp.sum(pred & gt_b, axis=(2, 3))
    union = jnp.sum(pred | gt_b, axis=(2, 3))
    return jnp.where(union > 0, inter / jnp.maximum(union, 1), 1.0).astype(jnp.float32)


def _soft_loss(embeds, proj, z_target, z_every, gt, xi, gain, is_negative, selected, negative_weight):
    """Scalar soft loss of one candidate float32[L, D] on the selected images (bool[K]):
    1 - (mean soft IoU on positives - w * mean predicted mass on negatives)."""
    m = jax.nn.sigmoid(_logits(embeds[None], proj, z_target, z_every, gt, xi, gain)[0] / _SOFT_TEMP)  # [K,H,W]
    inter = jnp.sum(m * gt, axis=(1, 2))
    union = jnp.sum(m + gt - m * gt, axis=(1, 2))
    soft_iou = inter / (union + 1e-6)
    mass = jnp.mean(m, axis=(1, 2))  # how much is predicted on an (empty) negative image
    positive = selected & ~is_negative
    negative = selected & is_negative
    pos = jnp.where(positive, soft_iou, 0.0)
    neg = jnp.where(negative, mass, 0.0)
    n_pos = jnp.maximum(jnp.sum(positive), 1)
    n_neg = jnp.maximum(jnp.sum(negative), 1)
    return 1.0 - (jnp.sum(pos) / n_pos - negative_weight * jnp.sum(neg) / n_neg)


_soft_value_and_grad = jax.jit(jax.value_and_grad(_soft_loss))


@jax.jit
def _token_grad(ids, table, proj, z_target, z_every, gt, xi, gain, is_negative, selected, negative_weight):
    """float32[L, V] gradient of the soft loss w.r.t. the one-hot encoding of ids int32[L]."""
    onehot = jax.nn.one_hot(ids, table.shape[0], dtype=jnp.float32)

    def loss(oh):
        return _soft_loss(oh @ table, proj, z_target, z_every, gt, xi, gain, is_negative, selected,
                          negative_weight)

    return jax.grad(loss)(onehot)


class ToyEngine:
    """Synthetic engine with a hidden target; see the module docstring.

    Counters: `evals` (candidate-image evaluations charged so far, by the engine's own bookkeeping: N*k per
    score, grad_cost*k per token_grad and per soft_loss_and_grad), `score_calls`, `grad_calls`, `soft_calls`,
    and `seen_ids` (every candidate row ever scored, when record=True).
    """

    grad_cost = GRAD_COST

    def __init__(
        self,
        vocab_size: int = 2000,
        dim: int = 64,
        target_length: int = 4,
        n_positive: int = 4,
        n_negative: int = 0,
        image_size: int = 16,
        max_length: int = 30,
        negative_weight: float = 0.5,
        seed: int = 0,
        record: bool = False,
    ):
        if vocab_size < 16:
            raise ValueError(f"ToyEngine needs vocab_size >= 16, got {vocab_size}")
        if n_positive < 1:
            raise ValueError(f"ToyEngine needs at least one positive image, got n_positive={n_positive}")
        if not 1 <= target_length <= max_length:
            raise ValueError(f"target_length must be in [1, {max_length}], got {target_length}")
        rng = np.random.default_rng(seed)
        self.vocab_size = int(vocab_size)
        self.max_length = int(max_length)
        self.n_images = n_positive + n_negative
        self.is_negative = np.array([False] * n_positive + [True] * n_negative)
        # Like CLIP's start/end ids, the last two ids are special and must never be proposed.
        self.special_ids = (vocab_size - 2, vocab_size - 1)
        # CLIP-like scale: token embeddings with per-coordinate std ~0.02.
        table = rng.normal(scale=0.02, size=(vocab_size, dim)).astype(np.float32)
        self.embedding_table = jnp.asarray(table)
        proj = np.stack([np.linalg.qr(rng.normal(size=(dim, dim)))[0] for _ in range(max_length)])
        self._proj = jnp.asarray(proj, jnp.float32)

        ordinary = np.setdiff1d(np.arange(vocab_size), self.special_ids)
        self.target_ids = rng.choice(ordinary, size=target_length, replace=False).astype(np.int32)
        self.everything_ids = rng.choice(ordinary, size=target_length, replace=False).astype(np.int32)

        def feature(ids):
            z = np.einsum("ld,lde->e", table[ids], proj[: len(ids)])
            return z / np.linalg.norm(z)

        self._z_target = jnp.asarray(feature(self.target_ids), jnp.float32)
        self._z_every = jnp.asarray(feature(self.everything_ids), jnp.float32)

        gt = np.zeros((self.n_images, image_size, image_size), np.float32)
        xi = np.zeros_like(gt)
        for j in range(self.n_images):
            if not self.is_negative[j]:
                # Blob of 20-50% of the image: threshold a smooth field at a random quantile.
                gt[j] = _smooth_field(rng, image_size, blur=3) < rng.uniform(0.2, 0.5)
            xi[j] = _smooth_field(rng, image_size, blur=0)  # iid per pixel: IoU grows ~linearly with s
        self._gt = jnp.asarray(gt)
        self._xi = jnp.asarray(xi)
        # Per-image gains in [1.1, 1.3]: the target (s = 1) gives q > 1 > xi everywhere, i.e. IoU 1 on all images.
        self._gain = jnp.asarray(rng.uniform(1.1, 1.3, size=self.n_images), jnp.float32)
        self._is_neg = jnp.asarray(self.is_negative)
        self._neg_w = jnp.float32(negative_weight)
        self._all = jnp.ones(self.n_images, bool)

        self.record = record
        self.seen_ids: list[np.ndarray] = []
        self.evals = 0
        self.score_calls = 0
        self.grad_calls = 0
        self.soft_calls = 0

    # --- protocol -------------------------------------------------------------------------------------------
    def _images(self, images) -> np.ndarray:
        if images is None:
            return np.arange(self.n_images)
        images = np.asarray(images, dtype=np.int64).reshape(-1)
        if images.size and (images.min() < 0 or images.max() >= self.n_images):
            raise ValueError(f"image index out of range [0, {self.n_images}): {images.tolist()}")
        return images

    def round_trips(self, ids) -> np.ndarray:
        """bool[N]: the toy has no tokenizer, so every candidate int32[N, L] 'round-trips' (no filtering)."""
        return np.ones(np.asarray(ids).shape[0], bool)

    def score(self, ids, images=None) -> np.ndarray:
        """float32[N, k] exact IoU of candidates int32[N, L] on the selected images (default all)."""
        ids = np.asarray(ids, dtype=np.int32)
        if ids.ndim != 2 or not 1 <= ids.shape[1] <= self.max_length:
            raise ValueError(f"ids must be int32[N, L] with 1 <= L <= {self.max_length}, got shape {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token id out of range [0, {self.vocab_size})")
        images = self._images(images)
        n = ids.shape[0]
        self.evals += n * images.size
        self.score_calls += 1
        if self.record:
            self.seen_ids.append(ids.copy())
        if n == 0 or images.size == 0:
            return np.zeros((n, images.size), np.float32)
        # Pad N to a power of two so the jitted function sees only a handful of shapes.
        padded = max(8, 1 << (n - 1).bit_length())
        batch = np.zeros((padded, ids.shape[1]), np.int32)
        batch[:n] = ids
        iou = _exact_iou(batch, self.embedding_table, self._proj, self._z_target, self._z_every,
                         self._gt, self._xi, self._gain)
        return np.asarray(iou)[:n][:, images]

    def token_grad(self, ids, images=None, negative_weight=None) -> np.ndarray:
        """float32[L, V] gradient of the soft loss w.r.t. the one-hot encoding of ids int32[L] on the selected
        images (default all); negative_weight overrides the engine's."""
        ids = np.asarray(ids, dtype=np.int32).reshape(-1)
        images = self._images(images)
        self.evals += self.grad_cost * images.size
        self.grad_calls += 1
        selected = np.zeros(self.n_images, bool)
        selected[images] = True
        g = _token_grad(ids, self.embedding_table, self._proj, self._z_target, self._z_every, self._gt,
                        self._xi, self._gain, self._is_neg, jnp.asarray(selected), self._weight(negative_weight))
        return np.asarray(g)

    def _weight(self, negative_weight):
        return self._neg_w if negative_weight is None else jnp.float32(negative_weight)

    def soft_loss_and_grad(self, embeds, images=None, negative_weight=None):
        """(soft loss, gradient float32[L, D]) of continuous embeddings float32[L, D] on all images (images must
        be None); negative_weight overrides the engine's."""
        if images is not None:
            raise ValueError("ToyEngine.soft_loss_and_grad supports images=None only")
        self.evals += self.grad_cost * self.n_images
        self.soft_calls += 1
        loss, grad = _soft_value_and_grad(jnp.asarray(embeds, jnp.float32), self._proj, self._z_target,
                                          self._z_every, self._gt, self._xi, self._gain, self._is_neg, self._all,
                                          self._weight(negative_weight))
        return float(loss), grad
