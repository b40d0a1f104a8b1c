"""PyTorch baselines for the throughput benchmark: transformers' `Sam3Model` scoring candidate prompts by mask IoU.

Both baselines compute jalias's prediction rule, so their IoUs can be compared with the engine's:
  keep queries with sigmoid(pred_logit) * sigmoid(presence_logit) > threshold; resize their mask logits with
  `F.interpolate(mode="bilinear", align_corners=False)` to the GT resolution; > 0; union; IoU (empty vs empty = 1).

  torch-seed  the original research code's way: a full `Sam3Model` forward (image + prompt) for every
              candidate-image pair, 4 pairs per batch, no caching of anything.
  torch-opt   the best honest torch: vision features computed once per image (`get_vision_features`) and text
              features once per candidate (`get_text_features`), both passed back into `Sam3Model.forward`;
              candidates batched against one image (the vision features expanded, not copied);
              `torch.inference_mode()`; SDPA attention; bf16 autocast on GPU (fp32 on CPU); optional
              `torch.compile` of the forward.

Both resize only the kept queries (gathered across the batch), so the IoU step costs O(kept x H x W).
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def torch_model(cfg, params: dict, device: str = "cpu", attn: str = "sdpa"):
    """transformers.Sam3Model with jalias's (numpy) Flax params, eval mode, fp32, on `device`."""
    import transformers

    from jalias.weights.mapping import params_to_state_dict

    hf_cfg = transformers.Sam3Config(**cfg.to_hf_dict())
    hf_cfg._attn_implementation = attn
    with torch.device(device):  # random init on the target device: on a GPU, seconds instead of minutes at full size
        model = transformers.Sam3Model(hf_cfg).eval()
    res = model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in params_to_state_dict(params).items()},
                                strict=False)
    if res.unexpected_keys:
        raise ValueError(f"jalias params with no torch counterpart: {res.unexpected_keys[:3]}")
    return model.to(device)


def union_iou(pred_logits: torch.Tensor, presence_logits: torch.Tensor, pred_masks: torch.Tensor,
              gt: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """pred_logits [B, Q], presence_logits [B, 1], pred_masks [B, Q, h, w] (logits), gt bool [H, W] -> IoU float32 [B].

    Only kept queries are resized (flattened across the batch), then OR-ed per candidate via a scatter-add.
    """
    b = pred_logits.shape[0]
    h, w = gt.shape
    keep = torch.sigmoid(pred_logits.float()) * torch.sigmoid(presence_logits.float()) > threshold  # [B, Q]
    rows, cols = keep.nonzero(as_tuple=True)
    hits = torch.zeros(b, h * w, dtype=torch.int32, device=gt.device)
    if len(rows):
        up = F.interpolate(pred_masks[rows, cols][:, None].float(), size=(h, w), mode="bilinear",
                           align_corners=False)  # [M, 1, H, W]
        hits.index_add_(0, rows, (up.reshape(len(rows), h * w) > 0).to(torch.int32))
    pred = hits > 0
    g = gt.reshape(1, h * w)
    inter = (pred & g).sum(1)
    union = (pred | g).sum(1)
    return torch.where(union == 0, torch.ones((), device=gt.device),
                       inter.float() / union.clamp(min=1).float())


def _as_tensor(x, device, dtype=None) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).to(device=device, dtype=dtype)


class TorchSeed:
    """Full forward per (candidate, image) pair, `batch` pairs at a time, nothing cached."""

    name = "torch-seed"

    def __init__(self, model, pixel_values: np.ndarray, gts: Sequence[np.ndarray], device: str = "cpu",
                 batch: int = 4, threshold: float = 0.5):
        self.model, self.device, self.batch, self.threshold = model, device, batch, threshold
        self.pixels = _as_tensor(pixel_values, device, torch.float32)  # [K, 3, S, S]
        self.gts = [_as_tensor(g, device, torch.bool) for g in gts]

    def score(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """input_ids / attention_mask int [N, T] (laid-out prompts) -> IoU float32 [N, K]."""
        n, k = len(input_ids), len(self.gts)
        ids, mask = _as_tensor(input_ids, self.device, torch.long), _as_tensor(attention_mask, self.device, torch.long)
        pairs = [(i, j) for j in range(k) for i in range(n)]
        out = torch.zeros(n, k)
        with torch.no_grad():
            for s in range(0, len(pairs), self.batch):
                chunk = pairs[s:s + self.batch]
                ci = torch.tensor([i for i, _ in chunk], device=self.device)
                cj = torch.tensor([j for _, j in chunk], device=self.device)
                o = self.model(pixel_values=self.pixels[cj], input_ids=ids[ci], attention_mask=mask[ci])
                for r, (i, j) in enumerate(chunk):  # GTs differ per pair: IoU per row
                    out[i, j] = union_iou(o.pred_logits[r:r + 1], o.presence_logits[r:r + 1],
                                          o.pred_masks[r:r + 1], self.gts[j], self.threshold).cpu()[0]
        return out.numpy()


class TorchOpt:
    """Vision features once per image, text features once per candidate batch, batched fused forward."""

    name = "torch-opt"

    def __init__(self, model, pixel_values: np.ndarray, gts: Sequence[np.ndarray], device: str = "cpu",
                 batch: int = 32, bf16: bool | None = None, compile: bool = False, threshold: float = 0.5):
        from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

        self._vision_output = Sam3VisionEncoderOutput
        self.model, self.device, self.batch, self.threshold = model, device, batch, threshold
        self.bf16 = device.startswith("cuda") if bf16 is None else bf16
        self.gts = [_as_tensor(g, device, torch.bool) for g in gts]
        self.forward = torch.compile(model.forward) if compile else model.forward
        with torch.inference_mode(), self._autocast():
            self.vision = []
            for j in range(len(pixel_values)):
                v = model.get_vision_features(pixel_values=_as_tensor(pixel_values[j:j + 1], device, torch.float32))
                self.vision.append((tuple(v.fpn_hidden_states), tuple(v.fpn_position_encoding)))

    def _autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.split(":")[0], dtype=torch.bfloat16)

    def _expanded(self, j: int, b: int):
        fpn, pos = self.vision[j]
        grow = lambda ts: tuple(t.expand(b, *t.shape[1:]) for t in ts)
        return self._vision_output(fpn_hidden_states=grow(fpn), fpn_position_encoding=grow(pos))

    def score(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """input_ids / attention_mask int [N, T] (laid-out prompts) -> IoU float32 [N, K]."""
        n, k = len(input_ids), len(self.gts)
        ids, mask = _as_tensor(input_ids, self.device, torch.long), _as_tensor(attention_mask, self.device, torch.long)
        out = torch.zeros(n, k, device=self.device)
        with torch.inference_mode(), self._autocast():
            for s in range(0, n, self.batch):
                bi, bm = ids[s:s + self.batch], mask[s:s + self.batch]
                text = self.model.get_text_features(input_ids=bi, attention_mask=bm)
                for j in range(k):
                    o = self.forward(vision_embeds=self._expanded(j, len(bi)), text_embeds=text, attention_mask=bm)
                    out[s:s + len(bi), j] = union_iou(o.pred_logits, o.presence_logits, o.pred_masks, self.gts[j],
                                                      self.threshold)
        return out.cpu().numpy()
