"""Search quality on planted-alias problems: best IoU vs evaluations, per method, against a known answer.

Each problem is `jalias.data.planted.make_planted(seed, kind=...)`: a calibrated tiny SAM3, synthetic images of
one concept, and as ground truth the masks of a hidden 4-token sequence (which scores IoU 1.0 by construction).
`--kind direction` (default) plants a graded concept direction whose best sequence is the hidden one; `--kind
random` is the unstructured control (see the module's docstring). Every method (evolution with two tuned halving
settings and as in the original code, local, gcg, soft) runs with the same budget, seeds and vocabulary (the
problem's `allowed_vocab`, given to every method as `allowed_tokens`). Reported:

* best train IoU (mean over the search images) at each budget of the ladder, mean over problems x seeds;
* held-out IoU of each run's best sequence (an Engine over the problem's held-out images);
* evaluations to 0.9: where a run's history first reaches train IoU >= 0.9 (median over runs, "not reached"
  when fewer than half of the runs reach it), and the issue's target: the best method reaches 0.9 with at most
  1/10 of the evaluations the fastest evolution row needs (or evolution does not reach it within 10x that);
* baselines: the concept's natural label and random sequences from the same vocabulary.

Budgets: every method runs until its budget is spent and is deterministic for its seed, so a run with the largest
budget contains the runs with the smaller budgets as prefixes; the best IoU at budget B is read from its history
(best fully scored candidate with evals <= B). One run per (problem, seed, method) therefore serves the ladder.

    PYTHONPATH=. python benchmarks/planted.py --quick --json planted.json --out bench_out
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from jalias.atomic import write_json_atomic  # noqa: E402
from jalias.data.planted import KINDS, make_planted  # noqa: E402
from jalias.engine import Engine  # noqa: E402
from jalias.search import METHODS, HalvingConfig, run_search  # noqa: E402
from jalias.search.defaults import MEASURED  # noqa: E402
from jalias.tokenizer import detokenize  # noqa: E402

THRESHOLD = 0.9
TARGET_FACTOR = 10
N_RANDOM = 64  # random sequences per problem for the random baseline

# Per-method settings, the same for every budget and problem, each the best of a small sweep on development
# problems (the "direction" kind, seeds 0-2; the reported problems are seeds 10+; budget 30k; evaluations to
# train IoU 0.9 per seed, "-" = not reached):
#   evolution population 16 / 50 / 8 / 16+halving / 32+halving: -,-,- / -,.,. / -,.,. / -,-,. / 19336,-,3892;
#   local n_candidates 64+halving(eta 2) / 64+halving(eta 4) / 256+halving(eta 4): -,.,. / -,-,14152 / -,-,-;
#   gcg (width, topk) 64,32 / 64,32+halving / 128,64+halving / 64,64+halving / 32,16 / 64,32 keep_if_better:
#       2120,-,4184 / 1586,2584,2188 / 4894,-,3776 / 1804,11760,3800 / 2104,-,1408 / 2120,-,4184;
#   gcg 64,32+halving with restarts after 10 / 20 stale steps (seeds 0-5): evaluations to 0.9 unchanged, best IoU
#       at 30k .955/.969 vs .943 without (mean of 6 seeds), so patience 20.
# Second sweep (session 3), seeds 0-9 x search seeds 0-2 (30 runs, budget 20k; median evaluations to 0.9, runs
# reaching it, geometric mean with "not reached" counted as 40k):
#   gcg topk 32 + halving(2 images, eta 4) [the previous setting]: 2,584, 24/30, 3,790;
#   topk 64: 2,902, 25/30, 3,831;  topk 64 + halving(1 image, eta 8): 2,204, 27/30, 2,700 [chosen];
#   topk 32 + halving(1 image, eta 8) (12 runs): no better than topk 32 with 2 images (2,360 vs 2,382, 9/12 vs 11/12);
#   width 128 / topk 64 / halving(1, eta 8), width 32 / topk 16, patience 10, restarts from the best with 1-2
#   tokens re-drawn, a minimum relative gain for patience, and single swaps enumerated in gradient order
#   (keep-if-better): none better. From near-miss starts (IoU 0.84-0.9, seeds 0-3, 26 runs) topk 64 needs 894
#   evaluations to 0.9 (median) vs 1,194 for topk 32: near the top the few improving swaps have gradient ranks
#   ~80-600 of 2,000 (9 of 8,000 single swaps at one measured point), mostly beyond a top-32.
#   evolution 32 + halving(1 image, eta 8) vs (2 images, eta 4), seeds 0-6 at 60k: 12,878 vs 19,336 median, so both
#   evolution rows are kept and the target is judged against the faster one.
# ("." = not run). "evolution-original" is the original research code's setting (population 50, no halving), kept
# as a third baseline.
# Halving: score on 1 or 2 images first and pass the best 1/eta on to all 8 images.
HALVING8 = dict(mode="on", min_images=1, eta=8.0)
SETTINGS = {  # name -> (search method, its settings); the methods' own rows ARE the defaults users get
    "evolution": ("evolution", MEASURED["evolution"]),
    "evolution-1img": ("evolution", dict(population=32, generations=None, halving=HALVING8)),
    "evolution-original": ("evolution", dict(population=50, generations=None)),
    "local": ("local", MEASURED["local"]),
    "gcg": ("gcg", MEASURED["gcg"]),
    "soft": ("soft", MEASURED["soft"]),
}



def plain_settings(settings: dict) -> dict:
    """SETTINGS as plain JSON types (the measured rows are read-only mappings)."""
    return {k: [m, json.loads(json.dumps(dict(v)))] for k, (m, v) in settings.items()}


PRESETS = {
    "quick": dict(problems=[10, 11], seeds=[0], budgets=[1000, 2500, 5000, 10000, 25000]),
    "full": dict(problems=[10, 11, 12, 13, 14, 15], seeds=[0, 1], budgets=[1000, 2500, 5000, 10000, 25000, 50000]),
}


# --------------------------------------------------------------------------------------------------------------
def method_config(row: str, **common):
    """(search method, its config) for a SETTINGS row, with the run's common fields (length, budget, seed, ...)."""
    method, settings = SETTINGS[row][0], dict(SETTINGS[row][1])
    if "halving" in settings:
        settings["halving"] = HalvingConfig(**settings["halving"])
    return method, METHODS[method].config_cls(**common, **settings)


