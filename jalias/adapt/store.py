"""Adapters on disk (Orbax params + a JSON card) and the resumable training state.

    ADAPTER_DIR/adapter.json   card: {"format": "jalias.adapter", "version", "kind", "category", "label",
                               "label_ids", "teacher", "steps", "rank", "alpha", "targets", "prompt_mode",
                               "model_fingerprint", "num_params", "metrics", "config"}
    ADAPTER_DIR/params/        Orbax PyTree checkpoint of the adapter params (embed: {"rows"}; lora: one
                               {"a", "b"} per target, module paths with "/" stored as ".")
    STATE_DIR/state.json       what the state belongs to (fingerprint, label, teacher, config), step, losses
    STATE_DIR/arrays/          Orbax: {"params", "opt": flattened optimiser-state leaves}

Writes go to a temporary sibling and are renamed into place, so a kill leaves the old or the new copy; the JSON
files in it are written (and fsynced) by `jalias.atomic.write_json_atomic`.
`load_adapters(path)` takes an adapter directory or a folder of them (all composed, e.g. `jalias adapt`'s --out).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from ..atomic import write_json_atomic
from .adapters import Adapter
from .config import AdaptError

CARD = "adapter.json"
FORMAT = "jalias.adapter"
VERSION = 1


def _save_tree(path: Path, tree: Any) -> None:
    import orbax.checkpoint as ocp

    ocp.PyTreeCheckpointer().save(path, args=ocp.args.PyTreeSave(tree))


def _load_tree(path: Path) -> Any:
    import orbax.checkpoint as ocp

    ckptr = ocp.PyTreeCheckpointer()
    meta = ckptr.metadata(path)
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
    restore = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore))


def _replace_dir(tmp: Path, dst: Path) -> None:
    old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
    if dst.exists():
        os.replace(dst, old)
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)


def _encode(params: dict, kind: str) -> dict:
    tree = {k.replace("/", "."): v for k, v in params.items()} if kind == "lora" else dict(params)
    return jax.tree.map(lambda x: np.asarray(x, np.float32), tree)


def _decode(tree: dict, kind: str) -> dict:
    return {k.replace(".", "/"): v for k, v in tree.items()} if kind == "lora" else dict(tree)


def card_of(adapter: Adapter, config: dict | None = None) -> dict:
    return {"format": FORMAT, "version": VERSION, "kind": adapter.kind, "category": adapter.category,
            "label": adapter.label, "label_ids": [int(i) for i in adapter.label_ids], "teacher": adapter.teacher,
            "steps": adapter.steps, "rank": adapter.rank, "alpha": adapter.alpha, "targets": list(adapter.targets),
            "prompt_mode": adapter.prompt_mode, "model_fingerprint": adapter.fingerprint,
            "num_params": adapter.num_params, "metrics": adapter.metrics, "config": config or {}}


def save_adapter(path: str | os.PathLike, adapter: Adapter, config: dict | None = None) -> Path:
    """Write ADAPTER_DIR (layout in the module docstring), replacing an older copy; returns the path."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    _save_tree((tmp / "params").absolute(), _encode(adapter.params, adapter.kind))
    write_json_atomic(tmp / CARD, card_of(adapter, config), indent=1)
    _replace_dir(tmp, path)
    return path


def read_card(path: str | os.PathLike) -> dict:
    path = Path(path).expanduser()
    card = path / CARD
    if not card.exists():
        raise AdaptError(f"{path} is not an adapter directory (no {CARD})")
    try:
        doc = json.loads(card.read_text())
    except json.JSONDecodeError as e:
        raise AdaptError(f"{card} is not valid JSON ({e.msg}, line {e.lineno})") from None
    if doc.get("format") != FORMAT:
        raise AdaptError(f"{card} is not a jalias adapter card (format {doc.get('format')!r})")
    if int(doc.get("version", 0)) > VERSION:
        raise AdaptError(f"{card} has version {doc['version']}; this jalias reads up to {VERSION}: upgrade jalias")
    return doc


