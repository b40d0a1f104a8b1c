"""SAM3 checkpoints (Hugging Face or Meta, PyTorch formats) -> jalias Orbax checkpoints; load any of them.

Source layouts (`detect_layout`):
  "hf_dir"       a `Sam3Model` / `Sam3VideoModel` directory as `save_pretrained` / the Hub writes it: config.json plus
                 model.safetensors, a sharded model.safetensors.index.json, or pytorch_model.bin(.index.json)
  "safetensors"  one .safetensors file (HF key names); config from `config=` or a config.json beside it
  "torch_bin"    one torch-pickled HF state dict (.bin); config as for safetensors
  "meta_pt"      Meta's original sam3.pt (.pt/.pth); config from `config=` / a config.json beside it / SAM3's defaults
  "orbax"        a checkpoint written by `convert` / `save_params` (directory with jalias.json; see orbax_io)

Safetensors are read by a small built-in reader (header + np.memmap), not `safetensors.safe_open`: in
safetensors 0.8.0 `framework="numpy"` rejects bfloat16 and `framework="flax"` materialises every tensor on the
default JAX device. The memmap keeps reading lazy, so mapping holds about one copy of the weights (the output,
in the target dtype) in anonymous RAM: each tensor is cast as it is mapped and the source reference is dropped
(source pages are file-backed and reclaimable). Torch files (.bin/.pt) need torch and are loaded whole (one copy)
with `weights_only=True`. Orbax's writer then needs about 2x the output size on top, transiently (measured with
orbax-checkpoint 0.12.8: full-size SAM3, 830M params, peak ~5 GB anonymous RAM for bfloat16, ~9 GB for float32).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from ..model.config import Sam3Config, meta_config
from ..model.layers import default_dtype
from ..model.sam3 import Sam3
from . import orbax_io
from .load import as_config
from .mapping import (WeightError, _strip_prefix, _torch_shape, hf_key, param_shapes, params_to_state_dict,
                      skip_pattern, to_flax_layout)
from .meta import load_meta_checkpoint, meta_to_hf

log = logging.getLogger(__name__)

LAYOUTS = ("hf_dir", "safetensors", "torch_bin", "meta_pt", "orbax")
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}

# Bare names given to `load` / `resolve` are looked up here (first hit wins): $JALIAS_WEIGHTS, then the
# repository's weights/ folder.
WEIGHTS_ENV = "JALIAS_WEIGHTS"
REPO_WEIGHTS = Path(__file__).resolve().parents[2] / "weights"

# Convert with a progress bar only when there is enough to wait for.
_PROGRESS_MIN_PARAMS = 20_000_000

_HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                    "pytorch_model.bin.index.json")


# ---- layout detection -------------------------------------------------------------------------------------------
def resolve(src: str | os.PathLike) -> Path:
    """A path, or a bare checkpoint name ("tiny") looked up in $JALIAS_WEIGHTS and <repo>/weights."""
    path = Path(src).expanduser()
    if path.exists():
        return path
    name = str(src)
    if name and os.sep not in name and "/" not in name and not name.startswith("."):
        roots = [Path(os.environ[WEIGHTS_ENV])] if os.environ.get(WEIGHTS_ENV) else []
        for root in roots + [REPO_WEIGHTS]:
            if (root / name).exists():
                return root / name
        raise FileNotFoundError(f"no checkpoint {name!r}: not a path, and not in "
                                f"{' or '.join(str(r) for r in roots + [REPO_WEIGHTS])}")
    raise FileNotFoundError(f"checkpoint not found: {path}")


def detect_layout(src: str | os.PathLike) -> str:
    """Which of LAYOUTS `src` is (by its files and extension; contents are checked when read)."""
    path = resolve(src)
    if path.is_dir():
        if (path / "jalias.json").is_file():
            return "orbax"
        weights = [f for f in _HF_WEIGHT_FILES if (path / f).is_file()]
        has_config = (path / "config.json").is_file()
        if weights and has_config:
            return "hf_dir"
        if weights:
            raise ValueError(f"{path} has {weights[0]} but no config.json: copy the model's config.json there")
        if has_config:
            raise ValueError(f"{path} has config.json but no weights ({', '.join(_HF_WEIGHT_FILES)})")
        raise ValueError(f"{path} is not a SAM3 checkpoint directory (no config.json + model.safetensors, "
                         "no jalias.json); pass a .safetensors/.bin/.pt file directly")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix == ".bin":
        return "torch_bin"
    if suffix in (".pt", ".pth"):
        return "meta_pt"
    raise ValueError(f"cannot tell the checkpoint format of {path}: expected a directory or a "
                     ".safetensors, .bin or .pt file")


# ---- safetensors ------------------------------------------------------------------------------------------------
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_ST_MAX_HEADER = 100 * 2**20


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A .safetensors file -> {name: read-only array memory-mapped from the file} (bf16 as ml_dtypes.bfloat16).

    The header and every tensor's byte range are validated against the file size, so a truncated or corrupt file
    raises ValueError naming the file (and the tensor) instead of failing later.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"safetensors file not found: {path}")
    size = path.stat().st_size

    def corrupt(why: str) -> ValueError:
        return ValueError(f"corrupt safetensors file {path}: {why}")

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise corrupt(f"only {size} bytes")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _ST_MAX_HEADER):
            raise corrupt(f"header length {n} does not fit in the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise corrupt(f"unreadable header ({e})") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    header.pop("__metadata__", None)
    base = 8 + n
    entries = {}
    for name, info in header.items():
        try:
            dtype = np.dtype(_ST_DTYPES[info["dtype"]])
            shape = tuple(int(d) for d in info["shape"])
            start, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"bad header entry for tensor {name!r}: {info!r}") from None
        if end - start != math.prod(shape) * dtype.itemsize or start < 0:
            raise corrupt(f"tensor {name!r} byte range {start}..{end} does not match shape {shape} {dtype.name}")
        if base + end > size:
            raise corrupt(f"truncated: tensor {name!r} ends at byte {base + end}, file has {size}")
        entries[name] = (dtype, shape, start, end)
    mm = np.memmap(path, np.uint8, "r") if size > base else np.zeros(0, np.uint8)
    return {name: mm[base + s:base + e].view(dt).reshape(shape) for name, (dt, shape, s, e) in entries.items()}


def _read_sharded_safetensors(index_path: Path) -> dict[str, np.ndarray]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"corrupt safetensors index {index_path}: {e!r}") from None
    out: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        tensors = read_safetensors(index_path.parent / shard)
        for key in (k for k, s in weight_map.items() if s == shard):
            if key not in tensors:
                raise ValueError(f"{index_path} lists {key!r} in {shard}, but that shard lacks it")
            out[key] = tensors[key]
    return out


# ---- torch files ------------------------------------------------------------------------------------------------
def _read_torch(path: Path) -> dict[str, np.ndarray]:
    """Torch-pickled state dict (bare or under "model"/"state_dict") -> {key: np.ndarray}, keys unchanged."""
    if not path.is_file():
        raise FileNotFoundError(f"torch checkpoint not found: {path}")
    try:
        return load_meta_checkpoint(path)  # generic despite its name: weights_only load, unwrap, to numpy
    except ValueError as e:
        lines = str(e).splitlines()
        if len(lines) <= 1:
            raise
        raise ValueError(lines[0]) from e  # torch's unpickling errors run over several lines


def _read_torch_sharded(index_path: Path) -> dict[str, np.ndarray]:
    try:
        shards = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"corrupt torch index {index_path}: {e!r}") from None
    out: dict[str, np.ndarray] = {}
    for shard in shards:
        out.update(_read_torch(index_path.parent / shard))
    return out


def _is_meta_layout(keys) -> bool:
    """Meta's sam3.pt names its top modules backbone/transformer/segmentation_head; HF never does."""
    return any(re.match(r"^(detector\.|sam3_model\.)?(backbone|transformer|segmentation_head)\.", k) for k in keys)


