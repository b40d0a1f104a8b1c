"""Atomic file writes shared by every stage (weights, train, adapt, run): readers see the old file or the new one,
never a partial one, even if the process dies mid-write."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

# Test hook (tests/test_faults.py): "N" or "N:TEXT" -> the process kills itself with SIGKILL in the middle of its
# Nth atomic write (counting writes to paths containing TEXT): the temp file is written, the target not replaced.
KILL_IN_WRITE_ENV = "JALIAS_TEST_SIGKILL_IN_WRITE"
_hooked_writes = 0


def check_out_folder(path: str | os.PathLike, name: str = "--out") -> None:
    """FileExistsError when an output folder's path holds a file (checked before any work is done)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{name} {path} exists and is not a directory")


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> None:
    """Write JSON to a temp file beside `path` (.NAME.tmp-PID), fsync, then os.replace. On any error (e.g. a
    full disk: OSError ENOSPC) the temp file is removed and `path` keeps its previous content."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, indent=indent)  # before any file is touched: a value JSON cannot hold changes nothing
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        _write_file(tmp, text)
        _kill_hook(path)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_file(path: Path, text: str) -> None:
    """Write, flush and fsync one file (where a full disk shows up; tests replace it with a failing writer)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _kill_hook(path: Path) -> None:
    spec = os.environ.get(KILL_IN_WRITE_ENV)
    if not spec:
        return
    n, _, text = spec.partition(":")
    if text and text not in str(path):
        return
    global _hooked_writes
    _hooked_writes += 1
    if _hooked_writes == int(n):
        os.kill(os.getpid(), signal.SIGKILL)
