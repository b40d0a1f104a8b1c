"""The fusion encoder's image self-attention on a CPU: jalias's blocked online softmax (`layers.attend_blocked`, what
`attend` runs for T x S >= 2^22) against torch's `scaled_dot_product_attention`, same inputs, interleaved rounds.

    PYTHONPATH=. python benchmarks/attention_cpu.py [--rows 8] [--tokens 5184] [--heads 1] [--head-dim 32]
        [--blocks 324x648,1296x324] [--rounds 7] [--torch-threads 2] [--json PATH]

SAM3's fusion encoder attends over its 72 x 72 = 5,184 image tokens in every layer (8 heads of 32 at full size; the
throughput benchmark's mid config has 1 head of 32); `--rows` is candidates x images in one batch. Prints the median
seconds per call of each block-size choice and of torch, and their ratio; checks the outputs agree. Run it alone:
on a shared 2-core machine the medians move with the load. XLA_FLAGS set outside apply to jalias's rows.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from jalias.atomic import write_json_atomic
from jalias.model.layers import attend_blocked


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=5184)
    ap.add_argument("--heads", type=int, default=1)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--blocks", default="324x648,1296x324", help="query x key block sizes, comma-separated")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--torch-threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.torch_threads)
    shape = (a.rows, a.tokens, a.heads, a.head_dim)
    q, k, v = (np.random.default_rng(i).normal(size=shape).astype(np.float32) for i in range(3))
    jq, jk, jv = map(jnp.asarray, (q, k, v))
    blocks = [tuple(int(x) for x in b.split("x")) for b in a.blocks.split(",")]
    fns = {f"jalias {qb}x{kb}": jax.jit(lambda x, y, z, qb=qb, kb=kb: attend_blocked(x, y, z, None, qb, kb))
           for qb, kb in blocks}
    tq, tk, tv = (torch.from_numpy(x).permute(0, 2, 1, 3).contiguous() for x in (q, k, v))

    def torch_sdpa():
        with torch.inference_mode():
            return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)

    ref = torch_sdpa().permute(0, 2, 1, 3).numpy()
    err = {name: float(np.abs(np.asarray(f(jq, jk, jv)) - ref).max()) for name, f in fns.items()}  # compiles
    runs = {**{name: (lambda f=f: f(jq, jk, jv).block_until_ready()) for name, f in fns.items()},
            "torch sdpa": torch_sdpa}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(a.rounds):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    base = float(np.median(times["torch sdpa"]))
    rows = [{"method": name, "median_s": float(np.median(t)), "min_s": float(min(t)),
             "vs_torch": base / float(np.median(t)), "max_abs_diff": err.get(name, 0.0)} for name, t in times.items()]
    print(f"attention [{a.rows} rows, {a.tokens} x {a.tokens} tokens, {a.heads} x {a.head_dim}], "
          f"{a.rounds} interleaved rounds, torch {a.torch_threads} threads, load {os.getloadavg()[0]:.1f}")
    print("| method | median s | min s | speed vs torch | max abs diff vs torch |\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['vs_torch']:.2f}x | "
              f"{r['max_abs_diff']:.1e} |")
    res = {"shape": shape, "rounds": a.rounds, "torch_threads": a.torch_threads, "rows": rows,
           "xla_flags": os.environ.get("XLA_FLAGS", ""), "machine": platform.machine(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if a.json:
        write_json_atomic(a.json, res)
    return res


if __name__ == "__main__":
    main()
