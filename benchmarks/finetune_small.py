"""Stage 2 of the small SAM3 (measured in benchmarks/RESULTS.md, not yet a `jalias train` option): fine-tune the
state `jalias train` leaves behind with IoU-aware query targets and the class loss on present phrases only.

    jalias train --out runs/train-small                           # stage 1: the default recipe, 6,000 steps
    PYTHONPATH=. python benchmarks/finetune_small.py runs/train-small/state 1500 runs/ft3
    # -> runs/ft3/final

Settings (exactly those of the measured run): lr 3e-4 constant (warmup 1), a fresh AdamW state,
class_target="iou", class_on_absent=False, no colour-only phase, the batch of step i = `sample_batch(..., 10000 + i)`
(batches stage 1 never drew). Deterministic like stage 1; not resumable (about 25 min on the 2-core box).
"""
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jalias.model.init import random_params  # noqa: E402
from jalias.train import batches as B  # noqa: E402
from jalias.train import loop  # noqa: E402
from jalias.train.config import CONFIGS, TrainConfig  # noqa: E402
from jalias.weights.convert import save_params  # noqa: E402


def main(state: str, steps: int, out: str) -> None:
    path = Path(state).absolute()
    meta = json.loads((path / "state.json").read_text())
    recipe = TrainConfig(**{k: v for k, v in meta["train"].items() if k in TrainConfig.__dataclass_fields__})
    cfg = CONFIGS[recipe.config]()
    like = random_params(cfg, 0)
    params, _, _, _ = loop.load_state(path, (like, loop.optimizer(recipe).init(like)), recipe)
    ft = replace(recipe, lr=3e-4, warmup=1, steps=steps, colour_only_steps=0, class_on_absent=False,
                 class_target="iou", final_lr_fraction=1.0)
    opt = loop.optimizer(ft)
    opt_state = opt.init(params)
    step_fn = loop.make_step(cfg, ft, opt)
    pool, reserved, t = B.build_pool(cfg, ft), B.reserved_tokens(), time.time()
    for i in range(steps):
        batch = {k: jnp.asarray(v) for k, v in B.sample_batch(pool, ft, 10000 + i, reserved).items()}
        params, opt_state, loss, parts = step_fn(params, opt_state, batch)
        loss = float(loss)
        if i % 100 == 0:
            print(i, round(loss, 3), {k: round(float(v), 3) for k, v in parts.items()}, f"{time.time() - t:.0f}s",
                  flush=True)
    dst = Path(out).absolute()
    loop.save_state(dst, params, opt_state, steps, ft, [])
    save_params(dst / "final", jax.tree_util.tree_map(np.asarray, params), cfg, dtype="bfloat16", overwrite=True)
    print(f"wrote {dst / 'final'}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