def first_reach(history, threshold: float = THRESHOLD):
    """Evaluations at which a history [(evals, best_objective, best_train_iou)] first has train IoU >= threshold
    (None if never)."""
    for evals, _, tr in history:
        if tr >= threshold:
            return int(evals)
    return None


def improvements(history) -> list[list]:
    """The history entries where the best objective changes (and the last one): enough for best_at/first_reach."""
    out = []
    for i, (e, o, tr) in enumerate(history):
        if not out or o != out[-1][1] or tr != out[-1][2] or i == len(history) - 1:
            out.append([int(e), float(o), float(tr)])
    return out


def best_at(history, budget: int) -> float:
    """Best train IoU among history entries with evals <= budget (0.0 before the first fully scored candidate)."""
    best = 0.0
    for evals, _, tr in history:
        if evals > budget:
            break
        best = max(best, tr)
    return float(best)


def median_or_none(values: list):
    """Median of per-run values where None means 'not reached' (counted as +inf); None if the median run did not
    reach it."""
    v = sorted(math.inf if x is None else x for x in values)
    if not v:
        return None
    m = float(np.median(v)) if len(v) % 2 else 0.5 * (v[len(v) // 2 - 1] + v[len(v) // 2])
    return None if math.isinf(m) else m


def run_problem(p: int, seeds: list[int], budget: int, methods: list[str], log, kind: str = "direction") -> dict:
    """All methods x seeds on planted problem `p`. Returns a JSON-able dict of baselines and runs."""
    t0 = time.perf_counter()
    prob = make_planted(p, kind=kind)
    search = Engine(prob.model, prob.search_images, prob.search_masks)
    held = Engine(prob.model, prob.heldout_images, prob.heldout_masks)
    rng = np.random.default_rng([p, 99])
    random_ids = prob.allowed_vocab[rng.integers(prob.allowed_vocab.size, size=(N_RANDOM, len(prob.hidden_ids)))]
    rand_search = search.score(random_ids).mean(1)
    out = {
        "problem": p, "kind": kind, "label": prob.label, "hidden": prob.hidden_ids.tolist(),
        "hidden_text": detokenize(prob.hidden_ids), "vocab_size": int(prob.allowed_vocab.size),
        "planted_stats": prob.stats,
        "hidden_iou": float(search.score(prob.hidden_ids[None]).mean()),
        "hidden_heldout_iou": float(held.score(prob.hidden_ids[None]).mean()),
        "label_iou": float(search.score(prob.label_ids[None]).mean()),
        "label_heldout_iou": float(held.score(prob.label_ids[None]).mean()),
        "random_iou": float(rand_search.mean()), "random_iou_max": float(rand_search.max()),
        "random_heldout_iou": float(held.score(random_ids).mean()),
        "build_s": time.perf_counter() - t0, "runs": {},
    }
    log(f"problem {p} ({prob.label}): hidden {out['hidden_iou']:.3f}/{out['hidden_heldout_iou']:.3f}, "
        f"label {out['label_iou']:.3f}, random {out['random_iou']:.3f} (max of {N_RANDOM}: "
        f"{out['random_iou_max']:.3f}), built in {out['build_s']:.0f}s, max RSS {_max_rss_gb():.1f} GB")
    for m in methods:
        out["runs"][m] = []
        for s in seeds:
            method, cfg = method_config(m, length=len(prob.hidden_ids), budget=budget, seed=s,
                                        allowed_tokens=prob.allowed_vocab.tolist())
            t = time.perf_counter()
            r = run_search(method, search, cfg)
            wall = time.perf_counter() - t
            best = r.best[0] if r.best else None
            heldout = float(held.score(np.asarray(best.ids, np.int32)[None]).mean()) if best else 0.0
            run = {"seed": s, "best_iou": best.train_iou if best else 0.0, "best_text": best.text if best else "",
                   "best_ids": best.ids if best else [], "heldout_iou": heldout, "evals": r.evals_used,
                   "evals_to_0.9": first_reach(r.history), "wall_s": wall,
                   "history": improvements(r.history)}
            out["runs"][m].append(run)
            log(f"  {m:9s} seed {s}: best {run['best_iou']:.3f} held-out {heldout:.3f} "
                f"to-0.9 {run['evals_to_0.9']} evals {r.evals_used} ({wall:.0f}s) {run['best_text']!r}")
    return out


def summarise(problems: list[dict], methods: list[str], budgets: list[int]) -> dict:
    """Per-method aggregates over all (problem, seed) runs, plus baselines and the target verdict."""
    res = {}
    for m in methods:
        runs = [r for p in problems for r in p["runs"][m]]
        to9 = [r["evals_to_0.9"] for r in runs]
        res[m] = {
            "best_iou": float(np.mean([r["best_iou"] for r in runs])),
            "evals": float(np.mean([r["evals"] for r in runs])),
            "heldout_iou": float(np.mean([r["heldout_iou"] for r in runs])),
            "evals_to_0.9": median_or_none(to9),
            "reached_0.9": f"{sum(x is not None for x in to9)}/{len(runs)}",
            "by_budget": {str(b): float(np.mean([best_at(r["history"], b) for r in runs])) for b in budgets},
            "wall_s": float(np.mean([r["wall_s"] for r in runs])),
        }
    baselines = {k: float(np.mean([p[k] for p in problems])) for k in
                 ("label_iou", "label_heldout_iou", "random_iou", "random_iou_max", "random_heldout_iou",
                  "hidden_iou", "hidden_heldout_iou")}
    return {"methods": res, "baselines": baselines, "target": target_verdict(res, max(budgets))}


def target_verdict(res: dict, max_budget: int) -> dict:
    """Issue target: best method reaches 0.9 with <= 1/10 of evolution's evaluations (or evolution does not reach
    it within 10x the best method's evaluations). "Evolution" is the fastest of the evolution rows that ran."""
    reached = {m: r["evals_to_0.9"] for m, r in res.items()
               if not m.startswith("evolution") and r["evals_to_0.9"] is not None}
    evos = {m: r["evals_to_0.9"] for m, r in res.items() if m.startswith("evolution")}
    got = {m: e for m, e in evos.items() if e is not None}
    evo_name = min(got, key=got.get) if got else None
    evo = got.get(evo_name)
    out = {"best_method": None, "best_evals": None, "evolution_method": evo_name, "evolution_evals": evo,
           "ratio": None}
    if not evos:
        return {**out, "met": None, "why": "no evolution run to compare with"}
    if not reached:
        why = (f"{evo_name} reaches {THRESHOLD} at {evo:.0f} evaluations (median run), no other method does"
               if evo is not None else f"no method reaches {THRESHOLD} in the median run")
        return {**out, "met": False, "why": why}
    best = min(reached, key=reached.get)
    need = TARGET_FACTOR * reached[best]
    if evo is not None:
        met, why = evo >= need, f"{evo_name} needs {evo:.0f} evaluations, {evo / reached[best]:.2f}x {best}'s"
    elif max_budget >= need:
        met, why = True, f"evolution does not reach 0.9 within {max_budget} >= 10x {best}'s {reached[best]:.0f}"
    else:
        met, why = None, (f"undecided: evolution does not reach 0.9 within {max_budget}, less than 10x {best}'s "
                          f"{reached[best]:.0f}")
    return {**out, "met": met, "best_method": best, "best_evals": reached[best],
            "ratio": None if evo is None else evo / reached[best], "why": why}


# --------------------------------------------------------------------------------------------------------------
def print_table(summary: dict, budgets: list[int]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="Planted aliases: best train IoU (mean over problems x seeds) vs evaluations")
    t.add_column("method")
    for b in budgets:
        t.add_column(f"@{b:,}", justify="right")
    for c in ("held-out", "evals to 0.9 (median)", "reached", "s/run"):
        t.add_column(c, justify="right")
    for m, r in summary["methods"].items():
        e9 = "not reached" if r["evals_to_0.9"] is None else f"{r['evals_to_0.9']:,.0f}"
        t.add_row(m, *[f"{r['by_budget'][str(b)]:.3f}" for b in budgets], f"{r['heldout_iou']:.3f}", e9,
                  r["reached_0.9"], f"{r['wall_s']:.0f}")
    bl = summary["baselines"]
    blank = [""] * (len(budgets) - 1)
    t.add_row("label", f"{bl['label_iou']:.3f}", *blank, f"{bl['label_heldout_iou']:.3f}", "", "", "")
    t.add_row("random", f"{bl['random_iou']:.3f}", *blank, f"{bl['random_heldout_iou']:.3f}", "", "", "")
    t.add_row("hidden", f"{bl['hidden_iou']:.3f}", *blank, f"{bl['hidden_heldout_iou']:.3f}", "", "", "")
    console = Console(width=max(120, 14 * (len(budgets) + 5)))
    console.print(t)
    tg = summary["target"]
    console.print(f"target (best method <= 1/{TARGET_FACTOR} of evolution's evaluations to {THRESHOLD}): "
                  f"{'MET' if tg['met'] else 'NOT MET' if tg['met'] is False else 'UNDECIDED'} - {tg['why']}")


def plot(problems: list[dict], summary: dict, methods: list[str], max_budget: int, out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.unique(np.geomspace(50, max_budget, 200).astype(int))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in methods:
        runs = [r for p in problems for r in p["runs"][m]]
        # a run has no value before its first fully scored candidate; average over the runs that have one
        curves = np.array([[best_at(r["history"], g) if r["history"] and r["history"][0][0] <= g else np.nan
                            for g in grid] for r in runs])
        have = ~np.isnan(curves).all(0)
        ax.plot(grid[have], np.nanmean(curves[:, have], axis=0), label=m)
    bl = summary["baselines"]
    ax.axhline(bl["label_iou"], color="gray", ls=":", label="natural label")
    ax.axhline(bl["random_iou"], color="black", ls=":", label="random sequence")
    ax.axhline(THRESHOLD, color="red", ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("candidate-image evaluations")
    ax.set_ylabel("best train IoU (mean over runs)")
    ax.set_title(f"Planted aliases: {len(problems)} problems x {len(problems[0]['runs'][methods[0]])} seeds")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "planted_iou_vs_evals.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="2 problems x 1 seed, budgets up to 25k (< 5 min on a 2-core CPU); default: 6 x 2, up to 50k")
    ap.add_argument("--problems", type=int, nargs="+", help="problem seeds (default from the preset)")
    ap.add_argument("--seeds", type=int, nargs="+", help="search seeds (default from the preset)")
    ap.add_argument("--budgets", type=int, nargs="+", help="budget ladder in candidate-image evaluations")
    ap.add_argument("--methods", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--json", type=Path, help="write results here")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out"), help="folder for the PNG plot")
    ap.add_argument("--kind", choices=KINDS, default="direction",
                    help="planted problem family (see jalias/data/planted.py): a graded concept direction (default) or "
                         "the unstructured random control")
    ap.add_argument("--resume", action="store_true",
                    help="reuse the problems already in --json from an interrupted run with the same settings")
    ap.add_argument("--merge", type=Path, nargs="+",
                    help="run nothing: summarise the runs stored in these --json files of the same problems (each "
                         "method's runs pooled by search seed; a later file replaces the same seed)")
    args = ap.parse_args(argv)
    preset = PRESETS["quick" if args.quick else "full"]
    problems_ids = args.problems or preset["problems"]
    seeds = args.seeds or preset["seeds"]
    budgets = sorted(args.budgets or preset["budgets"])
    if min(budgets) < 1:
        raise SystemExit("budgets must be positive")

    t0 = time.perf_counter()
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    if args.merge:  # no search: pool the runs stored in earlier --json files
        problems = merge_runs([json.loads(f.read_text())["problems"] for f in args.merge])
        problems_ids = [p["problem"] for p in problems]
        seeds = sorted({r["seed"] for p in problems for runs in p["runs"].values() for r in runs})
        args.methods = [m for m in SETTINGS if m in problems[0]["runs"]]
    else:
        done = {}
        if args.resume and args.json and args.json.exists():  # reuse problems of an interrupted run, same setup
            old = json.loads(args.json.read_text())
            if old.get("settings", {}).get("run") == run_key(args.methods, seeds, budgets, args.kind):
                done = {p["problem"]: p for p in old.get("problems", [])}
        problems = []
        for p in problems_ids:
            problems.append(done[p] if p in done else run_problem(p, seeds, budgets[-1], args.methods, log, args.kind))
            if args.json:  # partial results after every problem
                write_json_atomic(args.json, {"settings": {"run": run_key(args.methods, seeds, budgets, args.kind)},
                                       "problems": problems})
    summary = summarise(problems, args.methods, budgets)
    print_table(summary, budgets)
    png = plot(problems, summary, args.methods, budgets[-1], args.out)
    total = time.perf_counter() - t0
    print(f"plot: {png}  total time {total:.0f}s")
    result = {**summary["methods"], "baselines": summary["baselines"], "target": summary["target"],
              "settings": {"methods": plain_settings(SETTINGS), "problems": problems_ids, "seeds": seeds,
                           "budgets": budgets, "threshold": THRESHOLD, "kind": args.kind, "total_s": total,
                           "devices": _devices(),
                           "run": run_key(args.methods, seeds, budgets, args.kind),
                           "merged_from": [str(f) for f in args.merge or []]},
              "problems": problems}
    if args.json:
        write_json_atomic(args.json, result)
        print(f"json: {args.json}")
    return result


def merge_runs(files: list[list[dict]]) -> list[dict]:
    """Per-problem results of several runs (each a list of problem dicts) -> one list: baselines from the first file,
    each method's runs pooled over the files by search seed (a later file replaces the same seed). Every file must
    hold the same problems."""
    ids = [p["problem"] for p in files[0]]
    for f in files[1:]:
        if [p["problem"] for p in f] != ids:
            raise SystemExit(f"--merge: files hold different problems ({ids} vs {[p['problem'] for p in f]})")
    merged = []
    for i in range(len(ids)):
        by_seed: dict[str, dict] = {}
        for f in files:
            for m, runs in f[i]["runs"].items():
                by_seed.setdefault(m, {}).update({r["seed"]: r for r in runs})
        merged.append({**files[0][i], "runs": {m: [rs[k] for k in sorted(rs)] for m, rs in by_seed.items()}})
    return merged


def run_key(methods: list[str], seeds: list[int], budgets: list[int], kind: str) -> str:
    """What makes stored per-problem results reusable by --resume."""
    return json.dumps({"methods": plain_settings({m: SETTINGS[m] for m in methods}), "seeds": seeds,
                       "budget": max(budgets), "kind": kind}, sort_keys=True)


def _max_rss_gb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _devices() -> str:
    import jax
    return ", ".join(str(d) for d in jax.devices())


if __name__ == "__main__":
    main()