def _hf_from_torch_file(path: Path) -> dict[str, np.ndarray]:
    sd = _read_torch(path)
    return meta_to_hf(sd) if _is_meta_layout(sd) else sd


# ---- reading ----------------------------------------------------------------------------------------------------
def _config_beside(path: Path, config: Any, layout: str) -> Sam3Config:
    if config is not None:
        return as_config(config)
    beside = path.parent / "config.json"
    if beside.is_file():
        return as_config(beside)
    if layout == "meta_pt":
        return meta_config()  # sam3.pt has no config; Meta ships one model size (constants from Meta's builder)
    raise ValueError(f"no config for {path}: put the model's config.json next to it, or pass it (jalias convert "
                     "--config PATH, Python config=...)")


def _orbax_config(params: dict, config: Any, src) -> Sam3Config:
    """The config of a jalias checkpoint's params. One without geometry-encoder weights (converted by an older
    jalias, or written without them, as weights/tiny) runs in "hf" prompt mode only: its config drops `geometry`."""
    cfg = as_config(config)
    if cfg.geometry is not None and "geometry_encoder" not in params:
        log.info("%s has no geometry-encoder weights (converted by an older jalias): only prompt_mode "
                 "'hf' is available; re-convert from the HF/Meta source for Meta's behaviour", src)
        cfg = dataclasses.replace(cfg, geometry=None)
    return cfg


