"""The Python steps of benchmarks/gpu.sh, one per subcommand, each writing one JSON file (so that a step that
fails or times out loses only its own numbers):

    python benchmarks/gpu_steps.py env     OUT/env.json        machine, driver, package versions
    python benchmarks/gpu_steps.py matmul  OUT/matmul.json     the card's measured bf16 matmul rate (jitted, jax)
    python benchmarks/gpu_steps.py parity  OUT/parity.json     whole-model parity vs transformers' Sam3Model
    python benchmarks/gpu_steps.py summary OUT                 OUT/summary.json: MFU vs the measured rate, targets

`--small` (gpu.sh's SMALL=1 / --dry-run): the same steps at tiny sizes, runnable on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))  # parity_utils: the parity tests' helpers


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def write(path: str | Path, data: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=1, default=str))
    log(f"wrote {path}")


# ---- env ----------------------------------------------------------------------------------------------------------
def env_step(out: str, small: bool) -> dict:
    import jax
    import torch
    import transformers

    def ver(name):
        try:
            from importlib.metadata import version
            return version(name)
        except Exception:  # noqa: BLE001
            return None

    smi = None
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:  # noqa: BLE001 - no nvidia-smi on a CPU box
        pass
    d = jax.devices()[0]
    data = {"small": small, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "platform": platform.platform(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "nvidia_smi": smi,
            "jax_device": f"{d.device_kind} ({d.platform})", "jax_devices": len(jax.devices()),
            "torch_device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "versions": {n: ver(n) for n in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "torch",
                                             "transformers", "ftfy", "pycocotools", "wcwidth")},
            "transformers_module": transformers.__version__,
            "env": {k: os.environ.get(k) for k in ("XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_FLAGS", "PYTHONPATH")}}
    write(out, data)
    return data


# ---- matmul -------------------------------------------------------------------------------------------------------
def matmul_step(out: str, small: bool) -> dict:
    """A jitted n x n x n bf16 matmul (fp32 accumulation, bf16 result), timed over `reps` calls after warm-up:
    the card's achievable dense bf16 rate, the MFU denominator."""
    import jax
    import jax.numpy as jnp

    n = 1024 if small else 8192
    reps = 5 if small else 50
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    t = time.perf_counter()
    f(a, b).block_until_ready()
    compile_s = time.perf_counter() - t
    for _ in range(3):
        f(a, b).block_until_ready()
    times = []
    for _ in range(3):  # three timed rounds of `reps` back-to-back calls; best round
        t = time.perf_counter()
        for _ in range(reps):
            c = f(a, b)
        c.block_until_ready()
        times.append((time.perf_counter() - t) / reps)
    sec = min(times)
    data = {"n": n, "reps": reps, "seconds_per_matmul": sec, "round_seconds": times, "compile_s": compile_s,
            "tflops_bf16": 2 * n ** 3 / sec / 1e12, "device": jax.devices()[0].device_kind}
    # torch's rate on the same card, for reference (cuBLAS directly)
    try:
        import torch

        if torch.cuda.is_available():
            x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
            y = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
            for _ in range(3):
                x @ y
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(reps):
                x @ y
            torch.cuda.synchronize()
            data["torch_tflops_bf16"] = 2 * n ** 3 / ((time.perf_counter() - t) / reps) / 1e12
    except Exception as e:  # noqa: BLE001
        data["torch_error"] = repr(e)
    log(f"bf16 matmul {n}^3: {data['tflops_bf16']:.1f} TFLOP/s (jax)"
        + (f", {data['torch_tflops_bf16']:.1f} (torch)" if "torch_tflops_bf16" in data else ""))
    write(out, data)
    return data


# ---- parity -------------------------------------------------------------------------------------------------------
def _stats(got: dict, ref: dict) -> dict:
    from parity_utils import OUTPUTS, mask_iou

    s = {}
    for k in OUTPUTS:
        d = np.abs(got[k].astype(np.float64) - ref[k].astype(np.float64))
        s[k] = {"max_abs": float(d.max()), "mean_abs": float(d.mean()),
                "rel": float(d.max() / max(float(np.abs(ref[k]).max()), 1e-12))}
    iou = mask_iou(got["pred_masks"], ref["pred_masks"])
    s["mask_iou"] = {"min": float(iou.min()), "mean": float(iou.mean())}
    keep = lambda o: (1 / (1 + np.exp(-o["pred_logits"]))) * (1 / (1 + np.exp(-o["presence_logits"]))) > 0.5  # noqa
    s["kept_query_agreement"] = float((keep(got) == keep(ref)).mean())
    return s


