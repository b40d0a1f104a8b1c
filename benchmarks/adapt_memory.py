"""What `jalias adapt`'s training step needs at SAM3's real size: XLA's compiled memory plan of the step, without
real weights or a GPU (the step is lowered and compiled on zero-filled arrays of the real shapes, never run).

    PYTHONPATH=. python benchmarks/adapt_memory.py [--config full|mid] [--images 10] [--kinds embed,lora]
        [--dtype bfloat16] [--json PATH]

Per adapter kind (the alias teacher, `AdaptConfig()` defaults: remat on, a lora's preservation prompts and
detector-state targets included): bytes of the adapter's params + Adam state, and from
`compiled.memory_analysis()` the arguments (base weights, K image contexts, targets), outputs, temporaries and
the bytes the outputs alias onto donated inputs; "peak" = arguments + outputs + temporaries - aliased. This is
the CPU backend's plan: a GPU's fusion differs, so take it as the size of the job, not a GPU measurement.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.throughput import get_config  # noqa: E402
from jalias.adapt import AdaptConfig  # noqa: E402
from jalias.adapt.loss import Targets  # noqa: E402
from jalias.adapt.trainer import (embed_length, feature_args, fresh_params, label_layout, make_step,  # noqa: E402
                                  optimizer, preserve_batch)
from jalias.atomic import write_json_atomic  # noqa: E402
from jalias.model.sam3 import Sam3  # noqa: E402
from jalias.model.shapes import param_shapes  # noqa: E402

GIB = 2 ** 30
LABEL, ALIAS_LENGTH = [1929, 3144], 4  # a two-token label ("heart shape"-like), a 4-token alias


def zeros_model(cfg, dtype: str) -> Sam3:
    params: dict = {}
    for path, shape in param_shapes(cfg).items():
        node = params
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = np.zeros(shape, dtype)
    return Sam3(cfg, params, dtype=dtype)


def plan(model: Sam3, kind: str, k: int) -> dict:
    cfg = AdaptConfig(kind=kind)
    s = model.config.image_size
    one = jax.eval_shape(lambda p, x: model.apply("encode_image", x, params=p), model.params,
                         jax.ShapeDtypeStruct((1, 3, s, s), jnp.float32))
    ctx = jax.tree_util.tree_map(lambda a: jnp.zeros((k, *a.shape[1:]), a.dtype), one)
    q, d = model.config.decoder.num_queries, model.config.decoder.hidden_size
    m, g = 4 * model.config.vision.backbone.grid, model.config.vision.backbone.grid
    states = {"hidden": np.zeros((k, q, d), np.float32), "enc": np.zeros((k, g * g, d), np.float32)}
    targets = Targets(ctx, np.zeros((k, q), np.float32), np.zeros(k, np.float32), np.zeros((k, m, m), np.float32),
                      np.ones(3, np.float32), "alias", states=states if kind == "lora" else None)
    length = embed_length(cfg, LABEL, ALIAS_LENGTH) if kind == "embed" else None
    params, _ = fresh_params(model, cfg, LABEL, length)
    opt_state = optimizer(cfg).init(params)
    ids, mask, dmask = label_layout(model, LABEL, length)
    args = (params, opt_state, model.params, ids, mask, dmask, ctx, targets.arrays(), jnp.asarray(targets.weights),
            preserve_batch(model, cfg, LABEL), feature_args(model, cfg, targets, ids, mask))
    t0 = time.perf_counter()
    compiled = make_step(model, cfg, LABEL).step.lower(*args).compile()
    mem = compiled.memory_analysis()
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    own = sum(x.nbytes for x in jax.tree_util.tree_leaves((params, opt_state)))
    return {"kind": kind, "images": k, "adapter_and_adam_mib": own / 2 ** 20,
            "arguments_gib": mem.argument_size_in_bytes / GIB, "outputs_gib": mem.output_size_in_bytes / GIB,
            "temp_gib": mem.temp_size_in_bytes / GIB, "aliased_gib": mem.alias_size_in_bytes / GIB,
            "peak_gib": peak / GIB, "compile_s": time.perf_counter() - t0}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="full", choices=["full", "mid"])
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--kinds", default="embed,lora")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    model = zeros_model(get_config(a.config), a.dtype)
    rows = [plan(model, kind, a.images) for kind in a.kinds.split(",")]
    print(f"adapter training step, {a.config} config, {a.dtype} base weights, {a.images} training images "
          f"(XLA CPU memory plan)")
    print("| kind | adapter + Adam MiB | arguments GiB | temporaries GiB | peak GiB | compile s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['kind']} | {r['adapter_and_adam_mib']:.2f} | {r['arguments_gib']:.2f} | {r['temp_gib']:.2f} | "
              f"{r['peak_gib']:.2f} | {r['compile_s']:.0f} |")
    if a.json:
        write_json_atomic(a.json, {"config": a.config, "dtype": a.dtype, "rows": rows, "machine": platform.machine(),
                                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
    return rows


if __name__ == "__main__":
    main()