def read_checkpoint(src: str | os.PathLike, config: Any = None) -> tuple[dict[str, np.ndarray], Sam3Config]:
    """Any source layout -> (HF-keyed state dict of numpy arrays, Sam3Config).

    config (Sam3Config, HF config, dict or path to config.json) overrides the checkpoint's own config. Arrays keep
    their stored dtype; safetensors arrays are lazy memory maps. For an Orbax checkpoint the Flax params are turned
    back into HF keys (so the result can be re-converted, e.g. to another dtype).
    """
    path = resolve(src)
    layout = detect_layout(path)
    if layout == "orbax":
        params, cfg_dict, _ = orbax_io.load(path)
        return params_to_state_dict(params), _orbax_config(params, config if config is not None else cfg_dict, path)
    if layout == "hf_dir":
        cfg = as_config(config if config is not None else path / "config.json")
        if (path / "model.safetensors").is_file():
            return read_safetensors(path / "model.safetensors"), cfg
        if (path / "model.safetensors.index.json").is_file():
            return _read_sharded_safetensors(path / "model.safetensors.index.json"), cfg
        if (path / "pytorch_model.bin").is_file():
            return _hf_from_torch_file(path / "pytorch_model.bin"), cfg
        return _read_torch_sharded(path / "pytorch_model.bin.index.json"), cfg
    cfg = _config_beside(path, config, layout)
    if layout == "safetensors":
        return read_safetensors(path), cfg
    return _hf_from_torch_file(path), cfg


