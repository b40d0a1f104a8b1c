"""Engine chunk size vs speed on this machine: the same candidates scored with several `chunk_size`s, interleaved.

    PYTHONPATH=. python benchmarks/chunk_size.py [--px 168 --width 48 --queries 12] [--chunks 32 64 128 256 1024]

Each chunk size gets its own Engine over the same calibrated weights (throughput.py's `calibrated_params`), images
and candidates; one pass of each per round, median over rounds. Prints evaluations/s per chunk size and the auto
choice; `--json PATH` writes them. What `Engine`'s CPU cap (`engine.CPU_CHUNK`) is based on.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from throughput import calibrated_params, get_config, make_candidates, make_images  # noqa: E402

from jalias.engine import Engine  # noqa: E402
from jalias.engine.scoring import layout_prompts  # noqa: E402
from jalias.model.preprocess import preprocess  # noqa: E402
from jalias.model.sam3 import Sam3  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--px", type=int, default=56)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--candidates", type=int, default=1024)
    ap.add_argument("--length", type=int, default=4)
    ap.add_argument("--kind", default="random", choices=["random", "mutations"])
    ap.add_argument("--chunks", type=int, nargs="+", default=[32, 64, 128, 256, 1024])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    cfg = get_config("tiny", a.px, a.width, a.queries)
    images, gts = make_images(a.images, 64, 0)
    px = np.concatenate([preprocess(im, cfg.image_size) for im in images])
    cand = make_candidates(a.candidates, a.length, 1, a.kind)
    ids, mask = layout_prompts(cand, cfg.context_length)
    model = Sam3(cfg, calibrated_params(cfg, 0, px, ids[:2], mask[:2]))
    auto = Engine(model, images, gts, compilation_cache=False).chunk_size
    engines = {c: Engine(model, images, gts, chunk_size=c, compilation_cache=False) for c in a.chunks}
    ref, agree = None, {}
    for c, e in engines.items():  # warmup (compiles) and agreement with the first chunk size (float rounding of
        got = e.score(cand)       # other batch shapes can flip a pixel at a mask's edge)
        ref = got if ref is None else ref
        agree[str(c)] = {"exact": float((got == ref).mean()), "max_abs_diff": float(np.abs(got - ref).max())}
    times = {c: [] for c in engines}
    for _ in range(a.rounds):
        for c, e in engines.items():
            t = time.perf_counter()
            e.score(cand)
            times[c].append(time.perf_counter() - t)
    evals = len(cand) * len(images)
    rate = {c: evals / float(np.median(t)) for c, t in times.items()}
    best = max(rate, key=rate.get)
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d"),
           "load_average": os.getloadavg()[0], "px": a.px, "width": a.width, "queries": a.queries,
           "images": len(images), "candidates": len(cand), "evals_per_s": {str(c): r for c, r in rate.items()},
           "auto_chunk": auto, "best_chunk": best, "agreement_with_first": agree}
    print(f"px {a.px}, width {a.width}, {a.queries} queries, {len(images)} images, {len(cand)} candidates; "
          f"auto chunk {auto}; load {res['load_average']:.1f}")
    for c, r in rate.items():
        print(f"chunk {c:5d}: {r:9.0f} evals/s  ({r / rate[best]:.2f} of the best); IoUs equal to chunk "
              f"{a.chunks[0]}'s on {agree[str(c)]['exact']:.1%} of pairs")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
