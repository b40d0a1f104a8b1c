"""Candidate-scoring throughput: jalias's Engine (fp32, bf16) vs two PyTorch baselines, same weights, same images.

    PYTHONPATH=. python benchmarks/throughput.py --config tiny --candidates 256 --images 4 --json out.json

Unit: candidate-image evaluations per second (cps): one candidate prompt scored (exact mask IoU) on one image.
Every method scores the same candidates on the same images with the same weights in this one process; warmup
(XLA compilation, first torch calls) is excluded from the rates and reported separately. jalias fp32 / bf16 and
torch-opt are timed in interleaved rounds (one pass of each per round, median over rounds), so load from other jobs
on a shared machine hits them alike. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # torch_baselines, when run as a script

from jalias.data import make_dataset  # noqa: E402
from jalias.engine import Engine  # noqa: E402
from jalias.engine.scoring import layout_prompts  # noqa: E402
from jalias.model import layers  # noqa: E402
from jalias.model.config import (MaskDecoderConfig, Sam3Config, TextConfig, TransformerConfig, ViTConfig,  # noqa: E402
                                 VisionConfig, tiny_config)
from jalias.model.init import centre_masks, probe, random_params  # noqa: E402
from jalias.model.preprocess import preprocess  # noqa: E402
from jalias.model.sam3 import Sam3  # noqa: E402
from jalias.tokenizer import START_ID  # noqa: E402

# dense bf16 peak FLOP/s by device-kind substring (MFU denominator)
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12}


# ---- configs ----------------------------------------------------------------------------------------------------
def mid_config() -> Sam3Config:
    """Real SAM3 geometry (1008 px input, 72x72 patch grid, 24-px windows, 32 ViT layers with 4 global, 24 text
    layers, 6+6 DETR layers, 200 queries) at reduced widths: ViT 224 (4 heads), text 128, DETR/FPN/mask 32 (head
    dim 32 as in SAM3). Widths are chosen so the FLOP split matches real SAM3's: XLA counts backbone / (detect per
    candidate-image) = 421 / 22.6 GFLOP = 18.7 here vs 5837 / 317 = 18.4 for `Sam3Config()`. Runs on a CPU."""
    return Sam3Config(
        vision=VisionConfig(
            backbone=ViTConfig(hidden_size=224, intermediate_size=1036, num_hidden_layers=32, num_attention_heads=4,
                               image_size=1008, patch_size=14, window_size=24, global_attn_indexes=(7, 15, 23, 31),
                               pretrain_image_size=336),
            fpn_hidden_size=32),
        text=TextConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=24, num_attention_heads=2,
                        projection_dim=64),
        encoder=TransformerConfig(hidden_size=32, num_layers=6, num_attention_heads=1, intermediate_size=256),
        decoder=TransformerConfig(hidden_size=32, num_layers=6, num_attention_heads=1, intermediate_size=256,
                                  num_queries=200),
        mask_decoder=MaskDecoderConfig(hidden_size=32, num_attention_heads=1),
    )


def get_config(name: str, px: int | None = None, width: int | None = None, queries: int | None = None) -> Sam3Config:
    """tiny / mid / full; tiny's input size, width and query count can be changed (the size sweep's points)."""
    if name == "tiny":
        return tiny_config(image_size=px or 56, width=width or 32, queries=queries or 8)
    if px or width or queries:
        raise ValueError("--px / --width / --queries change the tiny config only")
    if name == "mid":
        return mid_config()
    if name == "full":
        return Sam3Config()
    raise ValueError(f"unknown --config {name!r}: choose tiny, mid or full")


# ---- weights, images, candidates ----------------------------------------------------------------------------------
def calibrated_params(cfg: Sam3Config, seed: int, pixel_values: np.ndarray, ids: np.ndarray, mask: np.ndarray,
                      kept_queries: float = 4.0) -> dict:
    """Random fan-in-scaled params calibrated on a probe forward (benchmark images x the given laid-out prompts
    ids/mask [B, T], e.g. a few of the candidates) so predictions look like a real detector's: mask logits centred
    (masks cover part of the image), query scores spread across queries, presence probability ~0.95, and a score
    offset so that on average `kept_queries` queries pass the keep rule (at most 30% of them). Without this every
    prediction of a random model is empty and the IoU cross-check is vacuous; and the keep count sets the cost of
    the IoU step."""
    params = random_params(cfg, seed)
    # Damp the decoder's residual branches: with 5184 image tokens, random cross-attention averages every query to
    # the same vector and the 200 queries collapse (near-equal scores); damped, each keeps its own identity.
    for name, layer in params["detr_decoder"].items():
        if name.startswith("layers_"):
            for sub in ("self_attn", "text_cross_attn", "vision_cross_attn"):
                layer[sub]["o_proj"]["kernel"] *= np.float32(0.1)
            layer["mlp"]["fc2"]["kernel"] *= np.float32(0.1)
    k, b = len(pixel_values), len(ids)
    pixel_values = np.repeat(pixel_values, b, 0)
    ids, mask = np.tile(ids, (k, 1)), np.tile(mask, (k, 1))
    out, found = probe(cfg, params, pixel_values, ids, mask)
    centre_masks(params, found["pixel_decoder"])
    # Query scores: a random deep decoder gives near-identical queries, so a prompt's scores share one offset and
    # either all or none of its queries fire. Remove each probe row's mean query direction from query_proj (scores
    # then vary across queries, not rows) and scale them to std 2. Then presence logit ~3 and a bias along the mean
    # text direction (a score offset, found by bisection) so that `kept_queries` fire on average.
    qp = params["dot_product_scoring"]["query_proj"]
    pq, pt = found["query_proj"].astype(np.float64), found["text_proj"].astype(np.float64)
    d = pt.shape[-1]
    q_in = (pq - qp["bias"]) @ np.linalg.inv(qp["kernel"].astype(np.float64))  # query_proj inputs [B, Q, D]
    u, sv, _ = np.linalg.svd(q_in.mean(1).T, full_matrices=False)  # span of the row means
    u = u[:, sv > 1e-6 * sv[0]]
    kernel = (np.eye(len(u)) - u @ u.T) @ qp["kernel"]
    logits = np.einsum("bqd,bd->bq", q_in @ kernel, pt) / np.sqrt(d)
    scale = 2.0 / max(float(logits.std()), 1e-6)
    logits *= scale
    mean_text = pt.mean(0)
    unit = mean_text * np.sqrt(d) / max(float(mean_text @ mean_text), 1e-12)  # bias giving offset ~1 per unit
    along = (pt @ unit / np.sqrt(d))[:, None]  # [B, 1]: each row's offset per unit of bias
    presence = np.asarray(out["presence_logits"], np.float64)
    shift = 3.0 - float(np.median(presence))
    prob = 1 / (1 + np.exp(-(presence + shift)))
    target = min(0.3, kept_queries / cfg.decoder.num_queries)
    lo, hi = -50.0, 50.0  # offset: kept fraction grows with it
    for _ in range(60):
        mid = (lo + hi) / 2
        kept = np.mean(prob / (1 + np.exp(-np.clip(logits + mid * along, -12, 12))) > 0.5)
        lo, hi = (mid, hi) if kept < target else (lo, mid)
    qp["kernel"] = (kernel * scale).astype(np.float32)
    qp["bias"] = (hi * unit).astype(np.float32)
    params["detr_decoder"]["presence_head"]["layer3"]["bias"] += np.float32(shift)
    return params


def make_images(k: int, size: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """k synthetic images uint8 [size, size, 3] with their concept's GT mask (bool [size, size], non-empty)."""
    ds = make_dataset(max(1, -(-k // 6)), size, seed=seed)
    pairs = [(s.image, m) for s in ds.samples for m in s.masks.values() if m.any()]
    order = np.random.default_rng(seed).permutation(len(pairs))[:k]
    return [pairs[i][0] for i in order], [pairs[i][1] for i in order]


def make_candidates(n: int, length: int, seed: int, kind: str) -> np.ndarray:
    """int32 [n, length]. "mutations": one random position of a reference re-drawn (what GCG / evolutionary search
    score); "random": independent random token sequences."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.integers(0, START_ID, (n, length)).astype(np.int32)
    ref = rng.integers(0, START_ID, length)
    out = np.repeat(ref[None], n, 0)
    out[np.arange(n), rng.integers(0, length, n)] = rng.integers(0, START_ID, n)
    return out.astype(np.int32)


# ---- measurement helpers ------------------------------------------------------------------------------------------
_T0 = time.perf_counter()


def log(msg: str) -> None:
    """Progress on stderr (mid/full runs take minutes)."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def block(x):
    return jax.block_until_ready(x)


def timed(fn, repeats: int):
    """(result of the last call, median seconds over `repeats` calls)."""
    times, out = [], None
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, float(np.median(times))


def rss_gib() -> float:
    """Peak resident set size of this process so far (Linux ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def jax_peak_gib() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None


def flops_of(fn, *args) -> float:
    """XLA's FLOP count of one call. XLA counts a loop body once, not once per trip, so callers count on a model
    whose attention is never blocked (a lax.map x lax.scan): the same math as one straight-line program."""
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


def peak_flops(kind: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k.lower() in kind.lower()), None)


# ---- methods ------------------------------------------------------------------------------------------------------
def time_rounds(methods: dict, repeats: int) -> None:
    """Time `repeats` passes of each method's "run" in rounds (one pass of every method per round, in turn), so load
    changes on a shared machine hit all methods alike. Sets "iou" (last pass), "sec" (median) and "secs" (all)."""
    secs = {k: [] for k in methods}
    for r in range(max(1, repeats)):
        for k, m in methods.items():
            t = time.perf_counter()
            m["iou"] = m["run"]()
            secs[k].append(time.perf_counter() - t)
        log(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in secs.items()))
    for k, m in methods.items():
        m["sec"], m["secs"] = float(np.median(secs[k])), secs[k]


def prepare_jalias(model: Sam3, images, gts, cand, chunk, label):
    """Engine setup and warmup (timed separately); "run" does one timed pass."""
    log(f"{label}: engine setup (image features)")
    t = time.perf_counter()
    engine = Engine(model, images, gts, chunk_size=chunk, compilation_cache=False)
    setup = time.perf_counter() - t
    log(f"{label}: warmup pass (compiles), chunk {engine.chunk_size}")
    t = time.perf_counter()
    engine.score(cand)  # compiles every chunk-bucket / prefix variant this candidate set needs
    first = time.perf_counter() - t
    # what the engine holds per image (its stacked contexts + GT targets), and what the full encode_image context
    # would add: the FPN maps the engine no longer keeps (held until 2026-12-07, in float32 on disk)
    held = sum(x.nbytes for x in jax.tree_util.tree_leaves((engine._ctx, vars(engine._targets), engine._soft)))
    full = jax.eval_shape(lambda x: model.encode_image(x), jnp.zeros((1, 3, model.config.image_size,
                                                                    model.config.image_size), jnp.float32))
    fpn = sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(full["fpn"]))
    return {"name": label, "run": lambda: engine.score(cand), "evals": cand.shape[0] * len(images),
            "setup_s": setup, "warmup_s": first, "chunk": engine.chunk_size,
            "engine_bytes_per_image": held / len(images), "fpn_bytes_per_image": float(fpn)}


def prepare_torch(cls, model, pixel_values, gts, ids, mask, device, **kw):
    """Baseline setup and warmup (timed separately); "run" does one timed pass."""
    log(f"{cls.name}: setup")
    t = time.perf_counter()
    runner = cls(model, pixel_values, gts, device=device, **kw)
    setup = time.perf_counter() - t
    t = time.perf_counter()
    runner.score(ids[:1], mask[:1])
    if kw.get("compile"):
        runner.score(ids, mask)  # torch.compile specialises on the batch shapes of a full pass
    first = time.perf_counter() - t
    return {"name": cls.name, "run": lambda: runner.score(ids, mask), "evals": len(ids) * len(gts), "setup_s": setup,
            "warmup_s": first}


def torch_peak_gib(device: str) -> float | None:
    """Peak CUDA memory since the last reset (None on CPU), then reset for the next method."""
    import torch

    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return peak


def pick_torch_threads(cls, model, pixel_values, gts, ids, mask, batch: int) -> int:
    """The faster torch CPU thread count (1 or all cores) for one torch-opt batch on one image. On a shared CPU
    torch's OpenMP threads can lose 10-40x to other load; one thread avoids that."""
    import torch

    best, best_t = None, float("inf")
    b = min(batch, len(ids))
    for n in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(n)
        runner = cls(model, pixel_values, gts, batch=b)
        runner.score(ids[:b], mask[:b])
        _, sec = timed(lambda: runner.score(ids[:b], mask[:b]), 2)
        log(f"torch threads {n}: {sec:.3f}s per torch-opt batch of {b}")
        if sec < best_t:
            best, best_t = n, sec
    return best


def jalias_stages(model: Sam3, pixel_values, ids, mask, chunk: int, n: int, k: int, repeats: int) -> dict:
    """Per-stage seconds for one `score` of n candidates x k images, each stage timed on its own with the model's
    jitted stage functions (no prefix cache): image features (once per image, engine setup), text encoding,
    detection (fusion encoder, decoder, heads). FLOPs from XLA's cost analysis of the same programs."""
    log("jalias: per-stage timing and FLOP counts")
    b = min(chunk, n)
    bi, bm = jnp.asarray(ids[:b]), jnp.asarray(mask[:b])
    px = jnp.asarray(pixel_values[:1])
    ctx = block(model.encode_image(px))
    prompt = block(model.encode_text(bi, bm))
    det = block(model.detect_fast(ctx, prompt, bm))
    kept = jax.nn.sigmoid(det["pred_logits"]) * jax.nn.sigmoid(det["presence_logits"]) > 0.5
    _, t_img = timed(lambda: block(model.encode_image(px)), repeats)
    _, t_txt = timed(lambda: block(model.encode_text(bi, bm)), repeats)
    _, t_det = timed(lambda: block(model.detect_fast(ctx, prompt, bm)), repeats)
    chunks = n / b
    flat = Sam3(model.config, model.params, model.dtype,
                layers.AttentionPolicy(model.attention.impl, blocked_min_pairs=1 << 62))  # see flops_of
    p = flat.params
    f_img = flops_of(lambda p, x: flat.apply("encode_image", x, params=p), p, px)
    f_txt = flops_of(lambda p, i, m: flat.apply("text_features", i, m, params=p), p, bi, bm)
    f_det = flops_of(lambda p, c, q, m: flat.apply("detect_fast", c, q, m, params=p), p, ctx, prompt, bm)
    return {"image_features_s_per_image": t_img, "text_s": t_txt * chunks, "detect_s": t_det * chunks * k,
            "flops_backbone_per_image": f_img, "flops_text_per_candidate": f_txt / b,
            "flops_detect_per_eval": f_det / b, "mean_kept_queries": float(kept.sum(-1).mean()),
            "max_kept_queries": int(kept.sum(-1).max())}


# ---- main ---------------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="tiny", choices=["tiny", "mid", "full"])
    ap.add_argument("--px", type=int, default=None, help="tiny config: input size in pixels (default 56)")
    ap.add_argument("--width", type=int, default=None, help="tiny config: hidden width (default 32)")
    ap.add_argument("--queries", type=int, default=None, help="tiny config: DETR queries (default 8)")
    ap.add_argument("--candidates", type=int, default=256, help="candidate prompts N")
    ap.add_argument("--images", type=int, default=4, help="images K (GT resolution --image-size)")
    ap.add_argument("--image-size", type=int, default=None, help="synthetic image/GT side (tiny 64, else 512)")
    ap.add_argument("--length", type=int, default=8, help="content tokens per candidate")
    ap.add_argument("--kind", default="mutations", choices=["mutations", "random"], help="candidate set")
    ap.add_argument("--seed-candidates", type=int, default=None,
                    help="torch-seed scores only the first M candidates (it is slow); default all")
    ap.add_argument("--chunk", type=int, default=None, help="jalias chunk size (default: the engine's choice)")
    ap.add_argument("--torch-batch", type=int, default=32, help="torch-opt candidates per forward")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch CPU threads (default on CPU: whichever of 1 and all cores is faster for torch-opt)")
    ap.add_argument("--torch-compile", action="store_true", help="torch.compile the torch-opt forward")
    ap.add_argument("--repeats", type=int, default=2, help="timed passes per method (median)")
    ap.add_argument("--skip", default="", help="comma list of methods to skip: torch-seed,torch-opt,jalias-bf16")
    ap.add_argument("--no-calibrate", action="store_true", help="plain random weights (predictions mostly empty)")
    ap.add_argument("--kept-queries", type=float, default=4.0,
                    help="calibrate the presence bias so this many queries fire per candidate-image on average")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args(argv)

    import torch

    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    cfg = get_config(a.config, a.px, a.width, a.queries)
    size = a.image_size or (64 if a.config == "tiny" else 512)
    images, gts = make_images(a.images, size, a.seed)
    pixel_values = np.concatenate([preprocess(im, cfg.image_size) for im in images])
    cand = make_candidates(a.candidates, a.length, a.seed + 1, a.kind)
    ids, mask = layout_prompts(cand, cfg.context_length)
    log("weights (calibration forward)")
    t = time.perf_counter()
    params = (random_params(cfg, a.seed) if a.no_calibrate
              else calibrated_params(cfg, a.seed, pixel_values, ids[:2], mask[:2], a.kept_queries))
    calib_s = time.perf_counter() - t

    jdev = jax.devices()[0]
    tdev = "cuda" if torch.cuda.is_available() else "cpu"
    device = (f"{jdev.device_kind} (jax {jdev.platform}); torch {tdev}"
              + (f" {torch.cuda.get_device_name()}" if tdev == "cuda" else
                 f"; {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"))
    print(f"config {a.config}: {a.candidates} candidates x {a.images} images (GT {size}x{size}); {device}")
    if hasattr(os, "getloadavg"):
        print(f"load average before: {os.getloadavg()[0]:.2f}")

    # Setup and warmup of every method first; then jalias fp32 / bf16 and torch-opt are timed in rounds (one pass
    # of each per round) so that load from other jobs on a shared machine hits them alike. torch-seed is timed on
    # its own afterwards (one pass takes minutes at mid size).
    results, mem = {}, {}
    model = Sam3(cfg, params)
    results["jalias"] = prepare_jalias(model, images, gts, cand, a.chunk, "jalias")
    mem["jalias"] = jax_peak_gib() or rss_gib()
    stages = jalias_stages(model, pixel_values, ids, mask, results["jalias"]["chunk"], len(cand), len(images),
                           a.repeats)
    if "jalias-bf16" not in skip:
        results["jalias_bf16"] = prepare_jalias(Sam3(cfg, params, dtype="bfloat16"), images, gts, cand, a.chunk,
                                                "jalias-bf16")
        mem["jalias_bf16"] = jax_peak_gib() or rss_gib()

    from torch_baselines import TorchOpt, TorchSeed, torch_model

    tm = torch_model(cfg, params, tdev)
    if tdev == "cpu" and not a.torch_threads:
        a.torch_threads = pick_torch_threads(TorchOpt, tm, pixel_values[:1], gts[:1], ids, mask, a.torch_batch)
    if a.torch_threads:
        torch.set_num_threads(a.torch_threads)
    if tdev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if "torch-opt" not in skip:
        results["torch_opt"] = prepare_torch(TorchOpt, tm, pixel_values, gts, ids, mask, tdev, batch=a.torch_batch,
                                             compile=a.torch_compile)
    log(f"timed passes: {a.repeats} rounds of " + ", ".join(results))
    time_rounds(dict(results), a.repeats)
    if "torch_opt" in results:
        mem["torch_opt"] = torch_peak_gib(tdev) or rss_gib()
    if "torch-seed" not in skip:
        m = a.seed_candidates or len(cand)
        results["torch_seed"] = prepare_torch(TorchSeed, tm, pixel_values, gts, ids[:m], mask[:m], tdev)
        log("torch-seed: timed passes")
        time_rounds({"torch_seed": results["torch_seed"]}, max(1, a.repeats - 1))
        mem["torch_seed"] = torch_peak_gib(tdev) or rss_gib()
    for r in results.values():
        r.pop("run")  # drops the engines / runners

    # rates, ratios, agreement
    for r in results.values():
        r["cps"] = r["evals"] / r["sec"]
    base = results["jalias"]
    ratios, agree = {}, {}
    for key in ("jalias", "jalias_bf16"):
        for other in ("torch_seed", "torch_opt"):
            if key in results and other in results:
                ratios[f"{key}_vs_{other}"] = results[key]["cps"] / results[other]["cps"]
    for key in ("torch_opt", "torch_seed", "jalias_bf16"):
        if key in results:
            ours = results[key]["iou"]
            diff = np.abs(base["iou"][:len(ours)] - ours)
            agree[f"jalias_vs_{key}"] = {"exact": float((diff == 0).mean()), "within_0.01": float((diff <= 0.01).mean()),
                                        "mean_abs_diff": float(diff.mean()), "pairs": int(diff.size)}
    useful = len(cand) * stages["flops_text_per_candidate"] + base["evals"] * stages["flops_detect_per_eval"]
    tflops = useful / base["sec"] / 1e12
    peak = peak_flops(jdev.device_kind) if jdev.platform == "gpu" else None
    iou = base["iou"]
    report = {
        "config": a.config, "px": cfg.image_size, "width": cfg.encoder.hidden_size,
        "queries": cfg.decoder.num_queries, "device": device, "candidates": len(cand), "images": len(images), "image_size": size,
        "length": a.length, "kind": a.kind, "chunk": base["chunk"], "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "calibration_s": calib_s,
        **{f"{k}_cps": r["cps"] for k, r in results.items()},
        "ratios": ratios,
        "seconds": {k: r["sec"] for k, r in results.items()},
        "seconds_per_pass": {k: r["secs"] for k, r in results.items()},
        "evals": {k: r["evals"] for k, r in results.items()},
        "setup_s": {k: r["setup_s"] for k, r in results.items()},
        "warmup_s": {k: r["warmup_s"] for k, r in results.items()},
        "peak_memory_gib": mem,
        "peak_memory_kind": "device peak" if jdev.platform == "gpu" else "process peak RSS so far (cumulative)",
        "stages": stages,
        "engine_bytes_per_image": base["engine_bytes_per_image"], "fpn_bytes_per_image": base["fpn_bytes_per_image"],
        "jalias_tflops": tflops, "mfu_bf16_peak": (tflops * 1e12 / peak) if peak else None,
        "agreement": agree,
        "iou_stats": {"mean": float(iou.mean()), "frac_strictly_between": float(((iou > 0) & (iou < 1)).mean()),
                      "frac_zero": float((iou == 0).mean())},
    }
    print_report(report)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    return report


def print_report(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=150)
    t = Table(title=f"throughput, config {r['config']}: {r['candidates']} candidates x {r['images']} images")
    for col in ("method", "cand-img/s", "vs torch-seed", "vs torch-opt", "timed s", "evals", "setup s", "warmup s",
                "peak GiB"):
        t.add_column(col, justify="right" if col != "method" else "left")
    seed, opt = r.get("torch_seed_cps"), r.get("torch_opt_cps")
    for key, label in (("torch_seed", "torch-seed"), ("torch_opt", "torch-opt"), ("jalias", "jalias fp32"),
                       ("jalias_bf16", "jalias bf16")):
        if f"{key}_cps" not in r:
            continue
        cps = r[f"{key}_cps"]
        t.add_row(label, f"{cps:,.1f}", f"{cps / seed:.2f}x" if seed else "-", f"{cps / opt:.2f}x" if opt else "-",
                  f"{r['seconds'][key]:.2f}", str(r["evals"][key]), f"{r['setup_s'][key]:.1f}",
                  f"{r['warmup_s'][key]:.1f}", f"{r['peak_memory_gib'].get(key) or float('nan'):.2f}")
    con.print(t)
    s = r["stages"]
    st = Table(title="jalias fp32 stages (each timed alone, per timed pass)")
    for col in ("stage", "seconds", "share", "GFLOP"):
        st.add_column(col, justify="right" if col != "stage" else "left")
    total = r["seconds"]["jalias"]
    rest = total - s["text_s"] - s["detect_s"]
    n, k = r["candidates"], r["images"]
    for name, sec, fl in (("text encode", s["text_s"], n * s["flops_text_per_candidate"]),
                          ("detect (fusion+decoder+heads)", s["detect_s"], n * k * s["flops_detect_per_eval"]),
                          ("IoU + host overhead (rest)", rest, float("nan"))):
        st.add_row(name, f"{sec:.3f}", f"{sec / total:.0%}", f"{fl / 1e9:,.1f}")
    st.add_row("(setup) image features per image", f"{s['image_features_s_per_image']:.3f}", "-",
               f"{s['flops_backbone_per_image'] / 1e9:,.1f}")
    con.print(st)
    con.print(f"torch CPU threads: {r['torch_threads']}; jalias chunk: {r['chunk']}; engine holds "
              f"{r['engine_bytes_per_image'] / 2**20:.2f} MiB per image (+{r['fpn_bytes_per_image'] / 2**20:.2f} MiB "
              "of FPN maps it no longer keeps)")
    con.print(f"kept queries per candidate (image 0, first chunk): mean {s['mean_kept_queries']:.1f}, "
              f"max {s['max_kept_queries']}")
    con.print(f"jalias fp32 achieved {r['jalias_tflops'] * 1e3:,.1f} GFLOP/s (model FLOPs: text + detect)"
              + (f", MFU {r['mfu_bf16_peak']:.1%} of bf16 dense peak" if r["mfu_bf16_peak"] else ""))
    for key, v in r["agreement"].items():
        con.print(f"IoU agreement {key}: exact {v['exact']:.1%}, within 0.01 {v['within_0.01']:.1%}, "
                  f"mean |diff| {v['mean_abs_diff']:.4f} over {v['pairs']} pairs")
    i = r["iou_stats"]
    con.print(f"jalias IoU: mean {i['mean']:.3f}, {i['frac_strictly_between']:.0%} strictly in (0, 1), "
              f"{i['frac_zero']:.0%} zero; load average after: {r['load_average']}")


if __name__ == "__main__":
    main()
