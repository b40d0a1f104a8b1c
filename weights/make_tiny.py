"""Regenerate weights/tiny: the tiny SAM3 config with fan-in-scaled random weights, stored in bfloat16.

    cd <repo> && python weights/make_tiny.py [DST]        # default DST: weights/tiny (replaced)

Deterministic: the params (and the fingerprint in jalias.json) are the same on every run; only the timestamps in
jalias.json / Orbax metadata change. bfloat16 storage keeps it under ~3 MB (the 49408 x 32 CLIP token table alone
is 6.3 MB in float32); `jalias.weights.load("tiny")` upcasts to float32 for compute.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from jalias.model.config import tiny_config  # noqa: E402
from jalias.model.init import random_params  # noqa: E402
from jalias.weights.convert import disk_size, save_params  # noqa: E402

SEED = 0
PRESENCE_BIAS = 2.0  # presence logit ~ +2: detections are not all suppressed by an untrained presence head


def make_tiny(dst: str | Path) -> dict:
    """Write the tiny checkpoint to `dst` (replacing it); returns its jalias.json metadata."""
    cfg = tiny_config()
    params = random_params(cfg, seed=SEED, presence_bias=PRESENCE_BIAS)
    return save_params(dst, params, cfg, dtype="bfloat16", overwrite=True)


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "tiny"
    meta = make_tiny(out)
    print(f"wrote {out}: {meta['param_count']:,} params, {meta['dtype']}, {disk_size(out) / 1e6:.2f} MB, "
          f"fingerprint {meta['fingerprint'][:16]}")