# ---- mapping to Flax params -------------------------------------------------------------------------------------
def to_params(state_dict: dict[str, Any], config: Sam3Config, dtype: str = "float32",
              progress: bool = False) -> dict:
    """HF-keyed state dict -> nested Flax params of numpy arrays in `dtype` (float32 | bfloat16).

    Same contract as `mapping.state_dict_to_params` (WeightError naming the first missing, mis-shaped or
    unexpected tensor), but every check runs before any tensor is read, each tensor is cast straight to
    `dtype`, and `state_dict` is consumed (emptied) as it goes so the source can be freed tensor by tensor.
    """
    target = _np_dtype(dtype)
    shapes = _param_shapes(config)
    prefix = _strip_prefix(state_dict.keys())
    if prefix:
        for key in [k for k in state_dict if k.startswith(prefix)]:
            state_dict[key[len(prefix):]] = state_dict.pop(key)
    plan = []
    for path, shape in shapes.items():
        key, want = hf_key(path), tuple(_torch_shape(path[-1], shape))
        if key not in state_dict:
            raise WeightError(f"missing weight {key!r} (expected shape {want})")
        got = tuple(np.shape(state_dict[key]))
        if got != want:
            raise WeightError(f"weight {key!r} has shape {got}, expected {want}")
        plan.append((path, key))
    used = {key for _, key in plan}
    skip = skip_pattern(config)
    extra = sorted(k for k in state_dict if k not in used and not skip.search(k))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise WeightError(f"unexpected weight {extra[0]!r}{more}: checkpoint does not match this SAM3 config")

    total = sum(math.prod(shapes[p]) for p, _ in plan)
    params: dict = {}
    with _Progress(len(plan), progress and total >= _PROGRESS_MIN_PARAMS, "mapping tensors") as bar:
        for path, key in plan:
            src = state_dict.pop(key)
            arr = np.array(to_flax_layout(path[-1], src), dtype=target, order="C")  # always a fresh host copy
            del src
            node = params
            for p in path[:-1]:
                node = node.setdefault(p, {})
            node[path[-1]] = arr
            bar.advance()
    state_dict.clear()  # skipped (unused) tensors
    return params


class _Progress:
    """A per-tensor rich progress bar on stderr (or nothing)."""

    def __init__(self, total: int, enabled: bool, what: str):
        self.total, self.enabled, self.what = total, enabled, what
        self._bar = self._task = None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import Progress

            self._bar = Progress(console=Console(stderr=True), transient=True)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.what, total=self.total)
        return self

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.advance(self._task)

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)
        return False


@functools.lru_cache(maxsize=8)
def _param_shapes(config: Sam3Config) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Cached: the abstract init behind param_shapes takes seconds for a full-size config."""
    return param_shapes(config)


def _np_dtype(dtype: Any) -> np.dtype:
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[name]


# ---- writing ----------------------------------------------------------------------------------------------------
def save_params(dst: str | os.PathLike, params: dict, config: Sam3Config, dtype: str | None = None,
                overwrite: bool = False) -> dict:
    """Write a jalias checkpoint (Orbax params + config.json + jalias.json) atomically; returns its metadata.

    params: Flax param tree of `Sam3Module(config)` (shapes are checked); dtype: None keeps the leaves' dtype,
    else float32 | bfloat16.
    """
    cfg_dict = config.to_hf_dict()
    if Sam3Config.from_hf_dict(cfg_dict) != config:  # the stored JSON must rebuild exactly this model
        raise ValueError("config does not survive the to_hf_dict/from_hf_dict round trip; cannot save it")
    _check_tree(params, config, "params")
    return orbax_io.save(dst, params, cfg_dict, dtype=None if dtype is None else _np_dtype(dtype),
                         overwrite=overwrite)


def _check_tree(params: Mapping, config: Sam3Config, where: str) -> None:
    """WeightError unless `params` has exactly the param paths and shapes of Sam3Module(config)."""
    want = _param_shapes(config)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    have = {tuple(k.key for k in path): tuple(np.shape(leaf)) for path, leaf in flat}
    for path, shape in want.items():
        if path not in have:
            raise WeightError(f"{where}: missing param {'/'.join(path)} (shape {shape})")
        if have[path] != tuple(shape):
            raise WeightError(f"{where}: param {'/'.join(path)} has shape {have[path]}, expected {tuple(shape)}")
    extra = sorted(set(have) - set(want))
    if extra:
        raise WeightError(f"{where}: unexpected param {'/'.join(extra[0])} (and {len(extra) - 1} more)"
                          if len(extra) > 1 else f"{where}: unexpected param {'/'.join(extra[0])}")


def convert(src: str | os.PathLike, dst: str | os.PathLike, dtype: str = "float32", config: Any = None,
            overwrite: bool = False, progress: bool = True) -> Path:
    """Convert a SAM3 checkpoint (any of LAYOUTS) to a jalias Orbax checkpoint directory `dst`; returns dst.

    Every tensor is mapped and shape-checked (WeightError names the tensor) and cast to `dtype` before anything
    is written; the write itself is atomic, so on any error `dst` is not created (or, with overwrite, untouched).
    """
    target = _np_dtype(dtype)
    dst = Path(dst)
    src_path = resolve(src)
    if src_path.absolute() == dst.absolute():
        raise ValueError(f"source and destination are the same path: {dst}")
    orbax_io.check_destination(dst, overwrite)
    if not dst.absolute().parent.is_dir():
        raise FileNotFoundError(f"output folder {dst.absolute().parent} does not exist")
    state_dict, cfg = read_checkpoint(src_path, config)
    params = to_params(state_dict, cfg, target.name, progress=progress)
    del state_dict
    if progress and sum(a.size for a in jax.tree.leaves(params)) >= _PROGRESS_MIN_PARAMS:
        from rich.console import Console

        with Console(stderr=True).status(f"writing {dst}"):
            save_params(dst, params, cfg, overwrite=overwrite)
    else:
        save_params(dst, params, cfg, overwrite=overwrite)
    return dst


def disk_size(path: str | os.PathLike) -> int:
    """Bytes of all files under `path`."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def convert_command(src: str, dst: str, dtype: str = "float32", overwrite: bool = False,
                    config: str | None = None) -> str:
    """Body of `jalias convert SRC DST [--dtype float32|bfloat16] [--overwrite] [--config config.json]`: convert,
    print and return
    a one-line summary. Errors are ValueError (incl. WeightError) / FileNotFoundError / FileExistsError /
    ImportError with one-line messages, meant to be shown as they are."""
    _np_dtype(dtype)
    start = time.perf_counter()
    layout = detect_layout(src)
    if config is not None and not Path(config).expanduser().is_file():
        raise FileNotFoundError(f"config file not found: {config}")
    out = convert(src, dst, dtype=dtype, config=None if config is None else Path(config).expanduser(),
                  overwrite=overwrite, progress=True)
    meta = orbax_io.load_meta(out)
    line = (f"converted {src} ({layout}) -> {out}: {meta['param_count']:,} params, {meta['dtype']}, "
            f"{_human(disk_size(out))} on disk, {time.perf_counter() - start:.1f} s")
    print(line)
    return line


