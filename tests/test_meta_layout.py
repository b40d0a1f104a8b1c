"""Meta sam3.pt layout <-> HF Sam3Model state dict (jalias.weights.meta)."""

from __future__ import annotations

import sys

import ml_dtypes
import numpy as np
import pytest
import torch

from jalias.weights.meta import hf_to_meta, load_meta_checkpoint, meta_to_hf  # noqa: E402

# Real key names and shapes of facebook/sam3 `sam3.pt` (video-model state dict, default SAM3 config),
# obtained by instantiating `sam3.model_builder.build_sam3_video_model` from facebookresearch/sam3
# (commit 99d02f28 / PyPI sam3==0.1.4) without weights and listing `state_dict()`.
REAL_META_KEYS = [
    ("detector.backbone.vision_backbone.trunk.pos_embed", (1, 577, 1024)),
    ("detector.backbone.vision_backbone.trunk.patch_embed.proj.weight", (1024, 3, 14, 14)),
    ("detector.backbone.vision_backbone.trunk.ln_pre.bias", (1024,)),
    ("detector.backbone.vision_backbone.trunk.blocks.31.attn.qkv.weight", (3072, 1024)),
    ("detector.backbone.vision_backbone.trunk.blocks.7.attn.qkv.bias", (3072,)),
    ("detector.backbone.vision_backbone.trunk.blocks.0.attn.proj.weight", (1024, 1024)),
    ("detector.backbone.vision_backbone.trunk.blocks.15.mlp.fc1.weight", (4736, 1024)),
    ("detector.backbone.vision_backbone.convs.0.dconv_2x2_0.weight", (1024, 512, 2, 2)),
    ("detector.backbone.vision_backbone.convs.0.dconv_2x2_1.bias", (256,)),
    ("detector.backbone.vision_backbone.convs.1.dconv_2x2.weight", (1024, 512, 2, 2)),
    ("detector.backbone.vision_backbone.convs.3.conv_1x1.weight", (256, 1024, 1, 1)),
    ("detector.backbone.language_backbone.encoder.positional_embedding", (32, 1024)),
    ("detector.backbone.language_backbone.encoder.text_projection", (1024, 512)),
    ("detector.backbone.language_backbone.encoder.token_embedding.weight", (49408, 1024)),
    ("detector.backbone.language_backbone.encoder.transformer.resblocks.23.attn.in_proj_weight", (3072, 1024)),
    ("detector.backbone.language_backbone.encoder.transformer.resblocks.0.mlp.c_proj.weight", (1024, 4096)),
    ("detector.backbone.language_backbone.resizer.weight", (256, 1024)),
    ("detector.geometry_encoder.boxes_pool_project.weight", (256, 256, 7, 7)),
    ("detector.geometry_encoder.encode.2.cross_attn_image.in_proj_weight", (768, 256)),
    ("detector.transformer.encoder.layers.5.cross_attn_image.out_proj.weight", (256, 256)),
    ("detector.transformer.decoder.layers.5.ca_text.in_proj_bias", (768,)),
    ("detector.transformer.decoder.layers.0.catext_norm.weight", (256,)),
    ("detector.transformer.decoder.presence_token_head.layers.2.weight", (1, 256)),
    ("detector.transformer.decoder.boxRPB_embed_y.layers.1.weight", (8, 256)),
    ("detector.transformer.decoder.reference_points.weight", (200, 4)),
    ("detector.segmentation_head.mask_predictor.mask_embed.layers.2.bias", (256,)),
    ("detector.segmentation_head.cross_attend_prompt.in_proj_weight", (768, 256)),
    ("detector.segmentation_head.semantic_seg_head.weight", (1, 256, 1, 1)),
    ("detector.dot_prod_scoring.hs_proj.weight", (256, 256)),
]
# Real keys of parts Sam3Model lacks; meta_to_hf must drop them (not fail).
REAL_DROPPED_KEYS = [
    ("detector.backbone.vision_backbone.trunk.blocks.0.attn.freqs_cis", (576, 32)),
    ("detector.backbone.vision_backbone.sam2_convs.0.dconv_2x2_0.weight", (1024, 512, 2, 2)),
    ("detector.geometry_encoder.points_direct_project.weight", (256, 2)),
    ("tracker.sam_mask_decoder.transformer.layers.0.self_attn.q_proj.weight", (256, 256)),
]
# Expected HF names for a few of the real keys above (hand-checked against convert_sam3_to_hf.py).
REAL_TO_HF = {
    "detector.backbone.vision_backbone.trunk.blocks.0.attn.proj.weight": (
        "vision_encoder.backbone.layers.0.attention.o_proj.weight",
        (1024, 1024),
    ),
    "detector.backbone.vision_backbone.convs.1.dconv_2x2.weight": (
        "vision_encoder.neck.fpn_layers.1.scale_layers.0.weight",
        (1024, 512, 2, 2),
    ),
    "detector.backbone.vision_backbone.convs.0.dconv_2x2_1.bias": (
        "vision_encoder.neck.fpn_layers.0.scale_layers.2.bias",
        (256,),
    ),
    "detector.transformer.decoder.layers.0.catext_norm.weight": (
        "detr_decoder.layers.0.text_cross_attn_layer_norm.weight",
        (256,),
    ),
    "detector.transformer.decoder.presence_token_head.layers.2.weight": (
        "detr_decoder.presence_head.layer3.weight",
        (1, 256),
    ),
}
# detector.* keys of sam3.pt: 1156, minus 32 freqs_cis, 22 sam2_convs, 6 point-prompt projections.
N_REAL_DETECTOR_KEYS_USED = 1096


