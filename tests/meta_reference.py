"""Meta's own SAM3 (the `sam3` package, 0.1.4) as a test oracle: import it on CPU, build a small image model with
Meta's classes and Meta's builder settings, give it random prompt-sensitive weights, and run Meta's text path
(`Sam3Processor.set_image` + `set_text_prompt`).

Installing it: `sam3==0.1.4` pins numpy<2.4 and tqdm<4.68, which clash with jalias's pins, so it cannot join the
`dev` extra; `tests/install_meta_oracle.sh` installs it and the packages it imports (torchvision, timm, iopath,
portalocker, einops) with --no-deps into `.meta-oracle/` (or $JALIAS_META_ORACLE), outside site-packages.
They stay out of site-packages because the PyPI torchvision wheel is built against CUDA torch: with the CPU torch
its C ops do not load, and an importable-but-broken torchvision breaks `transformers.Sam3Model`'s import for
every other test. Here the two op schemas that torchvision's Python side registers fakes for are declared
first, so its pure-Python parts (v2 transforms, used by Meta's preprocessing) import; no torchvision op runs on
Meta's text path. `sam3.model.edt` (a triton kernel, tracker only) is stubbed.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import types
from pathlib import Path

import numpy as np

ORACLE_DIR = Path(os.environ.get("JALIAS_META_ORACLE", Path(__file__).resolve().parents[1] / ".meta-oracle"))
VOCAB = Path(__file__).resolve().parents[1] / "jalias" / "assets" / "bpe_simple_vocab_16e6.txt.gz"


def import_sam3():
    """Import Meta's package (from site-packages or ORACLE_DIR). Returns the module, or raises ImportError with
    the reason."""
    import torch

    if "sam3" not in sys.modules:
        try:
            importlib.util.find_spec("sam3")
        except ValueError:
            pass
        if importlib.util.find_spec("sam3") is None and ORACLE_DIR.is_dir():
            sys.path.append(str(ORACLE_DIR))
        if importlib.util.find_spec("sam3") is None:
            raise ImportError(f"Meta's sam3 package is not installed (run tests/install_meta_oracle.sh; looked in "
                              f"site-packages and {ORACLE_DIR})")
        if "torchvision" not in sys.modules and not hasattr(torch.ops.torchvision, "nms"):
            lib = torch.library.Library("torchvision", "DEF")  # noqa: F841 (kept alive below)
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _KEEP.append(lib)
        edt = types.ModuleType("sam3.model.edt")
        edt.edt_triton = None
        sys.modules.setdefault("sam3.model.edt", edt)
    try:
        import sam3  # noqa: F401
        import sam3.model_builder  # noqa: F401
        import sam3.model.sam3_image_processor  # noqa: F401
    except Exception as e:  # a broken install: report it as the skip reason
        raise ImportError(f"Meta's sam3 package does not import: {type(e).__name__}: {e}") from e
    return sys.modules["sam3"]


_KEEP: list = []


# ---- a small Meta image model ---------------------------------------------------------------------------------
def build_meta_model(image_size=56, width=32, heads=2, vit_layers=2, global_attn=(1,), window=2, pretrain=28,
                     text_layers=2, enc_layers=1, dec_layers=2, geo_layers=2, queries=8):
    """Meta's `build_sam3_image_model` with every size scaled down and every other setting as in Meta's builder
    (eps, activations, pre/post-norm, position-encoding placement, DAC, box RPB "log", presence token, ...)."""
    import torch.nn as nn
    from sam3.model.decoder import TransformerDecoder, TransformerDecoderLayer
    from sam3.model.encoder import TransformerEncoderFusion, TransformerEncoderLayer
    from sam3.model.geometry_encoders import SequenceGeometryEncoder
    from sam3.model.maskformer_segmentation import PixelDecoder, UniversalSegmentationHead
    from sam3.model.model_misc import MLP, DotProductScoring, TransformerWrapper
    from sam3.model.model_misc import MultiheadAttentionWrapper as MHA
    from sam3.model.necks import Sam3DualViTDetNeck
    from sam3.model.position_encoding import PositionEmbeddingSine
    from sam3.model.sam3_image import Sam3Image
    from sam3.model.text_encoder_ve import VETextEncoder
    from sam3.model.tokenizer_ve import SimpleTokenizer
    from sam3.model.vitdet import ViT
    from sam3.model.vl_combiner import SAM3VLBackbone

    w = width
    pos = lambda: PositionEmbeddingSine(num_pos_feats=w, normalize=True, scale=None, temperature=10000)
    vit = ViT(img_size=image_size, pretrain_img_size=pretrain, patch_size=14, embed_dim=w, depth=vit_layers,
              num_heads=heads, mlp_ratio=2.0, norm_layer="LayerNorm", drop_path_rate=0.0, qkv_bias=True,
              use_abs_pos=True, tile_abs_pos=True, global_att_blocks=tuple(global_attn), rel_pos_blocks=(),
              use_rope=True, use_interp_rope=True, window_size=window, pretrain_use_cls_token=True,
              retain_cls_token=False, ln_pre=True, ln_post=False, return_interm_layers=False,
              bias_patch_embed=False)
    neck = Sam3DualViTDetNeck(position_encoding=pos(), d_model=w, scale_factors=[4.0, 2.0, 1.0, 0.5], trunk=vit,
                              add_sam2_neck=False)
    text = VETextEncoder(tokenizer=SimpleTokenizer(bpe_path=str(VOCAB)), d_model=w, width=w, heads=heads,
                         layers=text_layers, use_act_checkpoint=False)
    backbone = SAM3VLBackbone(visual=neck, text=text, scalp=1)
    enc_layer = TransformerEncoderLayer(
        activation="relu", d_model=w, dim_feedforward=2 * w, dropout=0.1, pos_enc_at_attn=True,
        pos_enc_at_cross_attn_keys=False, pos_enc_at_cross_attn_queries=False, pre_norm=True,
        self_attention=MHA(num_heads=heads, dropout=0.1, embed_dim=w, batch_first=True),
        cross_attention=MHA(num_heads=heads, dropout=0.1, embed_dim=w, batch_first=True))
    encoder = TransformerEncoderFusion(layer=enc_layer, num_layers=enc_layers, d_model=w, num_feature_levels=1,
                                       frozen=False, use_act_checkpoint=False, add_pooled_text_to_img_feat=False,
                                       pool_text_with_mask=True)
    dec_layer = TransformerDecoderLayer(activation="relu", d_model=w, dim_feedforward=2 * w, dropout=0.1,
                                        cross_attention=MHA(num_heads=heads, dropout=0.1, embed_dim=w),
                                        n_heads=heads, use_text_cross_attention=True)
    # resolution/stride=None: the coordinate cache is built on the fly (Meta's precompute allocates on cuda)
    decoder = TransformerDecoder(layer=dec_layer, num_layers=dec_layers, num_queries=queries,
                                 return_intermediate=True, box_refine=True, num_o2m_queries=0, dac=True,
                                 boxRPB="log", d_model=w, frozen=False, interaction_layer=None,
                                 dac_use_selfatt_ln=True, resolution=None, stride=None, use_act_checkpoint=False,
                                 presence_token=True)
    scoring = DotProductScoring(d_model=w, d_proj=w, prompt_mlp=MLP(
        input_dim=w, hidden_dim=2 * w, output_dim=w, num_layers=2, dropout=0.1, residual=True,
        out_norm=nn.LayerNorm(w)))
    seg = UniversalSegmentationHead(
        hidden_dim=w, upsampling_stages=3, aux_masks=False, presence_head=False, dot_product_scorer=None,
        act_ckpt=False, cross_attend_prompt=MHA(num_heads=heads, dropout=0, embed_dim=w),
        pixel_decoder=PixelDecoder(num_upsampling_stages=3, interpolation_mode="nearest", hidden_dim=w))
    geo_layer = TransformerEncoderLayer(
        activation="relu", d_model=w, dim_feedforward=2 * w, dropout=0.1, pos_enc_at_attn=False, pre_norm=True,
        self_attention=MHA(num_heads=heads, dropout=0.1, embed_dim=w, batch_first=False),
        pos_enc_at_cross_attn_queries=False, pos_enc_at_cross_attn_keys=True,
        cross_attention=MHA(num_heads=heads, dropout=0.1, embed_dim=w, batch_first=False))
    geo = SequenceGeometryEncoder(pos_enc=pos(), encode_boxes_as_points=False, points_direct_project=True,
                                  points_pool=True, points_pos_enc=True, boxes_direct_project=True, boxes_pool=True,
                                  boxes_pos_enc=True, d_model=w, num_layers=geo_layers, layer=geo_layer,
                                  use_act_ckpt=False, add_cls=True, add_post_encode_proj=True)
    model = Sam3Image(backbone=backbone, transformer=TransformerWrapper(encoder=encoder, decoder=decoder, d_model=w),
                      input_geometry_encoder=geo, segmentation_head=seg, num_feature_levels=1, o2m_mask_predict=True,
                      dot_prod_scoring=scoring, use_instance_query=False, multimask_output=True,
                      inst_interactive_predictor=None, matcher=None)
    return model.eval()


def randomize(model, seed: int = 0, presence_bias: float = 0.0) -> None:
    """Fan-in-scaled random weights, in place, over Meta's own parameters (so the test does not depend on
    jalias's layout): weights N(0, 1/fan_in), norm scales 1 + 0.1 N, biases 0.1 N, embeddings N(0, 1)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            owner = mods.get(name.rsplit(".", 1)[0]) if "." in name else model
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(owner, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and leaf == "weight":
                new = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            elif leaf.endswith("bias"):
                new = 0.1 * torch.randn(p.shape, generator=g)
            elif isinstance(owner, torch.nn.ConvTranspose2d):
                new = torch.randn(p.shape, generator=g) / np.sqrt(p.shape[0])
            elif leaf == "text_projection":
                new = torch.randn(p.shape, generator=g) / np.sqrt(p.shape[0])
            elif isinstance(owner, torch.nn.Embedding) or p.ndim < 2 or "pos" in leaf:
                new = torch.randn(p.shape, generator=g)
            else:
                new = torch.randn(p.shape, generator=g) / np.sqrt(np.prod(p.shape[1:]))
            p.copy_(new)
        if presence_bias:
            model.transformer.decoder.presence_token_head.layers[-1].bias += presence_bias


def released_state_dict(model) -> dict:
    """The image model's state dict in the released `sam3.pt` layout: {"model": {"detector.<key>": tensor}}."""
    return {"model": {f"detector.{k}": v.detach().clone() for k, v in model.state_dict().items()}}


@contextlib.contextmanager
def cpu_patches():
    """While Meta's code runs: `Tensor.pin_memory` is a no-op (Meta pins a 4-element scale tensor even on CPU) and
    torchvision's `roi_align` (no C ops here) answers the one call Meta's text path makes, on zero boxes."""
    import torch
    import torchvision

    pin, roi = torch.Tensor.pin_memory, torchvision.ops.roi_align

    def roi_align(feats, boxes, output_size, *a, **k):
        if sum(len(b) for b in boxes) == 0:
            return feats.new_zeros((0, feats.shape[1], output_size, output_size))
        raise RuntimeError("torchvision's roi_align has no kernel in this environment (box prompts)")

    torch.Tensor.pin_memory = lambda self, *a, **k: self
    torchvision.ops.roi_align = roi_align
    try:
        yield
    finally:
        torch.Tensor.pin_memory, torchvision.ops.roi_align = pin, roi


def run_processor(model, image: np.ndarray, prompt: str, resolution: int, threshold: float = 0.5) -> dict:
    """Meta's text path on one uint8 [H, W, 3] image: Sam3Processor.set_image + set_text_prompt. Returns the
    processor state plus the raw model outputs (pred_logits/pred_boxes[_xyxy]/presence/pred_masks)."""
    import torch
    from sam3.model.sam3_image_processor import Sam3Processor

    proc = Sam3Processor(model, resolution=resolution, device="cpu", confidence_threshold=threshold)
    captured = {}
    orig = model.forward_grounding

    def spy(*a, **k):
        out = orig(*a, **k)
        captured.update(out)
        return out

    model.forward_grounding = spy
    try:
        chw = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        with cpu_patches():
            state = proc.set_image(chw)
            captured["pixel_values"] = proc.transform(chw).unsqueeze(0)
            state = proc.set_text_prompt(prompt, state)
    finally:
        del model.forward_grounding
    return {"state": state, "out": captured}
