"""Teacher targets of a finished run, from `jalias.engine.predict` (the engine's prediction rule).

`jalias export RUN_DIR` writes, for every finished category of a run, the alias and what SAM3 does with it, as
targets for distilling the alias into another model. Output folder (default RUN_DIR/export/):

    index.json          {"format": "jalias.export", "version": 1, "run_dir", "weights", "prompt_mode", "threshold",
                         "model": {"image_size", "mask_size" (m), "num_queries" (Q), "text_width" (Ct),
                                   "prompt_width" (D), "context_length" (T)},
                         "keys": {npz key: description}, "categories": [{"category", "file", "label",
                         "alias_ids", "alias_text", "n_images", "alias_iou_search", "alias_iou_heldout"}]}
    <category>.npz     one per category (numpy .npz, no pickled objects), with K = images of the category in the
                        run (search positives, search negatives, held-out positives, held-out negatives, in that
                        order), L = alias tokens, T = 32 context positions, Q queries, m = 4 * ViT grid:

      alias_ids         int32[L]         alias content token ids (no start/end token)
      label_ids         int32[Ll]        the natural label's content token ids
      input_ids         int32[T]         the alias laid out as SAM3's prompt: START ids END PAD...
      attention_mask    int32[T]         1 on START..END
      prompt_features   float32[T, D]    text encoder output after text_projection (what the detector reads;
                                         rows where attention_mask == 0 are padding; in prompt mode "meta"
                                         the detector also reads the image's geometry CLS token, and rows
                                         of id 0 are masked)
      token_embeddings  float32[L, Ct]   CLIP token embeddings of alias_ids (before position embeddings)
      image_ids         str[K]           COCO file_name of each image
      split             str[K]           "search" | "heldout"
      is_negative       bool[K]          image without the category (its ground truth is empty)
      iou               float32[K]       IoU of the alias's predicted mask with the ground truth
      pred_logits       float32[K, Q]    per-query class logits
      presence_logits   float32[K, 1]    image-level presence logit
      scores            float32[K, Q]    sigmoid(pred_logits) * sigmoid(presence_logits)
      keep              bool[K, Q]       scores > threshold: the queries whose masks form the prediction
      pred_boxes        float32[K, Q, 4] boxes, xyxy normalised to [0, 1]
      union_logits      float32[K, m, m] max over kept queries of their mask logits (UNION_FLOOR where none kept)
      semantic_logits   float32[K, m, m] SAM3's semantic segmentation head logits
      pred_masks        float16[K, Q, m, m]  every query's mask logits (left out with full_masks=False)
      mask_000, ...     bool[H_i, W_i]   predicted mask at image resolution (union of kept queries' upsampled
                                         logits > 0; the mask the IoU is computed on), one key per image

The run directory records what is needed to rebuild these inputs: run.json (weights, annotations, images folder,
settings) and each <category>.json (the image ids of every split).

Images go through the image encoder `batch` at a time (default 1: one per call, as the engine encodes them, so the
targets match the run's numbers to the last bit; more is faster on a GPU, with values equal to float rounding).
On device out-of-memory the batch is halved and the failed batch repeated (down to 1, then a one-line RunError).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..atomic import check_out_folder
from ..engine.predict import UNION_FLOOR, layout, predict
from ..model.preprocess import preprocess
from .io import write_json_atomic
from .model import load_model
from .rundir import RunDir
from .splits import rebuild_inputs

EXPORT_FORMAT = "jalias.export"
EXPORT_VERSION = 1

KEYS = {
    "alias_ids": "int32[L] alias content token ids (no start/end token)",
    "label_ids": "int32[Ll] natural label content token ids",
    "input_ids": "int32[T] alias prompt layout START ids END PAD...",
    "attention_mask": "int32[T] 1 on START..END",
    "prompt_features": "float32[T, D] text features after text_projection",
    "token_embeddings": "float32[L, Ct] CLIP token embeddings of alias_ids",
    "image_ids": "str[K] image file names",
    "split": "str[K] 'search' | 'heldout'",
    "is_negative": "bool[K] image without the category",
    "iou": "float32[K] IoU of the alias's predicted mask with the ground truth",
    "pred_logits": "float32[K, Q] query class logits",
    "presence_logits": "float32[K, 1] presence logit",
    "scores": "float32[K, Q] sigmoid(pred_logits) * sigmoid(presence_logits)",
    "keep": "bool[K, Q] scores > threshold",
    "pred_boxes": "float32[K, Q, 4] xyxy boxes in [0, 1]",
    "union_logits": f"float32[K, m, m] max over kept queries of mask logits ({UNION_FLOOR} where none kept)",
    "semantic_logits": "float32[K, m, m] semantic segmentation logits",
    "pred_masks": "float16[K, Q, m, m] every query's mask logits (optional)",
    "mask_###": "bool[H_i, W_i] predicted mask of image i at its resolution",
}

def text_targets(model, ids: Sequence[int]) -> dict[str, np.ndarray]:
    """Alias content ids [L] -> input_ids int32[T], attention_mask int32[T], prompt_features float32[T, D],
    token_embeddings float32[L, Ct]."""
    input_ids, mask = layout([ids], model.config.context_length)
    feats = np.asarray(model.encode_text(input_ids, mask), np.float32)[0]
    emb = np.asarray(model.apply("embed_tokens", np.asarray(ids, np.int32)[None]), np.float32)[0]
    return {"input_ids": input_ids[0], "attention_mask": mask[0], "prompt_features": feats, "token_embeddings": emb}


def _predict_batch(model, images, gts, alias_ids, threshold: float) -> list[dict]:
    """`predict` of the alias on each image, the images encoded in one call."""
    import jax

    ctx = model.encode_image(preprocess(list(images), model.config.image_size))
    return [predict(model, img, [alias_ids], threshold, context=jax.tree_util.tree_map(lambda x: x[j:j + 1], ctx),
                    mask_shape=np.asarray(gt).shape) for j, (img, gt) in enumerate(zip(images, gts))]


def predict_all(model, images, gts, alias_ids, threshold: float, batch: int = 1, log=None,
                what: str = "exporting") -> tuple[list[dict], int]:
    """`predict` outputs of the alias on every image, `batch` images per image-encoder call, halved on device
    out-of-memory (the failed batch is repeated) -> (outputs, the batch size in use at the end)."""
    from .oom import halve_on_oom

    if batch < 1:
        raise ValueError(f"export batch must be >= 1 image, got {batch}")
    outs: list[dict] = []
    while len(outs) < len(images):
        s = len(outs)
        done, batch = halve_on_oom(lambda b: _predict_batch(model, images[s:s + b], gts[s:s + b], alias_ids,
                                                            threshold), batch, log or (lambda m: None), what,
                                   "image", "image-encoder call")
        outs += done
    return outs, batch


def export_category(model, path: str | os.PathLike, alias_ids: Sequence[int], label_ids: Sequence[int],
                    images: Sequence[np.ndarray], gts: Sequence[np.ndarray], image_ids: Sequence[str],
                    split: Sequence[str], is_negative: Sequence[bool], threshold: float = 0.5,
                    full_masks: bool = True, batch: int = 1, log=None) -> dict[str, Any]:
    """Write one category's `.npz` (keys in the module docstring); returns {"n_images", "iou", "batch"} (batch:
    images per encoder call at the end, after any out-of-memory halving; log receives those retries).

    images: K uint8[H_i, W_i, 3]; gts: K bool[H_i, W_i] ground truth (all False for negatives).
    """
    from ..data import iou as mask_iou

    k = len(images)
    per: dict[str, list] = {key: [] for key in ("pred_logits", "presence_logits", "scores", "keep", "pred_boxes",
                                                "union_logits", "semantic_logits", "pred_masks")}
    arrays: dict[str, np.ndarray] = {}
    ious = np.zeros(k, np.float32)
    outs, batch = predict_all(model, list(images), list(gts), alias_ids, threshold, batch, log,
                              f"exporting {Path(path).stem}")
    for i, (out, gt) in enumerate(zip(outs, gts)):
        for key in per:
            per[key].append(out[key][0])
        arrays[f"mask_{i:03d}"] = out["masks"][0]
        ious[i] = float(mask_iou(out["masks"][0], np.asarray(gt, bool)))
    for key, vals in per.items():
        if key == "pred_masks" and not full_masks:
            continue
        arrays[key] = np.stack(vals)
    if full_masks:
        arrays["pred_masks"] = arrays["pred_masks"].astype(np.float16)
    arrays.update(text_targets(model, alias_ids))
    arrays.update(
        alias_ids=np.asarray(alias_ids, np.int32),
        label_ids=np.asarray(label_ids, np.int32),
        image_ids=np.asarray([str(s) for s in image_ids]),
        split=np.asarray([str(s) for s in split]),
        is_negative=np.asarray(is_negative, bool),
        iou=ious,
    )
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return {"n_images": k, "iou": ious, "batch": batch}


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, full_masks: bool = True,
               model=None, prompt_mode: str | None = None, batch: int = 1) -> Path:
    """Export every finished category of a run directory (see module docstring); returns the index.json path.

    batch: images per image-encoder call (halved on device out-of-memory, logged to the run's log.txt; a later
    category starts from the halved size).

    The teacher targets are computed in the prompt mode the run searched in (run.json), unless prompt_mode says
    otherwise.

    The model, images and ground truth are rebuilt from what the run recorded (run.json, <category>.json).
    model: an already loaded model for the run's weights (default: load them).
    """
    run = RunDir(run_dir)
    settings = run.read_settings()
    finished = run.finished_results()
    if not finished:
        raise ValueError(f"{run.path} has no finished category to export (run `jalias search` first)")
    out = Path(out) if out is not None else run.path / "export"
    check_out_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    if model is None:
        model, _ = load_model(settings.weights, settings.dtype, settings.prompt_mode, settings.adapters)
    model = model.with_prompt_mode(settings.prompt_mode if prompt_mode is None else prompt_mode)
    cfg = model.config
    entries = []
    for res in finished:
        inputs = rebuild_inputs(settings, res)
        file = f"{res['slug']}.npz"
        info = export_category(model, out / file, res["alias_ids"], res["label_ids"], inputs["images"],
                               inputs["gts"], inputs["image_ids"], inputs["split"], inputs["is_negative"],
                               settings.threshold, full_masks, batch, run.log)
        batch = info["batch"]
        entries.append({
            "category": res["category"], "file": file, "label": res["label"], "alias_ids": res["alias_ids"],
            "alias_text": res["alias_text"], "n_images": info["n_images"],
            "alias_iou_search": res["alias_iou_search"], "alias_iou_heldout": res["alias_iou_heldout"],
        })
    grid = cfg.vision.backbone.grid
    index = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "run_dir": str(run.path.resolve()),
        "weights": settings.weights,
        "prompt_mode": model.prompt_mode,
        "threshold": settings.threshold,
        "full_masks": full_masks,
        "model": {"image_size": cfg.image_size, "mask_size": 4 * grid, "num_queries": cfg.decoder.num_queries,
                  "text_width": cfg.text.hidden_size, "prompt_width": cfg.encoder.hidden_size,
                  "context_length": cfg.context_length},
        "keys": {k: v for k, v in KEYS.items() if full_masks or k != "pred_masks"},
        "categories": entries,
    }
    path = out / "index.json"
    write_json_atomic(path, index)
    return path


def read_index(path: str | os.PathLike) -> dict:
    """index.json of an export folder (or the folder itself) -> dict."""
    path = Path(path)
    if path.is_dir():
        path = path / "index.json"
    return json.loads(path.read_text())