def load_adapter(path: str | os.PathLike) -> Adapter:
    """ADAPTER_DIR -> Adapter (AdaptError with one line on a missing / malformed directory)."""
    path = Path(path).expanduser()
    doc = read_card(path)
    try:
        params = _decode(_load_tree((path / "params").absolute()), doc["kind"])
    except Exception as e:  # orbax raises many types; the user needs one line
        raise AdaptError(f"cannot read the adapter params in {path / 'params'}: {type(e).__name__}") from None
    return Adapter(kind=doc["kind"], label=doc["label"], label_ids=tuple(doc["label_ids"]), params=params,
                   fingerprint=doc["model_fingerprint"], category=doc.get("category", ""),
                   teacher=doc.get("teacher", ""), steps=int(doc.get("steps", 0)), rank=int(doc.get("rank", 0)),
                   alpha=float(doc.get("alpha", 0.0)), targets=tuple(doc.get("targets", ())),
                   prompt_mode=doc.get("prompt_mode", ""), metrics=doc.get("metrics", {}))


def adapter_dirs(path: str | os.PathLike) -> list[Path]:
    """An adapter directory -> [it]; a folder of adapter directories -> them, sorted; else AdaptError."""
    path = Path(path).expanduser()
    if not path.exists():
        raise AdaptError(f"adapter path {path} does not exist")
    if (path / CARD).exists():
        return [path]
    subs = sorted(p for p in path.iterdir() if (p / CARD).exists()) if path.is_dir() else []
    if not subs:
        raise AdaptError(f"{path} holds no adapter (no {CARD} in it or in its subfolders)")
    return subs


def load_adapters(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Adapter]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    return [load_adapter(d) for p in paths for d in adapter_dirs(p)]


# ----------------------------------------------------------------------------------------------------------------
def save_state(path: Path, params: dict, opt_state: Any, meta: dict, kind: str) -> None:
    """Training state: params, optimiser state (as flattened leaves), and meta (step, losses, owner)."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    leaves = jax.tree_util.tree_leaves(opt_state)
    _save_tree((tmp / "arrays").absolute(), {"params": _encode(params, kind),
                                             "opt": {f"{i:05d}": np.asarray(x) for i, x in enumerate(leaves)}})
    write_json_atomic(tmp / "state.json", meta, indent=None)
    _replace_dir(tmp, path)


def load_state(path: Path, opt_like: Any, kind: str) -> tuple[dict, Any, dict] | None:
    """-> (params, opt_state shaped like opt_like, meta), or None when there is no state at path."""
    path = Path(path).expanduser()
    if not (path / "state.json").exists():
        return None
    meta = json.loads((path / "state.json").read_text())
    tree = _load_tree((path / "arrays").absolute())
    treedef = jax.tree_util.tree_structure(opt_like)
    leaves = [tree["opt"][k] for k in sorted(tree.get("opt", {}))]
    if len(leaves) != treedef.num_leaves:
        raise AdaptError(f"training state in {path} does not fit this adapter (start over without --resume)")
    like = jax.tree_util.tree_leaves(opt_like)
    leaves = [np.asarray(x, np.asarray(ref).dtype).reshape(np.shape(ref)) for x, ref in zip(leaves, like)]
    return _decode(tree["params"], kind), jax.tree_util.tree_unflatten(treedef, leaves), meta


def load(path: str | os.PathLike, adapter: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
         **kwargs):
    """`jalias.load`: `jalias.weights.load(path, **kwargs)` with adapters applied (an adapter directory, a folder
    of them, or a list of either); AdaptError when an adapter was trained for another model or config."""
    from ..weights.convert import load as load_weights
    from .adapters import apply_adapters

    model = load_weights(path, **kwargs)
    return apply_adapters(model, load_adapters(adapter)) if adapter is not None else model
