"""The adaptation recipe (`AdaptConfig`, one frozen dataclass; every knob is a field) and the one error type."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

KINDS = ("embed", "lora")
TEACHERS = ("alias", "gt")

# LoRA target presets: fnmatch patterns over Dense module paths ("/"-joined param path without "kernel")
LORA_PRESETS = {
    # CLIP self-attention projections (the classic LoRA targets)
    "text": ("text_encoder/*/self_attn/q_proj", "text_encoder/*/self_attn/k_proj",
             "text_encoder/*/self_attn/v_proj", "text_encoder/*/self_attn/out_proj"),
    # ... plus the keys/values the fusion encoder and the decoder read from the prompt
    "text+fusion": ("text_encoder/*/self_attn/q_proj", "text_encoder/*/self_attn/k_proj",
                    "text_encoder/*/self_attn/v_proj", "text_encoder/*/self_attn/out_proj",
                    "detr_encoder/*/cross_attn/k_proj", "detr_encoder/*/cross_attn/v_proj",
                    "detr_decoder/*/text_cross_attn/k_proj", "detr_decoder/*/text_cross_attn/v_proj"),
}
# modules that read only the prompt, or the prompt inside detect: never the cached image side
PROMPT_SIDE = ("text_encoder/", "text_projection", "detr_encoder/layers_", "detr_decoder/layers_",
               "mask_decoder/prompt_cross_attn/")


class AdaptError(ValueError):
    """Bad adaptation input (one-line message): wrong run dir, adapter for another model, no alias, ..."""


LENGTH_NAMES = {"alias": -1, "label": 0}  # AdaptConfig.length by name (`jalias adapt --length`)


def parse_length(text: str) -> int:
    """"alias" -> -1, "label" -> 0, "N" -> N (AdaptConfig.length); AdaptError otherwise."""
    if text in LENGTH_NAMES:
        return LENGTH_NAMES[text]
    try:
        return int(text)
    except ValueError:
        raise AdaptError(f"--length must be label, alias or a number of rows, got {text!r}") from None


def length_name(length: int) -> str:
    """The inverse of `parse_length`."""
    return next((k for k, v in LENGTH_NAMES.items() if v == length), str(length))


@dataclass(frozen=True)
class AdaptConfig:
    """How an adapter is trained. The same optimiser, steps and loss code serve both teachers.

    kind: "embed" (learned embeddings that replace the label's tokens, used only when the prompt is exactly the
    label; `length` of them) or "lora" (low-rank updates W + scale * A @ B of the `targets` Dense kernels; base
    weights frozen).
    teacher: "alias" (distil the alias's outputs on the search images) or "gt" (the ground-truth masks).
    Loss (see `loss.image_loss`): w_query * query-logit BCE + w_presence * presence BCE + w_union * (BCE + dice
    of the soft union mask); the gt teacher has no per-query target, so its w_query is 0. For lora, w_preserve > 0
    adds a term that keeps other prompts' text features in place (less collateral damage on other words). For embed
    with the alias teacher, w_features > 0 adds the distance of the label's prompt features to the alias's (where
    the two prompts have the same length: `length=-1`); for lora, w_states > 0 adds the distance of the detector's
    query states and fused image tokens on each training image to the alias's.
    """

    kind: str = "embed"
    teacher: str = "alias"
    # embed only: how many learned rows replace the label: -1 = as many as the alias has tokens (the run's alias;
    # the label's count when there is none), 0 = one per label token, N > 0 = N. -1 with w_features 100 reached
    # 99.6-99.7% of the alias's held-out IoU where one row per label token reached 35-97% (benchmarks/RESULTS.md)
    length: int = -1
    steps: int = 200
    lr: float = 0.05  # embed; lora uses lr_lora
    lr_lora: float = 5e-3
    warmup: int = 10
    clip_norm: float = 1.0
    rank: int = 4
    alpha: float = 4.0  # LoRA scale = alpha / rank
    targets: str = "text"  # a LORA_PRESETS name or comma-separated fnmatch patterns
    w_query: float = 1.0
    w_presence: float = 1.0
    w_union: float = 1.0
    # embed with the alias teacher, when the adapted label's prompt has as many positions as the alias's (length
    # -1): w_features * the relative squared distance of its prompt features to the alias's
    w_features: float = 100.0
    # lora with the alias teacher: w_states * the relative squared distance, per training image, of the label's
    # decoder query states and fused image tokens to the alias's (they line up whatever the prompts' lengths).
    # 100 was chosen on 3 concepts (>= 90% of the alias on 2 of 3, 1 of 3 without) and reached 2 of 6 fresh ones
    # (0 of 6 without); the alias teacher then beat the gt teacher on 7 of 9 (2 of 9) (benchmarks/RESULTS.md)
    w_states: float = 100.0
    # lora only (an embed adapter never moves another prompt): > 0 also keeps `preserve_prompts` other prompts'
    # features in place (trainer.preserve_batch); 100 measured better than 10 and 0 (benchmarks/RESULTS.md)
    w_preserve: float = 100.0
    preserve_prompts: int = 64  # random common-word prompts
    preserve_neighbours: int = 32  # and prompts sharing a multi-token label's tokens (trainer.label_neighbours)
    # the prediction rule's keep threshold (alias teacher's masks, label IoU before / after); `jalias adapt` sets
    # it to the run's threshold (run.json), so the adapter learns the alias's masks as the search scored them
    threshold: float = 0.5
    remat: bool = True  # gradient checkpointing of each image's detect pass
    seed: int = 0  # LoRA init
    checkpoint_every_s: float = 30.0

    def validate(self) -> "AdaptConfig":
        if self.kind not in KINDS:
            raise AdaptError(f"adapter kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.teacher not in TEACHERS:
            raise AdaptError(f"teacher must be one of {', '.join(TEACHERS)}, got {self.teacher!r}")
        if self.steps < 0:
            raise AdaptError(f"steps must be >= 0, got {self.steps}")
        if not self.lr_for() > 0:
            raise AdaptError(f"learning rate must be > 0, got {self.lr_for()}")
        if not 0.0 <= self.threshold < 1.0:
            raise AdaptError(f"threshold must be in [0, 1), got {self.threshold}")
        if self.w_features < 0 or self.w_states < 0:
            raise AdaptError(f"w_features and w_states must be >= 0, got {self.w_features}, {self.w_states}")
        if self.w_preserve < 0 or self.preserve_prompts < 1 or self.preserve_neighbours < 0:
            raise AdaptError(f"need w_preserve >= 0, preserve_prompts >= 1 and preserve_neighbours >= 0, got "
                             f"{self.w_preserve}, {self.preserve_prompts}, {self.preserve_neighbours}")
        if self.length < -1 or self.length > 30:
            raise AdaptError(f"length must be -1 (the alias's), 0 (the label's) or 1..30 rows, got {self.length}")
        if self.kind == "lora" and self.rank < 1:
            raise AdaptError(f"LoRA rank must be >= 1, got {self.rank}")
        self.target_patterns()
        return self

    def lr_for(self) -> float:
        return self.lr if self.kind == "embed" else self.lr_lora

    def target_patterns(self) -> tuple[str, ...]:
        if self.targets in LORA_PRESETS:
            return LORA_PRESETS[self.targets]
        pats = tuple(p.strip() for p in self.targets.split(",") if p.strip())
        if not pats:
            raise AdaptError(f"no LoRA targets in {self.targets!r} (presets: {', '.join(LORA_PRESETS)})")
        return pats

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AdaptConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
