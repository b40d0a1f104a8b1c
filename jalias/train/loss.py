"""DETR set loss for SAM3's text-prompted detections: Hungarian matching, then per-query class BCE, presence BCE,
mask BCE + dice and box L1 on the matched queries, and a dense BCE of SAM3's semantic-segmentation head against
the union of the referred instances.

Why this loss: SAM3's prediction keeps the queries whose sigmoid(score) x sigmoid(presence) passes 0.5 and takes
the union of their masks, so each referred instance should own one confident query (class target 1 after
matching, 0 for the rest), presence should say whether the phrase is in the image at all (0 for absent phrases and
random tokens), and a matched query's mask should be its instance. Plain BCE (not focal) keeps the scores
calibrated around the 0.5 threshold the prediction rule uses. The semantic term gives every pixel a grounding
signal (is this pixel part of what the phrase names?), which the sparse matched-query terms alone learn slowly.

The matching cost also holds an anchor term (`TrainConfig.w_anchor`): the distance of a query's learned reference
box centre to the target's centre. Without it, a decoder whose queries are still alike gets a different query for
the same instance every step, each query learns the average of all instances, and the queries collapse into one
(benchmarks/RESULTS.md, "The decoder's queries collapse"); with it, a query keeps being matched to the instances
near its anchor and learns to take them.

Matching runs on the host (`scipy.optimize.linear_sum_assignment`) through `jax.pure_callback` on a
stop-gradient cost, so the whole step stays one jitted function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from .config import TrainConfig

_INVALID = 1e6  # cost of matching a padded (absent) target slot


def _bce(logits: jax.Array, target: jax.Array) -> jax.Array:
    return jnp.maximum(logits, 0) - logits * target + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def match_costs(out: dict, tmask: jax.Array, tbox: jax.Array, tvalid: jax.Array, w: TrainConfig,
                anchors: jax.Array | None = None) -> jax.Array:
    """Cost float32[N, Q, M] of assigning query q to target slot j (padded slots cost _INVALID).

    anchors: float32[Q, 4] cxcywh, the queries' learned reference boxes; with w.w_anchor > 0 the L1 distance of a
    query's anchor centre to the target box's centre is added, so a query is matched to the instances near its own
    anchor step after step (see TrainConfig.w_anchor).

    out: detector outputs (pred_logits [N, Q], pred_boxes [N, Q, 4] xyxy, pred_masks [N, Q, m, m] logits);
    tmask [N, M, m, m] in [0, 1]; tbox [N, M, 4] xyxy; tvalid bool [N, M]."""
    logits = out["pred_logits"].astype(jnp.float32)
    masks = out["pred_masks"].astype(jnp.float32)
    n, q, m = masks.shape[0], masks.shape[1], tmask.shape[1]
    pm = masks.reshape(n, q, -1)
    tm = tmask.reshape(n, m, -1)
    hw = pm.shape[-1]
    # mean pixel BCE for every (q, j): sum_p [softplus(x) - x*t] via two matmuls
    pos = jnp.einsum("nqp,nmp->nqm", -jax.nn.log_sigmoid(pm), tm)
    neg = jnp.einsum("nqp,nmp->nqm", -jax.nn.log_sigmoid(-pm), 1 - tm)
    bce = (pos + neg) / hw
    sig = jax.nn.sigmoid(pm)
    inter = jnp.einsum("nqp,nmp->nqm", sig, tm)
    dice = 1 - (2 * inter + 1) / (sig.sum(-1)[:, :, None] + tm.sum(-1)[:, None, :] + 1)
    l1 = jnp.abs(out["pred_boxes"][:, :, None, :] - tbox[:, None, :, :]).sum(-1)
    cls = -jax.nn.sigmoid(logits)[:, :, None]
    cost = w.w_class * cls + w.w_mask_bce * bce + w.w_dice * dice + w.w_box * l1
    if w.w_anchor > 0 and anchors is not None:
        centre = (tbox[..., :2] + tbox[..., 2:]) / 2  # [N, M, 2]
        a = jax.lax.stop_gradient(anchors[:, :2].astype(jnp.float32))
        cost = cost + w.w_anchor * jnp.abs(a[None, :, None, :] - centre[:, None, :, :]).sum(-1)
    return jnp.where(tvalid[:, None, :], cost, _INVALID)


def query_quality(pred_masks: jax.Array, tmask: jax.Array, tvalid: jax.Array) -> jax.Array:
    """float32[N, Q] class targets from mask quality (stop-gradient): 1 where a query's mask (logits > 0) has IoU
    >= 0.5 with a referred instance, else that best IoU. pred_masks [N, Q, m, m]; tmask [N, M, m, m]."""
    pm = (jax.lax.stop_gradient(pred_masks) > 0).astype(jnp.float32).reshape(*pred_masks.shape[:2], -1)
    tm = (tmask > 0.5).astype(jnp.float32).reshape(*tmask.shape[:2], -1)
    inter = jnp.einsum("nqp,nmp->nqm", pm, tm)
    union = pm.sum(-1)[:, :, None] + tm.sum(-1)[:, None, :] - inter
    best = jnp.max(jnp.where(tvalid[:, None, :], inter / jnp.maximum(union, 1.0), 0.0), axis=-1)
    return jnp.where(best >= 0.5, 1.0, best)


def _hungarian(cost: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """cost float32[N, Q, M], valid bool[N, M] -> int32[N, M]: the query matched to each valid slot (0 where
    the slot is padding)."""
    out = np.zeros(valid.shape, np.int32)
    for i in range(cost.shape[0]):
        cols = np.nonzero(valid[i])[0]
        if cols.size:
            rows, c = linear_sum_assignment(cost[i][:, cols])
            out[i, cols[c]] = rows
    return out


def hungarian(cost: jax.Array, valid: jax.Array) -> jax.Array:
    """Optimal one-to-one assignment of target slots to queries (host scipy), callable under jit/grad."""
    cost = jax.lax.stop_gradient(cost)
    shape = jax.ShapeDtypeStruct(valid.shape, jnp.int32)
    return jax.pure_callback(_hungarian, shape, cost, valid, vmap_method="sequential")


def set_loss(out: dict, batch: dict, w: TrainConfig, anchors: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Scalar loss and its parts for detector outputs on B*P pairs (see `batches.sample_batch` for the batch);
    anchors: the queries' reference boxes [Q, 4] cxcywh for the matching's anchor cost."""
    tmask, tbox, tvalid = batch["tmask"], batch["tbox"], batch["tvalid"]
    idx = hungarian(match_costs(out, tmask, tbox, tvalid, w, anchors), tvalid)  # [N, M]
    n, q = out["pred_logits"].shape
    validf = tvalid.astype(jnp.float32)
    n_targets = jnp.maximum(validf.sum(), 1.0)
    onehot = jax.nn.one_hot(idx, q) * validf[..., None]  # [N, M, Q]
    cls_target = jnp.clip(onehot.sum(1), 0, 1)
    if w.class_target == "iou":  # IoU-aware: every query scores how well its mask fits its best referred instance
        cls_target = jnp.maximum(cls_target, query_quality(out["pred_masks"], tmask, tvalid))
    # queries localise, presence recognises (SAM3's decoupling): unless class_on_absent, the query scores of a
    # phrase absent from the image are left to the presence head instead of all being pushed to 0
    rows = jnp.ones_like(batch["present"]) if w.class_on_absent else batch["present"]
    cls = (_bce(out["pred_logits"].astype(jnp.float32), cls_target) * rows[:, None]).sum() / n_targets
    presence = _bce(out["presence_logits"][:, 0].astype(jnp.float32), batch["present"]).mean()
    masks = jnp.take_along_axis(out["pred_masks"].astype(jnp.float32), idx[:, :, None, None], axis=1)  # [N,M,m,m]
    mb = (_bce(masks, tmask).mean((-2, -1)) * validf).sum() / n_targets
    sig = jax.nn.sigmoid(masks).reshape(n, tmask.shape[1], -1)
    tm = tmask.reshape(n, tmask.shape[1], -1)
    dice = 1 - (2 * (sig * tm).sum(-1) + 1) / (sig.sum(-1) + tm.sum(-1) + 1)
    dice = (dice * validf).sum() / n_targets
    boxes = jnp.take_along_axis(out["pred_boxes"], idx[:, :, None], axis=1)
    box = (jnp.abs(boxes - tbox).sum(-1) * validf).sum() / n_targets
    union = jnp.max(tmask * validf[..., None, None], axis=1)  # [N, m, m]: every referred instance
    semantic = _bce(out["semantic_seg"][:, 0].astype(jnp.float32), union).mean()
    parts = {"class": cls, "presence": presence, "mask_bce": mb, "dice": dice, "box": box, "semantic": semantic}
    total = (w.w_class * cls + w.w_presence * presence + w.w_mask_bce * mb + w.w_dice * dice + w.w_box * box
             + w.w_semantic * semantic)
    return total, parts
