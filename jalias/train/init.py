"""Initial weights for training: the fan-in-scaled random params, optionally with a box-locality prior in the
decoder's box relative-position bias (RPB).

Why: trained from plain random weights, the decoder's queries collapse. All 16 queries end up with the same
hidden state, so they give the same mask and the same score and only their boxes differ (measured on the first
weights/small, v1: mask std across queries 3e-6 against mean |logit| 9). A collapsed decoder is a semantic
segmenter with one query: under matched 0/1 class targets the best it can score is about (instances / queries),
and the one mask is a compromise between the instances it is matched to. At random init the RPB adds a near
uniform bias, so every query's vision cross-attention reads the same places and nothing in the forward pass
tells the queries apart but their embeddings. With `rpb_locality = a > 0`, each axis's RPB MLP starts out
computing -a x (how far a pixel lies outside the query's box along that axis, in the RPB's log encoding) for
every head (two of its hidden units carry the distance; the others keep their random weights): each query looks
first at the pixels in its own box, as in anchor-based DETR variants.
"""

from __future__ import annotations

import numpy as np

from ..model.config import Sam3Config
from ..model.init import random_params
from .config import TrainConfig


def locality_prior(params: dict, strength: float) -> dict:
    """A copy of `params` whose box_rpb_embed_x/y MLPs give -strength x (distance outside the box) per head.

    The RPB MLP sees e = (enc(p - lo), enc(p - hi)) for a pixel coordinate p and the box edges lo < hi; enc is
    sign-preserving, so p lies outside the box by relu(-e[0]) + relu(e[1])."""
    out = {**params, "detr_decoder": dict(params["detr_decoder"])}
    for axis in ("box_rpb_embed_x", "box_rpb_embed_y"):
        mlp = {k: {n: np.array(v) for n, v in layer.items()} for k, layer in params["detr_decoder"][axis].items()}
        k1, b1, k2 = mlp["layer1"]["kernel"], mlp["layer1"]["bias"], mlp["layer2"]["kernel"]
        k1[:, :2] = [[-1.0, 0.0], [0.0, 1.0]]  # unit 0: relu(-e0) (before the box); unit 1: relu(e1) (after it)
        b1[:2] = 0.0
        k2[:2, :] = -strength
        out["detr_decoder"][axis] = mlp
    return out


def initial_params(cfg: Sam3Config, train: TrainConfig) -> dict:
    """The weights step 0 starts from (deterministic in train.seed)."""
    params = random_params(cfg, train.seed)
    return locality_prior(params, train.rpb_locality) if train.rpb_locality > 0 else params