def tiny_config():
    from transformers import Sam3Config

    return Sam3Config(
        vision_config=dict(
            backbone_config=dict(
                model_type="sam3_vit_model",
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=56,
                patch_size=14,
                window_size=2,
                global_attn_indexes=[1],
                pretrain_image_size=28,
            ),
            fpn_hidden_size=32,
            backbone_feature_sizes=[[16, 16], [8, 8], [4, 4]],
        ),
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            projection_dim=32,
            max_position_embeddings=32,
            vocab_size=49408,
        ),
        geometry_encoder_config=dict(hidden_size=32, num_layers=1, num_attention_heads=2, intermediate_size=64),
        detr_encoder_config=dict(hidden_size=32, num_layers=1, num_attention_heads=2, intermediate_size=64),
        detr_decoder_config=dict(
            hidden_size=32, num_layers=2, num_queries=8, num_attention_heads=2, intermediate_size=64
        ),
        mask_decoder_config=dict(hidden_size=32, num_upsampling_stages=3, num_attention_heads=2),
    )


@pytest.fixture(scope="module")
def tiny_hf_state_dict() -> dict[str, np.ndarray]:
    from transformers import Sam3Model

    torch.manual_seed(0)
    model = Sam3Model(tiny_config()).eval()
    # Randomise everything (HF init leaves zeros/ones in norms and biases, which would hide swaps).
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _shape_only(shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Zero-stride stand-ins: the right shapes at ~no memory cost (only the concatenations allocate)."""
    return {k: np.broadcast_to(np.zeros((), bool), s) for k, s in shapes.items()}


@pytest.fixture(scope="module")
def full_hf_shapes() -> dict[str, tuple[int, ...]]:
    from transformers import Sam3Config, Sam3Model

    with torch.device("meta"):  # default SAM3 sizes, no memory
        model = Sam3Model(Sam3Config())
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_roundtrip_through_pt_file(tmp_path, tiny_hf_state_dict):
    hf = tiny_hf_state_dict
    meta = hf_to_meta(hf)
    assert all(k.startswith("detector.") for k in meta)

    # Real tensor layouts on the Meta side.
    vit = "detector.backbone.vision_backbone.trunk"
    qkv = meta[f"{vit}.blocks.1.attn.qkv.weight"]
    hf_attn = "vision_encoder.backbone.layers.1.attention"
    np.testing.assert_array_equal(
        qkv, np.concatenate([hf[f"{hf_attn}.{p}_proj.weight"] for p in "qkv"], axis=0)
    )
    in_proj = meta["detector.transformer.decoder.layers.1.ca_text.in_proj_bias"]
    np.testing.assert_array_equal(in_proj[32:64], hf["detr_decoder.layers.1.text_cross_attn.k_proj.bias"])
    pos = meta[f"{vit}.pos_embed"]
    assert pos.shape == (1, 5, 32)  # 1 cls slot + (28/14)**2
    np.testing.assert_array_equal(pos[:, 0], 0)
    np.testing.assert_array_equal(
        meta["detector.backbone.language_backbone.encoder.text_projection"],
        hf["text_encoder.text_projection.weight"].T,
    )
    assert "detector.backbone.vision_backbone.convs.0.dconv_2x2_0.weight" in meta
    assert "detector.backbone.vision_backbone.convs.1.dconv_2x2.weight" in meta

    # Extra real-checkpoint entries that must be dropped on the way back.
    extras = {
        f"{vit}.blocks.0.attn.freqs_cis": torch.zeros(4, 8, dtype=torch.complex64),
        "detector.backbone.vision_backbone.sam2_convs.2.conv_1x1.weight": torch.ones(32, 32, 1, 1),
        "detector.geometry_encoder.points_pool_project.bias": torch.ones(32),
        "tracker.no_mem_embed": torch.ones(1, 1, 32),
    }
    ckpt = {"model": {**{k: torch.from_numpy(v) for k, v in meta.items()}, **extras}}
    path = tmp_path / "sam3.pt"
    torch.save(ckpt, path)

    loaded = load_meta_checkpoint(path)
    assert set(loaded) == set(meta) | set(extras)
    back = meta_to_hf(loaded)
    assert set(back) == set(hf)
    for k, v in hf.items():
        assert back[k].dtype == v.dtype, k
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_converted_state_dict_loads_strictly_into_hf_model(tiny_hf_state_dict):
    from transformers import Sam3Model

    back = meta_to_hf(hf_to_meta(tiny_hf_state_dict, prefix=""))
    model = Sam3Model(tiny_config())
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in back.items()}, strict=True)
    w = model.vision_encoder.backbone.layers[0].attention.v_proj.weight.detach().numpy()
    np.testing.assert_array_equal(w, tiny_hf_state_dict["vision_encoder.backbone.layers.0.attention.v_proj.weight"])


def test_bfloat16_checkpoint(tmp_path):
    w = torch.randn(6, 4).to(torch.bfloat16)
    torch.save({"detector.transformer.decoder.layers.0.self_attn.in_proj_weight": w}, tmp_path / "bf16.pt")
    loaded = load_meta_checkpoint(tmp_path / "bf16.pt")
    hf = meta_to_hf(loaded)
    q = hf["detr_decoder.layers.0.self_attn.q_proj.weight"]
    assert q.dtype == ml_dtypes.bfloat16 and q.shape == (2, 4)
    np.testing.assert_array_equal(q.astype(np.float32), w[:2].float().numpy())


def test_real_meta_names_full_config(full_hf_shapes):
    meta = hf_to_meta(_shape_only(full_hf_shapes))
    assert len(meta) == N_REAL_DETECTOR_KEYS_USED
    for key, shape in REAL_META_KEYS:
        assert key in meta, key
        assert meta[key].shape == shape, key

    # ...and the real names (plus the parts jalias drops) map onto the HF model's own names/shapes.
    hf = meta_to_hf(_shape_only(dict(REAL_META_KEYS + REAL_DROPPED_KEYS)))
    for key, (hf_key, shape) in REAL_TO_HF.items():
        assert hf[hf_key].shape == shape
    for k, v in hf.items():
        assert full_hf_shapes[k] == v.shape, k
    n_fused = sum(k.endswith(("qkv.weight", "qkv.bias", "in_proj_weight", "in_proj_bias")) for k, _ in REAL_META_KEYS)
    assert n_fused == 6
    assert len(hf) == len(REAL_META_KEYS) + 2 * n_fused  # each fused key -> q, k, v; dropped keys -> nothing

    full_back = meta_to_hf(meta)
    assert {k: v.shape for k, v in full_back.items()} == full_hf_shapes


def test_unknown_meta_key_is_named():
    sd = {"detector.transformer.decoder.norm.weight": np.ones(4), "detector.transformer.bogus.weight": np.ones(4)}
    with pytest.raises(ValueError, match=r"unknown Meta SAM3 key 'detector\.transformer\.bogus\.weight'"):
        meta_to_hf(sd)


def test_unknown_hf_key_is_named():
    with pytest.raises(ValueError, match=r"unknown HF SAM3 key 'vision_encoder\.mystery\.weight'"):
        hf_to_meta({"vision_encoder.mystery.weight": np.ones(3)})


def test_hf_qkv_part_missing():
    sd = {f"mask_decoder.prompt_cross_attn.{p}_proj.bias": np.ones(4) for p in "qv"}
    with pytest.raises(ValueError, match="lacks its k_proj"):
        hf_to_meta(sd)


def test_bad_fused_shape():
    with pytest.raises(ValueError, match="not divisible by 3"):
        meta_to_hf({"segmentation_head.cross_attend_prompt.in_proj_bias": np.ones(10)})


def test_load_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_meta_checkpoint(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        load_meta_checkpoint(junk)
    odd = tmp_path / "odd.pt"
    torch.save({"model": {"a.weight": torch.ones(2), "step": 3}}, odd)
    with pytest.raises(ValueError, match="'step' is a int"):
        load_meta_checkpoint(odd)
    monkeypatch.setitem(sys.modules, "torch", None)  # simulate torch not installed
    with pytest.raises(ImportError, match="needs torch"):
        load_meta_checkpoint(odd)