# ---- loading ----------------------------------------------------------------------------------------------------
def load(path: str | os.PathLike, dtype: str | None = None, config: Any = None, verify: bool = False,
         prompt_mode: str | None = None) -> Sam3:
    """A loaded jalias `Sam3` (same type as `from_torch`) from a path or a bare name under weights/ ("tiny").

    Accepts a converted Orbax checkpoint (fast path) or any source layout (HF dir, .safetensors, .bin, Meta .pt),
    converted in memory. dtype is the compute dtype: None -> `default_dtype()` (float32 on every backend today)
    whatever the stored dtype (bfloat16 storage is upcast); "bfloat16" computes in bf16. config overrides the checkpoint's config. Every param path/shape is
    checked against the config (WeightError names the tensor; an abstract init, seconds for full-size SAM3);
    verify=True (Orbax only) also re-hashes the params against jalias.json. prompt_mode: "meta" | "hf" | None
    (Meta's behaviour when the checkpoint has the geometry encoder, which HF and Meta checkpoints do; see Sam3).
    """
    compute = _np_dtype(default_dtype() if dtype is None else dtype)
    src = resolve(path)
    if detect_layout(src) == "orbax":
        params, cfg_dict, _ = orbax_io.load(src, verify=verify)
        cfg = _orbax_config(params, config if config is not None else cfg_dict, src)
        _check_tree(params, cfg, str(src))  # a config.json edited or not matching the params: one line, not Flax's
        if compute == np.float32:  # Sam3 only casts when computing in a narrower dtype; leaf by leaf, so no
            params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)  # full float32 host copy
    else:
        state_dict, cfg = read_checkpoint(src, config)
        params = to_params(state_dict, cfg, compute.name, progress=True)
    return Sam3(cfg, params, dtype=compute.name, prompt_mode=prompt_mode)
