"""Shortest text bucket: exact scoring of 4-token candidates with prompts cut after the longest END (rounded up to
8 positions, the default) vs the whole 32-token context, same engine otherwise, same process, interleaved rounds.

    PYTHONPATH=. python benchmarks/text_bucket.py [--weights weights/small] [--rounds 5] [--json PATH]

Prints evaluations/s per setting, the ratio, and checks that both give the same IoUs.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from jalias.atomic import write_json_atomic  # noqa: E402
from jalias.data import world  # noqa: E402
from jalias.engine import Engine  # noqa: E402
from jalias.train.evaluate import concept_images  # noqa: E402
from jalias.weights import load  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default="weights/small")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--candidates", type=int, default=256)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    model = load(a.weights, dtype="float32")
    images, masks = concept_images(world.OOD_BY_NAME["heart"], 6, model.config.image_size)
    engines = {name: Engine(model, images, masks, chunk_size=64, prefix_cache=False, text_bucket=b)
               for name, b in (("bucket 8", 8), ("full 32", 0))}
    ids = np.random.default_rng(0).integers(0, 49406, (a.candidates, 4)).astype(np.int32)
    ref = {n: e.score(ids) for n, e in engines.items()}  # also compiles
    same = float(np.abs(ref["bucket 8"] - ref["full 32"]).max())
    times = {n: [] for n in engines}
    for _ in range(a.rounds):
        for n, e in engines.items():
            t = time.perf_counter()
            e.score(ids)
            times[n].append(time.perf_counter() - t)
    evals = a.candidates * len(images)
    rate = {n: evals / float(np.median(t)) for n, t in times.items()}
    res = {"machine": f"{platform.machine()} {platform.node()}", "date": time.strftime("%Y-%m-%d"),
           "weights": a.weights, "candidates": a.candidates, "images": len(images), "rounds": a.rounds,
           "evals_per_s": rate, "ratio": rate["bucket 8"] / rate["full 32"], "max_abs_iou_diff": same}
    print(f"{'setting':10s} {'evals/s':>10s}")
    for n, r in rate.items():
        print(f"{n:10s} {r:10.0f}")
    print(f"ratio {res['ratio']:.2f}x; max |IoU diff| {same:.2g}")
    if a.json:
        write_json_atomic(a.json, res)
    return res


if __name__ == "__main__":
    main()
