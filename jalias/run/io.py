"""Small shared pieces of a run: atomic JSON files, JSON-safe values, the run log and the run's error type."""

from __future__ import annotations

import json
import math
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..atomic import write_json_atomic  # noqa: F401  (re-exported: the run's files use it)


class RunError(RuntimeError):
    """A run cannot go on (e.g. out of device memory at the smallest chunk size); the message is one line."""


def read_json(path: str | os.PathLike, what: str) -> Any:
    """Parsed JSON of `path`; FileNotFoundError / ValueError naming `what` when it is missing or corrupt."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"corrupt {what} {path}: {e}") from None


def clean(x: Any) -> Any:
    """JSON-safe copy: numpy scalars/arrays to Python, NaN/inf to None."""
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return clean(x.tolist())
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else None
    return x


def mean(xs: Sequence[float]) -> float | None:
    """Mean of xs, or None when there is nothing to average."""
    return float(np.mean(xs)) if len(xs) else None


def fmt(x: float | None) -> str:
    """An IoU for logs and tables: 3 decimals, '-' for none."""
    return "-" if x is None else f"{x:.3f}"


class RunLog:
    """Append-only timestamped log file (also the place errors are recorded); "warning: ..." lines also go to
    stderr."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, msg: str) -> None:
        stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{stamp} {msg}\n")
        if msg.startswith("warning: "):  # something the run changed without being asked: the user sees it now
            print(msg, file=sys.stderr, flush=True)


def version() -> str:
    """The installed jalias version ('unknown' in a checkout without an install)."""
    try:
        from importlib.metadata import version as _version

        return _version("jalias")
    except Exception:  # noqa: BLE001 - running from a checkout without an install
        return "unknown"


def now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")
