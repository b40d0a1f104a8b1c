"""Stage-by-stage parity with transformers' SAM3 at the REAL model sizes (torch, CPU, fp32).

The whole model at 1008 px is too slow for CPU tests, so every stage is checked on its own at full width with
real shapes (1008 px image, 72x72 token grid, 288x288 pixel embeddings, 32 tokens, 200 queries), using one block
where the model stacks identical blocks. Configs come from `transformers.Sam3Config()` defaults, read through
`jalias.model.config.Sam3Config.from_hf_dict`.

Weights: `module_shapes` of the jalias stage -> `random_tree` (fan-in-scaled, unit-scale activations) ->
`params_to_state_dict` (keys relative to the stage) -> `torch_module.load_state_dict(strict=True)`; the only
exceptions are HF weights the text-prompted path never uses (0.5x FPN level, CLIP's own projection, the third
pixel-decoder stage), which must be exactly the missing ones.

Tolerance: max |jalias - torch| <= RTOL * max |torch| with RTOL = 1e-5. fp32 rounding (2^-24 ~ 6e-8) grows
roughly with sqrt(reduction length) per matmul and through a few normalisations; at these sizes (reductions of
1024-5184 terms, softmax over 5184 keys) the measured error is <= 1e-6 of the output scale (2-core CPU, XLA vs
oneDNN), so 1e-5 leaves 10x margin. The bound is tight on purpose: the subtlest real mismatch tried, tanh-GELU
instead of erf-GELU, moves one ViT or CLIP layer by ~1e-4 of the scale and fails here (a 1e-4 bound would let
it pass); layout, RoPE, position-table, mask, eps-clamp and scale mistakes are far larger. Each test also asserts
that the reference output is non-degenerate (varies, changes with the prompt, or changes its input materially),
so a vacuous match cannot pass. JAX matmuls run at "highest" precision (no TF32 if run on a GPU).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib

import jax
import numpy as np
import pytest
import torch
import transformers

from jalias.model.config import Sam3Config
from jalias.model.decoder import DetrDecoder
from jalias.model.encoder import DetrEncoder
from jalias.model.heads import DotProductScoring, MaskDecoder
from jalias.model.layers import key_padding_bias, sine_embed_2d
from jalias.model.sam3 import Sam3Module
from jalias.model.vision import ViTEmbeddings, ViTLayer, VisionNeck
from jalias.weights.mapping import params_to_state_dict

from parity_utils import (PROMPTS, assert_rel_close, assert_varied, load_torch_stage, mask_iou, nchw_to_nhwc,
                          prompts, rel_err, stage_params, t)

# `from transformers.models.sam3 import modeling_sam3` can yield a torchvision-requiring placeholder once
# transformers' lazy module has been touched; importlib returns the real module (torchvision is not needed here).
hf = importlib.import_module("transformers.models.sam3.modeling_sam3")

RTOL = 1e-5
HF_CFG = transformers.Sam3Config()
FULL = Sam3Config.from_hf_dict(HF_CFG.to_dict())
VIT = FULL.vision.backbone
G = VIT.grid  # 72
D = FULL.encoder.hidden_size  # 256


@pytest.fixture(autouse=True, scope="module")
def _fp32_matmuls():
    """On GPUs JAX's default fp32 matmul precision is TF32-like (~1e-3): compare at full fp32 precision."""
    with jax.default_matmul_precision("highest"):
        yield


def hf_sub(config, **changes):
    """A copy of an HF sub-config with some fields changed; attention via SDPA (exact, less memory than eager)."""
    config = copy.deepcopy(config)
    for k, v in changes.items():
        setattr(config, k, v)
    config._attn_implementation = "sdpa"
    return config


