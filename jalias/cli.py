"""The `jalias` command: demo, search, eval, export, convert, train, adapt (thin wrappers over jalias.run /
jalias.weights / jalias.adapt).

Heavy modules (jax, the model) are imported inside the commands so that `jalias --help` stays instant.
Errors print one line on stderr ("error: ...") and exit with status 1; Ctrl-C / SIGTERM exit with 130 after the
search state has been saved (continue with --resume).
"""

from __future__ import annotations

import functools
import inspect
import json
import signal
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Search SAM3 prompt-token aliases that segment out-of-distribution objects better than "
                       "their natural label.")

METHOD_HELP = "search method: gcg | soft | local | evolution"


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"jalias {version('jalias')}")
        except PackageNotFoundError:
            typer.echo("jalias (not installed: run pip install -e .)")
        raise typer.Exit()


@app.callback()
def _root(_version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                        help="print the installed version and exit")) -> None:
    """Search SAM3 prompt-token aliases that segment out-of-distribution objects better than their natural label."""


def _fail(msg: str, code: int = 1):
    typer.echo(f"error: {' '.join(str(msg).split())}", err=True)
    raise typer.Exit(code)


def _sigterm_as_interrupt():
    """SIGTERM -> KeyboardInterrupt, so a killed search saves its state like Ctrl-C does."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not in the main thread (e.g. some test runners)
        pass


def _handled(fn: Callable) -> Callable:
    """One-line errors and clean exit codes for a command."""
    resumable = "resume" in inspect.signature(fn).parameters  # only those commands can be told to --resume

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .run.io import RunError

        _sigterm_as_interrupt()
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            typer.echo("interrupted: progress saved; run the same command with --resume to continue" if resumable
                       else "interrupted", err=True)
            raise typer.Exit(130)
        # OSError: e.g. a disk full while writing (the last state written stays; --resume continues after the fix)
        except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, OSError, RunError,
                ImportError) as e:
            _fail(str(e))
    return wrapper


def _categories(value: Optional[str]) -> Optional[list[str]]:
    if value is None or value.strip().lower() in ("", "all"):
        return None
    cats = [c.strip() for c in value.split(",") if c.strip()]
    if not cats:
        raise ValueError(f"no category names in --categories {value!r}")
    twice = sorted({c for c in cats if cats.count(c) > 1})
    if twice:
        raise ValueError(f"category {twice[0]!r} is named twice in --categories")
    return cats


def _options(items: Optional[List[str]]) -> dict:
    """["search_width=64", "keep_if_better=true"] -> {"search_width": 64, "keep_if_better": True}."""
    out = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[key.strip()] = value
    return out


def _tokens(value: str) -> list[int]:
    try:
        return [int(t) for t in value.replace(" ", "").split(",") if t]
    except ValueError:
        raise ValueError(f"--tokens expects comma-separated integer ids, got {value!r}") from None


def _console():
    from rich.console import Console

    console = Console()
    # piped / captured output: rich would wrap tables at 80 columns; a wide table is easier to read and grep
    return console if console.is_terminal else Console(width=160)


def _print_results(summary: dict, out: Path, title: str) -> None:
    from .run.progress import results_table

    console = _console()
    console.print(results_table(summary, title))
    report = out / "report.html"
    if report.exists():
        console.print(f"report: {report}")
    console.print(f"results: {out / 'all_results.json'}")


@app.command()
@_handled
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="run directory"),
    budget: int = typer.Option(1000, help="candidate-image evaluations per concept"),
    method: str = typer.Option("gcg", help=METHOD_HELP),
    seed: int = typer.Option(0, help="search and dataset seed"),
    resume: bool = typer.Option(False, help="continue an interrupted demo run"),
    weights: str = typer.Option("small", help="small: the trained small SAM3 (weights/small) on OOD concepts of its "
                                              "procedural world; another `jalias train` checkpoint likewise; tiny: "
                                              "the embedded random model on texture concepts (pipeline check only)"),
    no_progress: bool = typer.Option(False, "--no-progress", help="no progress bar"),
):
    """End to end on an embedded model and generated out-of-distribution concepts (no downloads)."""
    from .run.api import demo as run_demo

    summary = run_demo(out=out, budget=budget, method=method, seed=seed, resume=resume, weights=weights,
                       progress=not no_progress, note=lambda m: typer.echo(f"note: {m}", err=True))
    _print_results(summary, out, f"jalias demo ({method}, {budget} evaluations per concept)")


ADAPTER_HELP = ("adapter directory written by `jalias adapt` (or a folder of them); repeat to compose several "
                "(one embed adapter per label)")


DTYPE_HELP = ("compute dtype: float32 | bfloat16 (default float32 on every backend, as default_dtype() says: bf16 "
              "is not yet measured equal to fp32 on a GPU; a resumed run keeps its dtype)")
PROMPT_MODE_HELP = ("which SAM3 to reproduce: meta (Meta's own: geometry CLS token on every text prompt, token id 0 "
                    "masked) | hf (transformers' Sam3Model); default meta when the checkpoint has the geometry "
                    "encoder (HF and Meta checkpoints do), else hf; a resumed run keeps its mode.")


@app.command()
@_handled
def search(
    weights: str = typer.Option(..., help="checkpoint: converted Orbax dir, HF dir, .safetensors, .pt, or 'tiny'"),
    annotations: Path = typer.Option(..., help="COCO instances JSON"),
    images: Path = typer.Option(..., help="folder of the images named in the annotations"),
    categories: str = typer.Option("all", help="comma-separated category names, or 'all'"),
    method: str = typer.Option("gcg", help=METHOD_HELP),
    budget: int = typer.Option(10_000, help="candidate-image evaluations per category"),
    length: int = typer.Option(4, help="alias length in tokens"),
    max_images: int = typer.Option(10, help="positive images per category (and size of the negative pool)"),
    heldout: float = typer.Option(0.3, help="fraction of images held out of the search (0: none)"),
    negatives: int = typer.Option(0, help="images without the category added per category (GT empty)"),
    seed: int = typer.Option(0, help="search and split seed"),
    out: Path = typer.Option(Path("runs/search"), help="run directory"),
    resume: bool = typer.Option(False, help="continue the run in --out (same settings)"),
    overwrite: bool = typer.Option(False, help="replace a previous run in --out"),
    chunk_size: Optional[int] = typer.Option(None, help="candidates per compiled step (default: from memory)"),
    init: str = typer.Option("random", help="start from 'random' tokens or the 'label'"),
    negative_weight: float = typer.Option(0.5, help="weight of false detections on negative images"),
    dtype: Optional[str] = typer.Option(None, help=DTYPE_HELP),
    grad_batch: int = typer.Option(1, help="images per step of the gradient's image loop (gcg, soft; vmapped: "
                                   "faster on a GPU, more memory; halved on device out-of-memory)"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="method option KEY=VALUE, e.g. search_width=64"),
    checkpoint_every: float = typer.Option(5.0, help="seconds between search-state checkpoints"),
    no_progress: bool = typer.Option(False, "--no-progress", help="no progress bar"),
    prompt_mode: Optional[str] = typer.Option(None, "--prompt-mode", help=PROMPT_MODE_HELP),
    adapter: Optional[List[str]] = typer.Option(None, "--adapter", help=ADAPTER_HELP),
    skip_bad_images: bool = typer.Option(False, "--skip-bad-images", help="leave unreadable images out (listed "
                                         "in the report) instead of stopping before the search"),
):
    """Search an alias for each category of a COCO dataset (label baseline, search, held-out evaluation)."""
    from .run.api import search_dataset

    summary = search_dataset(
        weights, annotations, images, categories=_categories(categories), method=method, budget=budget,
        length=length, max_images=max_images, heldout=heldout, negatives=negatives, seed=seed, out=out,
        resume=resume, overwrite=overwrite, chunk_size=chunk_size, init=init, negative_weight=negative_weight,
        dtype=dtype, options=_options(set_), checkpoint_every=checkpoint_every, progress=not no_progress,
        prompt_mode=prompt_mode, adapters=adapter, skip_bad_images=skip_bad_images, grad_batch=grad_batch)
    _print_results(summary, out, f"jalias search ({method}, {budget} evaluations per category)")


@app.command("eval")
@_handled
def eval_(
    weights: str = typer.Option(..., help="checkpoint (as for search)"),
    annotations: Path = typer.Option(..., help="COCO instances JSON"),
    images: Path = typer.Option(..., help="images folder"),
    prompt: Optional[str] = typer.Option(None, help="text prompt"),
    tokens: Optional[str] = typer.Option(None, help="comma-separated content token ids, e.g. 1234,567"),
    categories: str = typer.Option("all", help="comma-separated category names, or 'all'"),
    max_images: Optional[int] = typer.Option(None, help="images per category (default: all)"),
    negatives: int = typer.Option(0, help="negative images per category"),
    chunk_size: Optional[int] = typer.Option(None, help="candidates per compiled step"),
    dtype: Optional[str] = typer.Option(None, help=DTYPE_HELP),
    json_out: Optional[str] = typer.Option(None, "--json", help="also write the results as JSON to this file "
                                                                "('-': print JSON instead of the table)"),
    prompt_mode: Optional[str] = typer.Option(None, "--prompt-mode", help=PROMPT_MODE_HELP + " Evaluate an alias "
                                              "in the mode its search ran in (run.json settings.prompt_mode)."),
    adapter: Optional[List[str]] = typer.Option(None, "--adapter", help=ADAPTER_HELP),
):
    """IoU of one prompt (text or token ids) per image, and the mean, for each category."""
    from rich.table import Table

    from .run.api import evaluate_prompt
    from .run.io import fmt, write_json_atomic

    if (prompt is None) == (tokens is None):
        raise ValueError("give exactly one of --prompt or --tokens")
    if json_out not in (None, "-") and Path(json_out).is_dir():  # checked before the evaluation, not after it
        raise ValueError(f"--json {json_out} is a directory; give a file path")
    res = evaluate_prompt(weights, annotations, images, prompt=prompt,
                          tokens=_tokens(tokens) if tokens is not None else None,
                          categories=_categories(categories), max_images=max_images, negatives=negatives,
                          chunk_size=chunk_size, dtype=dtype, prompt_mode=prompt_mode, adapters=adapter)
    if json_out == "-":
        typer.echo(json.dumps(res, indent=1))
        return
    table = Table(title=f"prompt {res['prompt']!r} (ids {res['ids']}, prompt mode {res['prompt_mode']})")
    for col in ("category", "image", "IoU"):
        table.add_column(col, justify="right" if col == "IoU" else "left")
    for name, c in res["categories"].items():
        for im in c["images"]:
            table.add_row(name, im["image_id"] + (" (negative)" if im["negative"] else ""), f"{im['iou']:.3f}")
        table.add_row(name, "[b]mean[/b]", f"[b]{fmt(c['mean_iou'])}[/b]", end_section=True)
    table.add_row("[b]all[/b]", "mean of category means", f"[b]{fmt(res['mean_iou'])}[/b]")
    _console().print(table)
    if json_out:
        write_json_atomic(json_out, res)


@app.command()
@_handled
def export(
    run_dir: Path = typer.Argument(..., help="a run directory written by `jalias search` or `jalias demo`"),
    out: Optional[Path] = typer.Option(None, help="output folder (default RUN_DIR/export)"),
    no_pred_masks: bool = typer.Option(False, "--no-pred-masks", help="leave out every query's mask logits"),
    prompt_mode: Optional[str] = typer.Option(None, "--prompt-mode", help="meta | hf (default: the mode the "
                                              "run searched in)"),
    batch: int = typer.Option(1, help="images per image-encoder call (1: the run's numbers to the last bit; more "
                              "is faster on a GPU; halved on device out-of-memory)"),
):
    """Teacher targets of a run: alias ids, text features, and per-image masks / logits (.npz + index.json)."""
    from .run.export import export_run

    if not (run_dir / "run.json").exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no run.json)")
    path = export_run(run_dir, out, full_masks=not no_pred_masks, prompt_mode=prompt_mode, batch=batch)
    index = json.loads(path.read_text())
    typer.echo(f"exported {len(index['categories'])} categories to {path.parent} (index: {path})")


@app.command()
@_handled
def convert(
    src: str = typer.Argument(..., help="HF dir, .safetensors, .bin, Meta sam3.pt, or a jalias checkpoint"),
    dst: Path = typer.Argument(..., help="output checkpoint directory"),
    dtype: str = typer.Option("float32", help="stored dtype: float32 | bfloat16"),
    overwrite: bool = typer.Option(False, help="replace DST if it exists"),
    config: Optional[Path] = typer.Option(None, help="the model's config.json, when SRC has none beside it"),
):
    """Convert a SAM3 checkpoint to a jalias (Orbax) checkpoint."""
    from .weights.convert import convert_command

    convert_command(src, str(dst), dtype=dtype, overwrite=overwrite, config=None if config is None else str(config))


@app.command()
@_handled
def train(
    config: str = typer.Option("small", help="model config: small | tiny (tests)"),
    steps: Optional[int] = typer.Option(None, help="stage-1 steps (default: TrainConfig's recipe, 6000)"),
    stage2_steps: Optional[int] = typer.Option(None, help="stage-2 steps (default: TrainConfig's recipe, 1500)"),
    seed: int = typer.Option(0, help="data and init seed"),
    out: Path = typer.Option(Path("runs/train-small"), help="training directory (state, final/, metrics.json)"),
    resume: bool = typer.Option(False, help="continue the run in --out after a kill or Ctrl-C"),
    dtype: str = typer.Option("bfloat16", help="stored dtype of out/final: bfloat16 | float32"),
    eval_images: int = typer.Option(8, help="evaluation images per concept for the final skill measurement"),
    no_progress: bool = typer.Option(False, "--no-progress", help="no progress bar"),
):
    """Train the small SAM3 on the procedural world (deterministic from --seed) and write out/final."""
    from .train import TrainConfig, TrainError
    from .train.checkpoint import train_checkpoint

    given = {"steps": steps, "stage2_steps": stage2_steps}
    recipe = TrainConfig(config=config, seed=seed, **{k: v for k, v in given.items() if v is not None})
    try:
        m = train_checkpoint(recipe, out=out, resume=resume, progress=not no_progress, dtype=dtype,
                             eval_images=eval_images, log=lambda s: typer.echo(s, err=True))
    except TrainError as e:
        raise ValueError(str(e)) from None
    s = m["skill"]
    typer.echo(f"wrote {out / 'final'} ({m['param_count']:,} params, {dtype}); "
               f"in-distribution label IoU {s['id_iou']:.3f}, empty on negatives {s['id_empty_rate']:.2f}, "
               f"OOD label IoU {s['ood_iou']:.3f} (metrics: {out / 'metrics.json'})")


@app.command()
@_handled
def adapt(
    run_dir: Path = typer.Argument(..., help="a run directory written by `jalias search` or `jalias demo`"),
    kind: str = typer.Option("embed", help="embed (replacement embeddings of the label's tokens) | lora"),
    length: str = typer.Option("alias", help="embed: how many learned embeddings replace the label: alias (as "
                                              "many as the alias has tokens) | label (one per label token) | N"),
    teacher: str = typer.Option("alias", help="alias (distil the found alias) | gt (the ground-truth masks)"),
    steps: Optional[int] = typer.Option(None, help="optimiser steps per category (default 200)"),
    lr: Optional[float] = typer.Option(None, help="learning rate (default 0.05 embed, 0.005 lora)"),
    rank: int = typer.Option(4, help="LoRA rank"),
    targets: str = typer.Option("text", help="LoRA targets: text | text+fusion | comma-separated fnmatch "
                                             "patterns over Dense module paths"),
    preserve: float = typer.Option(100.0, help="lora: weight of keeping other prompts' text features in place "
                                               "(the label's words in other company, random words): less collateral "
                                               "damage; 0: off"),
    states: float = typer.Option(100.0, help="lora, alias teacher: weight of pulling the label's decoder query "
                                             "states and fused image tokens to the alias's on each image; 0: off"),
    categories: str = typer.Option("all", help="comma-separated category names, or 'all'"),
    out: Optional[Path] = typer.Option(None, help="output folder (default RUN_DIR/adapters/KIND-TEACHER)"),
    resume: bool = typer.Option(False, help="keep finished adapters, continue an interrupted one"),
    overwrite: bool = typer.Option(False, help="retrain the chosen categories' finished adapters in the folder"),
    no_progress: bool = typer.Option(False, "--no-progress", help="no progress bar"),
):
    """Train adapters so the natural label does what the run's alias does (or what the ground truth says)."""
    from .adapt import AdaptConfig
    from .adapt.config import parse_length
    from .run.adapt import adapt_run

    summary = adapt_run(run_dir, kind=kind, teacher=teacher, steps=steps, lr=lr, out=out, resume=resume,
                        categories=_categories(categories),
                        config=AdaptConfig(rank=rank, alpha=float(rank), targets=targets, w_preserve=preserve,
                                           w_states=states, length=parse_length(length)),
                        progress=not no_progress, log=lambda m: typer.echo(m, err=True), overwrite=overwrite)
    from rich.table import Table

    from .run.io import fmt

    table = Table(title=f"jalias adapt ({summary['kind']}, {summary['teacher']} teacher; held-out label IoU)")
    for col in ("category", "label", "before", "after", "alias", "loss"):
        table.add_column(col, justify="left" if col in ("category", "label") else "right")
    for r in summary["categories"]:
        table.add_row(r["category"], r["label"], fmt(r["label_before"]), fmt(r["label_after"]), fmt(r["alias"]),
                      f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}")
    _console().print(table)
    typer.echo(f"adapters: {Path(summary['categories'][0]['adapter']).parent if summary['categories'] else '-'}")


def main() -> None:
    """The `jalias` console entry point: `app`, with Click's usage errors (a missing or unknown option or command)
    as one `error:` line and exit 2 instead of a framed block."""
    from typer._click import exceptions as cx  # typer (pinned) vendors its own click

    try:
        code = app(prog_name="jalias", standalone_mode=False)
    except cx.NoArgsIsHelpError as e:  # `jalias` alone: the help, as before
        typer.echo(e.ctx.get_help() if e.ctx else "usage: jalias COMMAND [ARGS]...")
        sys.exit(2)
    except cx.UsageError as e:
        path = e.ctx.command_path if e.ctx else "jalias"
        typer.echo(f"error: {e.format_message()} (see `{path} --help`)", err=True)
        sys.exit(2)
    except cx.ClickException as e:
        typer.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # outside a command (a command's own Ctrl-C is handled by `_handled`)
        typer.echo("interrupted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
