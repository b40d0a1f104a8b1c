"""Device out-of-memory during a run: shrink what the failing path uses and repeat the step.

Each path has its own memory knob:

    exact scoring   (`Engine.score`, `score_text`)                 engine.chunk_size: candidates per compiled step,
                                                                   halved down to one per device
    gradient / soft (`Engine.token_grad`, `soft_loss_and_grad`,    engine.grad_batch: images per step of the soft
                     `soft_loss`; GCG, PEZ)                        loss's (vmapped, rematerialised) image loop,
                                                                   halved down to 1
    export          (`jalias.run.export`)                          images per predict call, halved down to 1

Which path failed is read from the exception itself: the innermost of the engine methods above on its traceback
(called on this engine) names the path, and only that path's knob is halved; the other path's setting stays as
it was. An out-of-memory error raised outside those methods (e.g. in a search method's own jitted step) halves
both engine knobs that can still shrink. When the knob to shrink is already at its floor, a one-line RunError
says what was tried.
"""

from __future__ import annotations

import gc
from typing import Any, Callable

from .io import RunError

# engine method -> the engine setting its path uses (see the module docstring)
OOM_PATHS = {
    "score": "chunk_size", "score_text": "chunk_size",
    "soft_loss_and_grad": "grad_batch", "token_grad": "grad_batch", "soft_loss": "grad_batch",
}
KNOB_TEXT = {"chunk_size": "exact scoring at chunk size", "grad_batch": "the gradient with an image batch of"}
HINT = "use fewer --max-images or a smaller model"


def is_oom(e: BaseException) -> bool:
    """XLA RESOURCE_EXHAUSTED (device out of memory) or host MemoryError."""
    text = f"{type(e).__name__}: {e}"
    return isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in text or "Out of memory" in text


def oom_knobs(engine, e: BaseException) -> list[str]:
    """The engine settings to shrink after out-of-memory error `e`: [the failing path's] (OOM_PATHS, innermost
    engine method on e's traceback), or both when no engine method is on it."""
    found = None
    tb = e.__traceback__
    while tb is not None:  # outermost frame first: the last match is the innermost
        code = tb.tb_frame.f_code
        if code.co_name in OOM_PATHS and tb.tb_frame.f_locals.get("self") is engine:
            found = OOM_PATHS[code.co_name]
        tb = tb.tb_next
    return [found] if found else ["chunk_size", "grad_batch"]


def _current(engine, knob: str) -> tuple[int | None, int]:
    """(value in effect or None when the engine has no such setting, floor) of one knob."""
    if knob == "chunk_size":
        return int(engine.chunk_size), max(1, len(getattr(engine, "devices", [None])))
    value = getattr(engine, "grad_batch", None)
    if value is None:
        return None, 1
    # the engine never runs more images at once than the loss has (grad_batch above that changes nothing)
    return min(int(value), int(getattr(engine, "n_images", value))), 1


def with_oom_retry(engine, fn: Callable[[], Any], log: Callable[[str], None], what: str) -> Any:
    """Call fn(); on device out-of-memory halve the failing path's engine setting (module docstring) and call
    again; RunError (one line, with what was tried) when it cannot shrink further. fn must be safe to repeat
    (searches resume from their last checkpoint)."""
    tried: dict[str, list[int]] = {}
    while True:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - only out-of-memory is handled, the rest re-raised
            if not is_oom(e):
                raise
            knobs = oom_knobs(engine, e)
            changed = []
            for knob in knobs:  # a named path: only its knob (shrinking the other path's would not help it)
                cur, floor = _current(engine, knob)
                if cur is None:
                    continue
                tried.setdefault(knob, [cur])
                if cur > floor:
                    new = max(floor, cur // 2)
                    setattr(engine, knob, new)
                    tried[knob].append(new)
                    changed.append(f"{KNOB_TEXT[knob]} {cur} -> {new}")
            if not changed:
                raise RunError(f"out of device memory while {what}, even with {_tried_text(tried, knobs)}: "
                               f"{HINT}") from None
            log(f"out of memory while {what}; retrying with {', '.join(changed)}")
        gc.collect()  # outside the except block: the failed step's traceback (and its buffers) is gone by now


def _tried_text(tried: dict[str, list[int]], knobs: list[str]) -> str:
    parts = []
    for knob in knobs:
        values = tried.get(knob)
        if not values:
            continue
        text = {"chunk_size": f"chunk size {values[-1]}",
                "grad_batch": f"{values[-1]} image{'s' if values[-1] != 1 else ''} per gradient step (each image's "
                              "pass rematerialised)"}[knob]
        if len(values) > 1:
            text += f" (tried {', '.join(map(str, values))})"
        parts.append(text)
    return " and ".join(parts) or "the smallest settings"


def halve_on_oom(fn: Callable[[int], Any], size: int, log: Callable[[str], None], what: str,
                 unit: str = "image", per: str = "call") -> tuple[Any, int]:
    """fn(size) -> (result, the size it succeeded with), halving `size` (down to 1) on device out-of-memory; a
    one-line RunError with the sizes tried when 1 fails too. Sizes read "<size> <unit>(s) per <per>"."""
    def text(n: int) -> str:
        return f"{n} {unit}{'s' if n != 1 else ''} per {per}"

    tried = [size]
    while True:
        try:
            return fn(size), size
        except Exception as e:  # noqa: BLE001 - only out-of-memory is handled, the rest re-raised
            if not is_oom(e):
                raise
            if size <= 1:
                more = f" (tried {', '.join(map(str, tried))})" if len(tried) > 1 else ""
                raise RunError(f"out of device memory while {what}, even with {text(1)}{more}: {HINT}") from None
            size = max(1, size // 2)
            tried.append(size)
            log(f"out of memory while {what}; retrying with {text(size)}")
        gc.collect()
