"""Train, then write the result as a jalias checkpoint with its measured skill (what `jalias train` runs).

    from jalias.train.checkpoint import train_checkpoint
    card = train_checkpoint(TrainConfig(), out="runs/train-small")   # -> out/final, out/metrics.json

out/final is an ordinary jalias checkpoint (Orbax params + config.json + jalias.json, stored in bfloat16 by
default), loadable with `jalias.weights.load` and by every command's --weights. out/metrics.json holds the recipe,
the wall time, the machine and `evaluate.skill` on evaluation images (never training images).
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Callable

from ..atomic import check_out_folder, write_json_atomic
from .config import CONFIGS, TrainConfig
from .loop import train


def machine() -> str:
    import jax

    dev = jax.devices()[0]
    return f"{platform.machine()} {os.cpu_count()} cores, jax {jax.__version__} on {dev.platform}"


def train_checkpoint(recipe: TrainConfig = TrainConfig(), out: str | os.PathLike = "runs/train-small",
                     resume: bool = False, progress: bool = True, dtype: str = "bfloat16", eval_images: int = 8,
                     log: Callable[[str], None] = print) -> dict:
    """Train (or resume) per `recipe`, save out/final and out/metrics.json; returns the metrics dict."""
    from ..weights.convert import load, save_params
    from .evaluate import skill

    if eval_images < 1:  # checked before training, not after it
        raise ValueError(f"eval-images must be >= 1, got {eval_images}")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    check_out_folder(out)
    t0 = time.time()
    result = train(recipe, out=out, resume=resume, progress=progress, log=log)
    out = Path(out).expanduser().absolute()
    if result.step < recipe.total_steps:  # interrupted: the state is saved, nothing else is written
        raise KeyboardInterrupt
    cfg = CONFIGS[recipe.config]()
    meta = save_params(out / "final", result.params, cfg, dtype=dtype, overwrite=True)
    model = load(out / "final", dtype="float32")  # skill of what ships (bf16-rounded), not of the float32 params
    log("measuring skill on evaluation images ...")
    metrics = {"recipe": recipe.to_dict(), "steps": result.step, "train_seconds_this_call": round(result.seconds, 1),
               "wall_seconds_this_call": round(time.time() - t0, 1), "machine": machine(),
               "loss_per_100_steps": result.losses, "fingerprint": meta["fingerprint"], "dtype": dtype,
               "param_count": meta["param_count"], "skill": skill(model, n_images=eval_images)}
    write_json_atomic(out / "metrics.json", metrics)
    return metrics
