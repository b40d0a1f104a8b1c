"""The mask head's nearest-upsample-2x + 3x3 convolution, three ways, same process, interleaved rounds:

  plain     upsample the map, then a 3x3 convolution at the high resolution (the reference order);
  3x3 x 4O  one 3x3 convolution at the low resolution with 4 x O output channels (each output phase's folded 2x2
            kernel placed in the 3x3 window: 9 taps computed, 4 needed), then interleaved (jalias until 2026-12-07);
  shipped   jalias.model.heads.upsample2_conv3x3: per row phase one 2x2 convolution with 2 x O channels.

    PYTHONPATH=. python benchmarks/upsample_conv.py [--rounds 7] [--json PATH]

Prints the median seconds per call for each shape (batch, low-res side, channels) and the largest difference from
`plain`.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from jalias.atomic import write_json_atomic  # noqa: E402
from jalias.model.heads import upsample2_conv3x3  # noqa: E402

DN = ("NHWC", "HWIO", "NHWC")
SHAPES = [(128, 6, 32), (128, 12, 48), (128, 24, 48), (256, 8, 32), (256, 16, 32)]


def plain(x, k):
    up = jnp.repeat(jnp.repeat(x, 2, 1), 2, 2)
    return jax.lax.conv_general_dilated(up, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN)


def three_by_three_4o(x, k):
    b, h, w, c = x.shape
    o = k.shape[-1]
    rows = {0: (k[0], k[1] + k[2]), 1: (k[0] + k[1], k[2])}
    big = jnp.zeros((3, 3, c, 2, 2, o), k.dtype)
    for a in (0, 1):
        kr = jnp.stack(rows[a])
        for p in (0, 1):
            kk = jnp.stack((kr[:, 0], kr[:, 1] + kr[:, 2]) if p == 0 else (kr[:, 0] + kr[:, 1], kr[:, 2]), axis=1)
            big = big.at[a:a + 2, p:p + 2, :, a, p, :].set(kk)
    y = jax.lax.conv_general_dilated(x, big.reshape(3, 3, c, 4 * o), (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN)
    return y.reshape(b, h, w, 2, 2, o).transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, o)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    fns = {"plain": jax.jit(plain), "3x3 x 4O": jax.jit(three_by_three_4o), "shipped": jax.jit(upsample2_conv3x3)}
    rows = []
    for b, h, c in SHAPES:
        x = jax.random.normal(jax.random.key(0), (b, h, h, c))
        k = jax.random.normal(jax.random.key(1), (3, 3, c, c)) / np.sqrt(9 * c)
        ref = fns["plain"](x, k)
        diff = {n: float(jnp.abs(f(x, k) - ref).max()) for n, f in fns.items()}  # also compiles each
        times = {n: [] for n in fns}
        for _ in range(a.rounds):
            for n, f in fns.items():
                t = time.perf_counter()
                f(x, k).block_until_ready()
                times[n].append(time.perf_counter() - t)
        med = {n: float(np.median(v)) for n, v in times.items()}
        rows.append({"batch": b, "side": h, "channels": c, "seconds": med, "max_abs_diff_vs_plain": diff})
    print(f"upsample2 + conv3x3, median of {a.rounds} interleaved rounds ({platform.machine()}, "
          f"{jax.default_backend()}, {time.strftime('%Y-%m-%d')})")
    print(f"{'batch':>5} {'side':>4} {'ch':>3} " + " ".join(f"{n + ' s':>12}" for n in fns)
          + f" {'shipped vs 3x3x4O':>17} {'max |diff|':>10}")
    for r in rows:
        s = r["seconds"]
        print(f"{r['batch']:>5} {r['side']:>4} {r['channels']:>3} " + " ".join(f"{s[n]:>12.4f}" for n in fns)
              + f" {s['3x3 x 4O'] / s['shipped']:>16.2f}x {max(r['max_abs_diff_vs_plain'].values()):>10.1e}")
    out = {"rows": rows, "machine": platform.machine(), "backend": jax.default_backend(),
           "date": time.strftime("%Y-%m-%d"), "load_average": list(os.getloadavg())}
    if a.json:
        write_json_atomic(a.json, out)
    return out


if __name__ == "__main__":
    main()
