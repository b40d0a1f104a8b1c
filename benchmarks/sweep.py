"""Throughput size sweep: jalias fp32 vs torch-opt at points around a base config, each point in this process
with both methods on the same weights, images and candidates, timed in interleaved rounds (throughput.py).

    PYTHONPATH=. python benchmarks/sweep.py [--quick] [--json benchmarks/out/sweep.json]

Base point: tiny-family config at 112 px, width 32, 16 queries, 4 images, 256 mutation candidates of 8 tokens.
Each row changes one factor: input 56-224 px, 8-32 queries, 1-8 images, random instead of shared-prefix
candidates. Target (issue 16): jalias >= 1.5x torch-opt at every point. Prints a table; --json writes every
point's full throughput report plus the table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import throughput  # noqa: E402

BASE = {"px": 112, "width": 32, "queries": 16, "images": 4, "kind": "mutations"}
POINTS = ([{"px": p} for p in (56, 112, 168, 224)] + [{"queries": q} for q in (8, 32)]
          + [{"images": k} for k in (1, 8)] + [{"kind": "random"}, {"px": 168, "width": 48, "queries": 12,
                                                                      "kind": "random", "length": 4}])


def argv_of(point: dict, candidates: int, repeats: int) -> list[str]:
    p = {**BASE, **point}
    return ["--config", "tiny", "--px", str(p["px"]), "--width", str(p["width"]), "--queries", str(p["queries"]),
            "--images", str(p["images"]), "--kind", p["kind"], "--length", str(p.get("length", 8)),
            "--candidates", str(candidates), "--repeats", str(repeats), "--skip", "torch-seed,jalias-bf16"]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="128 candidates, 3 rounds (default 256, 5)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    n, reps = (128, 3) if a.quick else (256, 5)
    rows = []
    for point in POINTS:
        p = {**BASE, **point}
        throughput.log(f"sweep point {p}")
        r = throughput.main(argv_of(point, n, reps))
        rows.append({"point": p, "jalias_cps": r["jalias_cps"], "torch_opt_cps": r["torch_opt_cps"],
                     "ratio": r["ratios"]["jalias_vs_torch_opt"], "chunk": r["chunk"],
                     "engine_mib_per_image": r["engine_bytes_per_image"] / 2**20,
                     "fpn_mib_per_image": r["fpn_bytes_per_image"] / 2**20,
                     "agreement": r["agreement"].get("jalias_vs_torch_opt"), "load_average": r["load_average"],
                     "report": r})
    print(f"\nsweep ({n} candidates, {reps} interleaved rounds per point; {platform.machine()}, "
          f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')})")
    print(f"{'px':>4} {'width':>5} {'queries':>7} {'images':>6} {'candidates':>10} {'jalias/s':>9} "
          f"{'torch-opt/s':>11} {'ratio':>6} {'>=1.5x':>6} {'MiB/img':>7} {'load':>5}")
    for r in rows:
        p = r["point"]
        print(f"{p['px']:>4} {p['width']:>5} {p['queries']:>7} {p['images']:>6} {p['kind']:>10} "
              f"{r['jalias_cps']:>9.0f} {r['torch_opt_cps']:>11.0f} {r['ratio']:>5.2f}x "
              f"{'yes' if r['ratio'] >= 1.5 else 'NO':>6} {r['engine_mib_per_image']:>7.2f} {r['load_average']:>5.1f}")
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d"),
           "candidates": n, "rounds": reps, "points": rows,
           "all_at_least_1_5x": all(r["ratio"] >= 1.5 for r in rows)}
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=1, default=float))
    return res


if __name__ == "__main__":
    main()
