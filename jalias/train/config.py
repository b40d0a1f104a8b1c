"""The small SAM3 the project trains, and the training recipe (frozen dataclasses; every knob is a field)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from ..model.config import (MaskDecoderConfig, Sam3Config, TextConfig, TransformerConfig, ViTConfig, VisionConfig,
                            tiny_config)


def small_config(image_size: int = 112, width: int = 64, text_width: int = 64, queries: int = 16) -> Sam3Config:
    """Every SAM3 stage at small size: ViT (4 layers, windowed + global, RoPE) + FPN neck, CLIP text encoder over
    the real 49,408-token BPE vocabulary, DETR fusion encoder, decoder with presence token, mask head."""
    return Sam3Config(
        vision=VisionConfig(
            backbone=ViTConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=4,
                               num_attention_heads=4, image_size=image_size, patch_size=14, window_size=4,
                               global_attn_indexes=(1, 3), pretrain_image_size=image_size),
            fpn_hidden_size=width),
        text=TextConfig(hidden_size=text_width, intermediate_size=4 * text_width, num_hidden_layers=3,
                        num_attention_heads=4, projection_dim=text_width),
        encoder=TransformerConfig(hidden_size=width, num_layers=2, num_attention_heads=4,
                                  intermediate_size=4 * width),
        decoder=TransformerConfig(hidden_size=width, num_layers=3, num_attention_heads=4,
                                  intermediate_size=4 * width, num_queries=queries),
        mask_decoder=MaskDecoderConfig(hidden_size=width, num_attention_heads=4),
    )


CONFIGS = {"small": small_config, "tiny": tiny_config}  # tiny: for tests (56 px, width 32)


@dataclass(frozen=True)
class TrainConfig:
    """Training recipe: stage 1 (`steps`), then stage 2 (`stage2_steps`). The batch of step i is a pure function
    of (seed, i), so a resumed run equals an uninterrupted one.

    Stage 1 learns to localise and to tell present from absent phrases, but its query scores stay low (with the
    queries collapsed, as before the three settings below: the top query's sigmoid ~0.04 after 6,000 steps; with
    them, the rule's ID IoU is ~0.3 at the end of stage 1, on a subset). Stage 2 grounds
    them: a fresh AdamW at the constant `stage2_lr`, IoU-aware query targets (`class_target="iou"`), the class
    loss on present phrases only (absent phrases are left to the presence token), no colour-only phase, and
    batches `sample_batch(..., stage2_batch_offset + i)` that stage 1 never drew (benchmarks/RESULTS.md).

    Three settings keep the decoder's 16 queries apart (without them they collapse into one query: every query
    gives the same mask and score, benchmarks/RESULTS.md): step 0 starts from `train.init.initial_params`, whose
    decoder box position bias is a box-locality prior of strength `rpb_locality`; the matching cost holds an
    anchor term (`w_anchor`, loss.match_costs); the decoder learns at `decoder_lr_scale` x the learning rate (at
    the full rate its vision cross-attention outputs grow until they drown each query's own state)."""

    config: str = "small"  # a name in CONFIGS
    steps: int = 6000
    images_per_step: int = 8
    prompts_per_image: int = 4  # half positive phrases, half absent phrases / random tokens
    pool_size: int = 12_000  # distinct training images: training_scene(seed, 0..pool_size-1), rendered on first use
    lr: float = 1e-3
    warmup: int = 100
    final_lr_fraction: float = 0.1  # cosine decay to lr * this
    decoder_lr_scale: float = 0.1  # the DETR decoder's learning rate is lr x this
    weight_decay: float = 1e-4  # not on the token table: words never seen keep their initial embeddings
    clip_norm: float = 1.0
    seed: int = 0
    colour_only_steps: int = 800  # curriculum: the first steps' phrases are colour words only (see below)
    random_token_negatives: float = 0.15  # fraction of negative prompts that are 1-4 random tokens
    class_on_absent: bool = True  # push every query score to 0 for absent phrases too (False: presence alone does)
    class_target: str = "matched"  # "matched": DETR 0/1 after matching | "iou": IoU-aware (loss.query_quality)
    w_class: float = 2.0
    w_presence: float = 1.0
    w_mask_bce: float = 5.0
    w_dice: float = 2.0
    w_box: float = 2.0
    w_semantic: float = 5.0
    w_anchor: float = 5.0  # matching cost: L1 of a query's reference-box centre to the target's centre
    rpb_locality: float = 8.0  # > 0: start the decoder's box position bias as a box-locality prior (train.init)
    checkpoint_every_s: float = 180.0
    stage2_steps: int = 1500  # 0: stage 1 only
    stage2_lr: float = 3e-4
    stage2_batch_offset: int = 10_000

    @property
    def total_steps(self) -> int:
        return self.steps + self.stage2_steps

    def stage2(self) -> "TrainConfig":
        """The recipe stage 2 runs under (optimizer, loss, batch sampling read it like stage 1 reads self)."""
        return replace(self, lr=self.stage2_lr, warmup=1, steps=self.stage2_steps, final_lr_fraction=1.0,
                       colour_only_steps=0, class_on_absent=False, class_target="iou", stage2_steps=0)

    def stage_at(self, step: int) -> tuple[int, int]:
        """(stage: 0 = stage 1, 1 = stage 2; batch index) of global step `step` (0-based)."""
        if step < self.steps:
            return 0, step
        return 1, self.stage2_batch_offset + step - self.steps

    def to_dict(self) -> dict:
        return asdict(self)

