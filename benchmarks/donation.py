"""What buffer donation saves in `jalias train`'s step: XLA's compiled memory plan with and without donating the
params and AdamW state (`jax.jit(step, donate_argnums=(0, 1))`, `jalias.train.loop.make_step`).

    PYTHONPATH=. python benchmarks/donation.py [--configs tiny,small] [--json PATH]

Per model config: the bytes of params + optimiser state, and from `compiled.memory_analysis()` the arguments,
outputs, temporaries and the bytes outputs alias onto donated inputs; "peak" is arguments + outputs + temporaries
- aliased (the memory the step needs while it runs). No timing: donation changes where results are written, not
the arithmetic.
"""
from __future__ import annotations

import argparse
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from jalias.atomic import write_json_atomic  # noqa: E402
from jalias.model.init import random_params  # noqa: E402
from jalias.train import TrainConfig, batches, loop  # noqa: E402
from jalias.train.config import CONFIGS  # noqa: E402

MIB = 2 ** 20


def plan(name: str) -> dict:
    cfg = CONFIGS[name]()
    tc = TrainConfig(config=name)
    pool = batches.build_pool(cfg, tc, n=tc.images_per_step)
    batch = {k: jnp.asarray(v) for k, v in batches.sample_batch(pool, tc, 0, batches.reserved_tokens()).items()}
    params = jax.tree_util.tree_map(jnp.asarray, random_params(cfg, 0))
    state = loop.optimizer(tc).init(params)
    donated = loop.make_step(cfg, tc, loop.optimizer(tc))
    plain = jax.jit(donated.__wrapped__)  # the same step function, nothing donated
    row = {"config": name, "params_and_state_mib": sum(x.nbytes for x in jax.tree_util.tree_leaves((params, state)))
           / MIB}
    for label, fn in (("plain", plain), ("donated", donated)):
        m = fn.lower(params, state, batch).compile().memory_analysis()
        peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
        row[label] = {"arguments_mib": m.argument_size_in_bytes / MIB, "outputs_mib": m.output_size_in_bytes / MIB,
                      "temp_mib": m.temp_size_in_bytes / MIB, "aliased_mib": m.alias_size_in_bytes / MIB,
                      "peak_mib": peak / MIB}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="tiny,small")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rows = [plan(n) for n in a.configs.split(",")]
    print("| config | params + AdamW MiB | peak without donation MiB | peak with donation MiB | aliased MiB |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['config']} (batch {TrainConfig().images_per_step} images x {TrainConfig().prompts_per_image} "
              f"prompts) | {r['params_and_state_mib']:.1f} | {r['plain']['peak_mib']:.1f} | "
              f"{r['donated']['peak_mib']:.1f} | {r['donated']['aliased_mib']:.1f} |")
    if a.json:
        write_json_atomic(a.json, {"machine": f"{platform.machine()} {jax.default_backend()}, jax {jax.__version__}",
                                   "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "rows": rows})


if __name__ == "__main__":
    main()
