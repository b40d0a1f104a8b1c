"""Adapters that make the natural label do what a found alias does (alias teacher) or what the ground truth
says (gt teacher): `embed` (replacement embeddings for the label's tokens) and `lora` (low-rank text-side
updates). Layer: imports model, engine, data; `jalias.run` and the CLI import it.

    from jalias.adapt import AdaptConfig, train_adapter, save_adapter, load_adapters, apply_adapters
    adapted = apply_adapters(model, load_adapters("runs/x/adapters/embed-alias"))   # a Sam3: engines, predict, export
    jalias.adapt("runs/x", kind="embed", teacher="alias")                 # the module is callable: adapt_run
"""

from .adapters import Adapter, AdaptedSam3, apply_adapters, expand_label, model_fingerprint, slot_lookup
from .config import KINDS, LORA_PRESETS, TEACHERS, AdaptConfig, AdaptError
from .loss import Targets, alias_targets, gt_targets, image_contexts, image_loss, teacher_outputs
from .store import load, load_adapter, load_adapters, read_card, save_adapter
from .trainer import make_step, train_adapter

__all__ = ["Adapter", "AdaptedSam3", "AdaptConfig", "AdaptError", "KINDS", "LORA_PRESETS", "TEACHERS", "Targets",
           "alias_targets", "apply_adapters", "expand_label", "gt_targets", "image_contexts", "image_loss", "load",
           "load_adapter", "load_adapters", "make_step", "model_fingerprint", "read_card", "save_adapter",
           "slot_lookup", "teacher_outputs", "train_adapter"]

# `jalias.adapt(run_dir, ...)` calls jalias.run.adapt.adapt_run (the top-level package owns that indirection)
import sys as _sys  # noqa: E402

from jalias import _CallableAdapt  # noqa: E402

_sys.modules[__name__].__class__ = _CallableAdapt