def normal(*shape, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def encoder_pos() -> np.ndarray:
    """jalias's DETR-encoder position encoding of the 72x72 grid: [1, 5184, 256]."""
    return sine_embed_2d(G, G, D // 2, normalize=True).reshape(1, G * G, D)


def torch_pos() -> torch.Tensor:
    """HF's sine position encoding of the 72x72 level (what Sam3VisionNeck hands the DETR encoder): [1, 5184, 256]."""
    pe = hf.Sam3SinePositionEmbedding(num_position_features=D // 2, normalize=True)
    return pe((1, D, G, G), "cpu", torch.float32).flatten(2).transpose(1, 2)


def test_config_is_real_sam3():
    assert (FULL.image_size, VIT.patch_size, G) == (1008, 14, 72)
    assert (VIT.hidden_size, VIT.num_attention_heads, VIT.num_hidden_layers, VIT.window_size,
            VIT.global_attn_indexes, VIT.intermediate_size) == (1024, 16, 32, 24, (7, 15, 23, 31), 4736)
    assert (FULL.text.hidden_size, FULL.text.num_hidden_layers, FULL.text.num_attention_heads,
            FULL.text.hidden_act) == (1024, 24, 16, HF_CFG.text_config.hidden_act)
    for sub in (FULL.encoder, FULL.decoder):
        assert (sub.hidden_size, sub.num_attention_heads, sub.intermediate_size) == (256, 8, 2048)
    assert FULL.decoder.num_queries == 200 and FULL.mask_decoder.hidden_size == 256


def test_position_encoding_matches_torch():
    assert np.abs(encoder_pos() - torch_pos().numpy()).max() < 1e-5


# ---- vision -------------------------------------------------------------------------------------------------------
def test_vit_embeddings_1008px():
    """Patch embedding (14x14 conv, no bias) + 24x24 pretraining position table tiled 3x3 onto the 72x72 grid."""
    px = normal(1, 3, FULL.image_size, FULL.image_size, seed=1)
    jm = ViTEmbeddings(VIT)
    params, sd = stage_params(jm, nchw_to_nhwc(px), seed=11)
    tm = hf.Sam3ViTEmbeddings(hf_sub(HF_CFG.vision_config.backbone_config))
    load_torch_stage(tm, sd)
    with torch.no_grad():
        ref = tm(t(px)).numpy().reshape(1, G, G, VIT.hidden_size)
    got = np.asarray(jm.apply({"params": params}, nchw_to_nhwc(px)))
    assert_varied("ViT embeddings", ref, 0.5)
    assert_rel_close("ViT embeddings", got, ref, RTOL)


@pytest.mark.parametrize("window", [VIT.window_size, 0], ids=["windowed24", "global"])
def test_vit_layer(window):
    """One ViT block on a [1, 72, 72, 1024] map: windowed (9 windows of 24x24) or global attention, 2-D RoPE."""
    x = normal(1, G, G, VIT.hidden_size, seed=2)
    jm = ViTLayer(VIT, window)
    params, sd = stage_params(jm, x, seed=12 + window)
    tm = hf.Sam3ViTLayer(hf_sub(HF_CFG.vision_config.backbone_config), window_size=window)
    load_torch_stage(tm, sd)
    with torch.no_grad():
        ref = tm(t(x)).numpy()
    got = np.asarray(jm.apply({"params": params}, x))
    assert rel_err(ref, x) > 0.1, "the block barely changes its input: parity would be vacuous"
    assert_rel_close(f"ViT layer window={window}", got, ref, RTOL)


def test_vision_neck():
    """FPN neck on the 72x72x1024 ViT map -> 288, 144, 72 px maps of width 256 (jalias skips the 0.5x level)."""
    x = normal(1, G, G, VIT.hidden_size, seed=3)
    jm = VisionNeck(FULL.vision)
    params, sd = stage_params(jm, x, seed=13)
    tm = hf.Sam3VisionNeck(hf_sub(HF_CFG.vision_config))
    load_torch_stage(tm, sd, unused=[r"^fpn_layers\.3\."])
    with torch.no_grad():
        ref_maps, ref_pos = tm(t(np.transpose(x, (0, 3, 1, 2))))
    got = jm.apply({"params": params}, x)
    assert len(got) == 3
    for level, (r, g, size) in enumerate(zip(ref_maps[:3], got, (4 * G, 2 * G, G))):
        r = nchw_to_nhwc(r.numpy())
        assert r.shape == (1, size, size, D)
        assert_varied(f"FPN level {level}", r, 0.1)
        assert_rel_close(f"FPN level {level}", np.asarray(g), r, RTOL)
    assert np.abs(nchw_to_nhwc(ref_pos[2].numpy()).reshape(1, G * G, D) - encoder_pos()).max() < 1e-5


# ---- text -------------------------------------------------------------------------------------------------------
class TorchTextPath(torch.nn.Module):
    """What `Sam3Model.get_text_features` computes: CLIP text model -> last_hidden_state -> text_projection."""

    def __init__(self, text_config, out_dim: int):
        super().__init__()
        self.text_encoder = transformers.CLIPTextModelWithProjection(text_config)
        self.text_projection = torch.nn.Linear(text_config.hidden_size, out_dim)

    def forward(self, input_ids, attention_mask):
        hidden = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.text_projection(hidden)


def test_text_layer_and_projection():
    """Token + position embeddings, one causal CLIP layer at width 1024 (16 heads), final layer norm and SAM3's
    text_projection 1024 -> 256, on 32 tokens with padding (3 prompts of different lengths)."""
    cfg = dataclasses.replace(FULL, text=dataclasses.replace(FULL.text, num_hidden_layers=1))
    ids, mask = prompts()
    module = Sam3Module(cfg)
    params, sd = stage_params(module, ids, mask, seed=14, method=Sam3Module.text_features)
    assert set(params) == {"text_encoder", "text_projection"}
    tm = TorchTextPath(hf_sub(HF_CFG.text_config, num_hidden_layers=1), D)
    load_torch_stage(tm, sd, unused=[r"^text_encoder\.text_projection\."])
    with torch.no_grad():
        ref = tm(torch.from_numpy(ids).long(), torch.from_numpy(mask).long()).numpy()
    got = np.asarray(module.apply({"params": params}, ids, mask, method=Sam3Module.text_features))
    assert ref.shape == (3, 32, D)
    assert_varied("text features", ref, 0.1)
    assert rel_err(ref[0, 1:3], ref[1, 1:3]) > 0.1  # different tokens -> different features (causal: pos >= 1)
    assert_rel_close("text features (all 32 positions)", got, ref, RTOL)


# ---- DETR encoder / decoder --------------------------------------------------------------------------------------
def prompt_batch(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random prompt features [2, 32, 256] (pads included: they must be masked out) and the masks of PROMPTS[:2]."""
    _, mask = prompts(PROMPTS[:2])
    return normal(2, 32, D, seed=seed), mask


def test_detr_encoder_layer():
    """One fusion-encoder layer on 72x72 image tokens: self-attention with the sine position encoding, then
    cross-attention to a padded prompt. Both rows share the image, so any row difference comes from the prompt."""
    enc = dataclasses.replace(FULL.encoder, num_layers=1)
    x = np.repeat(normal(1, G * G, D, seed=4), 2, axis=0)
    prompt, mask = prompt_batch(seed=5)
    jm = DetrEncoder(enc)
    args = (x, encoder_pos(), prompt, key_padding_bias(mask))
    params, sd = stage_params(jm, *args, seed=15)
    tm = hf.Sam3DetrEncoder(hf_sub(HF_CFG.detr_encoder_config, num_layers=1))
    load_torch_stage(tm, sd)
    vis = t(x).transpose(1, 2).reshape(2, D, G, G)
    pos = torch_pos().transpose(1, 2).reshape(1, D, G, G).expand(2, -1, -1, -1)
    with torch.no_grad():
        ref = tm(vision_features=[vis], text_features=t(prompt), vision_pos_embeds=[pos],
                 text_mask=torch.from_numpy(mask).bool()).last_hidden_state.numpy()
    got = np.asarray(jm.apply({"params": params}, *args))
    assert rel_err(ref, x) > 0.1
    assert rel_err(ref[0], ref[1]) > 0.05, "encoder output does not depend on the prompt"
    assert_rel_close("DETR encoder layer", got, ref, RTOL)


def test_detr_decoder_and_box_head():
    """DETR decoder (2 layers, so one box refinement feeds the next layer's RPB and query positions), 200 queries +
    presence token, 72x72 memory, padded prompts; then the final box head."""
    dec = dataclasses.replace(FULL.decoder, num_layers=2)
    vision = normal(2, G * G, D, seed=6)
    pos = np.broadcast_to(encoder_pos(), vision.shape)
    text, mask = prompt_batch(seed=7)
    jm = DetrDecoder(dec)
    args = (vision, pos, text, key_padding_bias(mask), (G, G))
    params, _ = stage_params(jm, *args, seed=16)
    # push 20 reference boxes to the sigmoid's tails so inverse_sigmoid's clamping (eps 1e-3) is exercised
    params["reference_points"]["embedding"][:20] = np.where(np.arange(80).reshape(20, 4) % 2, 9.0, -9.0)
    sd = params_to_state_dict(params)
    tm = hf.Sam3DetrDecoder(hf_sub(HF_CFG.detr_decoder_config, num_layers=2))
    load_torch_stage(tm, sd)
    with torch.no_grad():
        out = tm(vision_features=t(vision), text_features=t(text), vision_pos_encoding=t(pos),
                 text_mask=torch.from_numpy(mask).bool(), spatial_shapes=torch.tensor([[G, G]]))
        hidden, ref_boxes = out.intermediate_hidden_states[-1], out.reference_boxes[-1]
        boxes = hf.box_cxcywh_to_xyxy((hf.inverse_sigmoid(ref_boxes) + tm.box_head(hidden)).sigmoid())
    got = jm.apply({"params": params}, *args)
    got_boxes = np.asarray(jm.apply({"params": params}, got["hidden"], got["ref_boxes"], method=DetrDecoder.boxes))
    assert hidden.shape == (2, 200, D)
    assert_varied("decoder queries", hidden.numpy(), 0.5)
    assert_varied("refined reference boxes", ref_boxes.numpy(), 0.05)
    assert_varied("final boxes", boxes.numpy(), 0.05)
    presence = out.presence_logits[-1].numpy()
    assert np.all(np.abs(presence) < 10), "presence logits clamped: comparison would be vacuous"
    assert abs(presence[0, 0] - presence[1, 0]) > 1e-2
    assert_rel_close("decoder hidden", np.asarray(got["hidden"]), hidden.numpy(), RTOL)
    assert_rel_close("decoder reference boxes", np.asarray(got["ref_boxes"]), ref_boxes.numpy(), RTOL)
    assert_rel_close("decoder presence logits", np.asarray(got["presence_logits"]), presence, RTOL)
    assert_rel_close("final boxes (xyxy)", got_boxes, boxes.numpy(), RTOL)


# ---- heads ------------------------------------------------------------------------------------------------------
def test_dot_product_scoring():
    queries = normal(2, 200, D, seed=8)
    prompt, mask = prompt_batch(seed=9)
    jm = DotProductScoring(FULL.decoder)
    params, sd = stage_params(jm, queries, prompt, mask, seed=17)
    tm = hf.Sam3DotProductScoring(HF_CFG)
    load_torch_stage(tm, sd)
    with torch.no_grad():
        ref = tm(t(queries)[None], t(prompt), torch.from_numpy(mask).bool())[0, ..., 0].numpy()
    got = np.asarray(jm.apply({"params": params}, queries, prompt, mask))
    assert ref.shape == (2, 200)
    assert np.mean(np.abs(ref) >= 12) < 0.05, "scores mostly clamped: comparison would be vacuous"
    assert_varied("scores", ref, 0.3)
    assert_rel_close("dot-product scores", got, ref, RTOL)


def test_mask_decoder_288px():
    """Prompt cross-attention on the 72x72 encoder tokens, pixel decoder up to 288x288 (conv + GroupNorm per
    stage), instance/semantic projections and 200 per-query masks."""
    queries = normal(1, 200, D, seed=10)
    fpn = [normal(1, s, s, D, seed=20 + s) for s in (4 * G, 2 * G, G)]
    tokens = normal(1, G * G, D, seed=21)
    prompt, mask = prompt_batch(seed=22)
    prompt, mask = prompt[1:], mask[1:]
    jm = MaskDecoder(FULL.mask_decoder)
    args = (queries, fpn, tokens, prompt, key_padding_bias(mask))
    params, sd = stage_params(jm, *args, seed=18)
    tm = hf.Sam3MaskDecoder(hf_sub(HF_CFG.mask_decoder_config))
    load_torch_stage(tm, sd, unused=[r"^pixel_decoder\.(conv_layers|norms)\.2\."])
    with torch.no_grad():
        out = tm(decoder_queries=t(queries), backbone_features=[t(f).permute(0, 3, 1, 2) for f in fpn],
                 encoder_hidden_states=t(tokens), prompt_features=t(prompt),
                 prompt_mask=torch.from_numpy(mask).bool())
    ref_masks, ref_sem = out.pred_masks.numpy(), out.semantic_seg.numpy()
    masks, sem = jm.apply({"params": params}, *args)
    masks, sem = np.asarray(masks), np.asarray(sem)
    assert ref_masks.shape == (1, 200, 4 * G, 4 * G) and ref_sem.shape == (1, 1, 4 * G, 4 * G)
    fg = (ref_masks > 0).mean()
    assert 0.05 < fg < 0.95, f"masks nearly all {'full' if fg >= 0.95 else 'empty'}"
    assert_varied("semantic seg", ref_sem, 0.1)
    assert_rel_close("pred_masks", masks, ref_masks, RTOL)
    assert_rel_close("semantic_seg", sem, ref_sem, RTOL)
    iou = mask_iou(masks, ref_masks)
    assert iou.min() >= 0.99, f"thresholded mask IoU {iou.min():.4f} < 0.99"