def parity_step(out: str, small: bool, seed: int = 0) -> dict:
    """Whole model, full size (Sam3Config(): 1008 px, 840M params) or tiny (--small): the same random fan-in-scaled
    weights in transformers' Sam3Model (torch, on the GPU when there is one) and in jalias (prompt mode hf), batch
    of 3 (a different image per row; prompts of 1 word, a long sentence and ""). fp32: torch with TF32 off vs jalias
    at "highest" matmul precision, judged by tests/test_parity.py's bounds (scores/boxes 1e-4, mask logits 1e-3,
    every query's thresholded mask IoU >= 0.99). bf16: jalias bf16 (cuDNN attention on a GPU) vs torch fp32, next
    to torch's own bf16 autocast vs torch fp32 (the yardstick), judged by test_bf16_masks_match_fp32_torch's bounds
    (mean mask IoU >= 0.97, worst query >= 0.85, mask-logit error <= 2x torch-bf16's). Also: compile time and peak
    memory of each jalias forward. Written after each part, so a timeout keeps what finished."""
    import jax
    import torch
    import transformers

    from jalias.model.config import Sam3Config, tiny_config
    from jalias.model.init import random_params
    from jalias.model.sam3 import Sam3
    from jalias.weights.mapping import params_to_state_dict, skip_pattern
    from parity_utils import PROMPTS, prompts, random_pixels

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = tiny_config(image_size=112) if small else Sam3Config()
    data = {"config": "tiny_config(image_size=112)" if small else "Sam3Config() (real SAM3 sizes)", "device": dev,
            "jax_device": jax.devices()[0].device_kind, "batch": 3, "prompts": list(PROMPTS), "seed": seed}
    t = time.perf_counter()
    params = random_params(cfg, seed)
    data["params"] = int(sum(np.prod(v.shape) for v in jax.tree_util.tree_leaves(params)))
    log(f"parity: {data['params']:,} params (random, {time.perf_counter() - t:.1f} s); torch Sam3Model on {dev}")
    torch.manual_seed(seed)
    with torch.device(dev):  # initialised on the device: fast for 840M params
        hm = transformers.Sam3Model(transformers.Sam3Config(**cfg.to_hf_dict())).eval()
    res = hm.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in params_to_state_dict(params).items()},
                             strict=False)
    assert not res.unexpected_keys, res.unexpected_keys[:3]
    not_loaded = [k for k in res.missing_keys if not skip_pattern(cfg).search(k)]
    assert not not_loaded, not_loaded[:3]
    px = random_pixels(3, cfg.image_size, seed=10 + seed)
    ids, mask = prompts()
    tin = dict(pixel_values=torch.from_numpy(px).to(dev), input_ids=torch.from_numpy(ids).long().to(dev),
               attention_mask=torch.from_numpy(mask).long().to(dev))
    outputs = ("pred_logits", "pred_boxes", "presence_logits", "pred_masks", "semantic_seg")

    def torch_run(autocast: bool) -> tuple[dict, float]:
        ctx = torch.autocast(dev, dtype=torch.bfloat16) if autocast else torch.autocast(dev, enabled=False)
        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with torch.inference_mode(), ctx:
            o = hm(**tin)
        r = {k: getattr(o, k).float().cpu().numpy() for k in outputs}
        return r, time.perf_counter() - t0

    ref, data["torch_fp32_s"] = torch_run(False)
    if dev == "cuda":
        data["torch_fp32_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    fg = float((ref["pred_masks"] > 0).mean())
    data["reference"] = {"mask_fg_fraction": fg, "score_std": float((1 / (1 + np.exp(-ref["pred_logits"]))).std()),
                         "note": "random weights, not calibrated: a check of arithmetic, not of skill"}
    log(f"parity: torch fp32 forward {data['torch_fp32_s']:.2f} s; mask foreground {fg:.3f}")

    def jalias_run(dtype: str) -> tuple[dict, dict]:
        model = Sam3(cfg, params, dtype=dtype, prompt_mode="hf")
        before = _jax_peak()
        t0 = time.perf_counter()
        o = model(px, ids, mask)
        jax.block_until_ready(o)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        o = model(px, ids, mask)
        jax.block_until_ready(o)
        second = time.perf_counter() - t0
        r = {k: np.asarray(o[k], np.float32) for k in outputs}
        info = {"first_call_s": first, "second_call_s": second, "compile_s": max(first - second, 0.0),
                "attention": str(model.attention), "peak_gib": _jax_peak(), "peak_gib_before": before}
        del model, o
        return r, info

    with jax.default_matmul_precision("highest"):
        got, info = jalias_run("float32")
    s = _stats(got, ref)
    s["pass"] = bool(all(s[k]["max_abs"] <= 1e-4 for k in ("pred_logits", "presence_logits", "pred_boxes"))
                     and all(s[k]["max_abs"] <= 1e-3 for k in ("pred_masks", "semantic_seg"))
                     and s["mask_iou"]["min"] >= 0.99)
    s["bounds"] = "tests/test_parity.py: scores/presence/boxes max abs <= 1e-4, mask logits <= 1e-3, mask IoU >= 0.99"
    data["fp32"] = {**s, "jalias": info}
    log(f"parity fp32: pass={s['pass']} pred_logits {s['pred_logits']['max_abs']:.2e}, masks "
        f"{s['pred_masks']['max_abs']:.2e}, min mask IoU {s['mask_iou']['min']:.4f}; compile {info['compile_s']:.1f} s")
    write(out, data)

    tb, data["torch_bf16_autocast_s"] = torch_run(True)
    got, info = jalias_run("bfloat16")
    s = _stats(got, ref)
    yard = _stats(tb, ref)
    ours = float(np.abs(got["pred_masks"] - ref["pred_masks"]).mean())
    theirs = float(np.abs(tb["pred_masks"] - ref["pred_masks"]).mean())
    s["mask_logit_mean_abs_err"] = {"jalias_bf16": ours, "torch_bf16_autocast": theirs}
    s["pass"] = bool(s["mask_iou"]["mean"] >= 0.97 and s["mask_iou"]["min"] >= 0.85 and ours <= 2 * theirs)
    s["bounds"] = "test_bf16_masks_match_fp32_torch: mean mask IoU >= 0.97, worst >= 0.85, error <= 2x torch bf16's"
    data["bf16"] = {**s, "jalias": info, "torch_bf16_vs_fp32": yard}
    log(f"parity bf16: pass={s['pass']} mean mask IoU {s['mask_iou']['mean']:.4f} (torch bf16: "
        f"{yard['mask_iou']['mean']:.4f}), logit err {ours:.4f} vs torch-bf16 {theirs:.4f}")
    write(out, data)
    return data


def _jax_peak() -> float | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None


# ---- summary ------------------------------------------------------------------------------------------------------
def summary_step(out_dir: str, small: bool) -> dict:
    """OUT/summary.json: every step's headline numbers, MFU of jalias fp32/bf16 against the MEASURED bf16 matmul
    rate (model FLOPs of text + detect from throughput.py's XLA cost analysis / the timed pass), and the issue's
    GPU targets (>= 50x torch-seed, >= 3x torch-opt, >= 40% MFU in bf16)."""
    d = Path(out_dir)
    read = lambda n: json.loads((d / n).read_text()) if (d / n).exists() else None  # noqa: E731
    status = read("status.json") or {}
    env, mm, par, tp = read("env.json"), read("matmul.json"), read("parity.json"), read("throughput.json")
    s = {"small": small, "status": status, "device": (env or {}).get("jax_device"),
         "nvidia_smi": (env or {}).get("nvidia_smi"), "matmul_tflops_bf16": (mm or {}).get("tflops_bf16")}
    if par:
        s["parity"] = {p: {"pass": par[p].get("pass"), "min_mask_iou": par[p]["mask_iou"]["min"],
                           "mean_mask_iou": par[p]["mask_iou"]["mean"],
                           "pred_logits_max_abs": par[p]["pred_logits"]["max_abs"],
                           "compile_s": par[p]["jalias"]["compile_s"], "peak_gib": par[p]["jalias"]["peak_gib"]}
                       for p in ("fp32", "bf16") if p in par}
    if tp:
        st = tp["stages"]
        useful = tp["candidates"] * st["flops_text_per_candidate"]
        per_eval = st["flops_detect_per_eval"]
        rate = (mm or {}).get("tflops_bf16")
        mfu = {}
        for key in ("jalias", "jalias_bf16"):
            if key in tp["seconds"]:
                tfl = (useful + tp["evals"][key] * per_eval) / tp["seconds"][key] / 1e12
                mfu[key] = {"tflops": tfl, "mfu_vs_measured_bf16": tfl / rate if rate else None}
        s["throughput"] = {k: tp.get(f"{k}_cps") for k in ("torch_seed", "torch_opt", "jalias", "jalias_bf16")}
        s["ratios"] = tp["ratios"]
        s["mfu"] = mfu
        s["peak_memory_gib"] = tp["peak_memory_gib"]
        s["compile_or_warmup_s"] = tp["warmup_s"]
        s["setup_s"] = tp["setup_s"]
        s["agreement"] = tp["agreement"]
        best = max((tp.get(f"{k}_cps") or 0, k) for k in ("jalias", "jalias_bf16"))[1]
        r = tp["ratios"]
        s["targets"] = {
            "vs_torch_seed>=50x": r.get(f"{best}_vs_torch_seed"),
            "vs_torch_opt>=3x": r.get(f"{best}_vs_torch_opt"),
            "bf16_mfu>=40%": mfu.get("jalias_bf16", {}).get("mfu_vs_measured_bf16"),
            "best": best,
            "met": {"seed": (r.get(f"{best}_vs_torch_seed") or 0) >= 50, "opt": (r.get(f"{best}_vs_torch_opt") or 0) >= 3,
                    "mfu": (mfu.get("jalias_bf16", {}).get("mfu_vs_measured_bf16") or 0) >= 0.4},
        }
    write(d / "summary.json", s)
    print(json.dumps(s, indent=1, default=str))
    return s


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("step", choices=["env", "matmul", "parity", "summary"])
    ap.add_argument("out", help="output JSON file (summary: the output folder)")
    ap.add_argument("--small", action="store_true", help="tiny sizes (CPU dry run)")
    a = ap.parse_args(argv)
    {"env": env_step, "matmul": matmul_step, "parity": parity_step, "summary": summary_step}[a.step](a.out, a.small)


if __name__ == "__main__":
    main()
