"""Multi-host: two local CPU processes under jax.distributed (one CPU device each).

- concepts split: each process scores its share; together they give exactly the single-process scores;
- one concept over both processes: an Engine on `jax.devices()` shards the candidate axis over both processes'
  devices, so each computes half the rows and receives the other half from its peer (a cross-process gather:
  without it the result could not be read); every process ends with exactly the single-process scores.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from jalias.engine.distributed import my_share

WORKER = textwrap.dedent("""
    import json, sys
    import jax
    import numpy as np
    from jalias.engine import Engine
    from jalias.engine.distributed import initialize, my_share
    from jalias.model import Sam3, tiny_config
    from jalias.model.init import random_params

    pid, count = initialize()
    cfg = tiny_config()
    model = Sam3(cfg, random_params(cfg, seed=3, presence_bias=2.0))
    rng = np.random.default_rng(0)
    concepts = []
    for c in range(4):  # each concept: 2 images + GT boxes, candidates shared
        ims = [rng.integers(0, 255, (40, 48, 3), dtype=np.uint8) for _ in range(2)]
        gts = [np.zeros((40, 48), bool) for _ in range(2)]
        for g in gts:
            y, x = rng.integers(0, 20, 2)
            g[y:y + 15, x:x + 20] = True
        concepts.append((c, ims, gts))
    ids = rng.integers(0, 49000, (6, 3))
    out = {}
    for c, ims, gts in my_share(concepts):
        out[c] = Engine(model, ims, gts, chunk_size=8, compilation_cache=False).score(ids).tolist()
    _, ims, gts = concepts[0]
    both = Engine(model, ims, gts, chunk_size=8, compilation_cache=False, devices=jax.devices())
    together = both.score(ids).tolist()
    json.dump({"pid": pid, "count": count, "scores": out, "together": together,
               "engine_processes": sorted({d.process_index for d in both.devices}),
               "local_devices": jax.local_device_count()}, open(sys.argv[1], "w"))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_my_share_partitions():
    items = list(range(10))
    parts = [my_share(items, p, 3) for p in range(3)]
    assert sorted(sum(parts, [])) == items
    assert parts[0] == [0, 3, 6, 9]
    with pytest.raises(ValueError, match="process id"):
        my_share(items, 3, 3)


def test_two_processes_match_single(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    single = tmp_path / "single.json"
    subprocess.run([sys.executable, str(script), str(single)], env=env, check=True, timeout=600)
    port = _free_port()
    procs = []
    for pid in range(2):
        penv = {**env, "JALIAS_COORDINATOR": f"127.0.0.1:{port}", "JALIAS_NUM_PROCESSES": "2",
                "JALIAS_PROCESS_ID": str(pid)}
        procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path / f"p{pid}.json")], env=penv))
    for p in procs:
        assert p.wait(timeout=600) == 0
    ref = json.loads(single.read_text())
    assert ref["count"] == 1 and len(ref["scores"]) == 4
    values = np.asarray(list(ref["scores"].values()))
    assert values.std() > 0.01 and (values > 0).any()  # scores carry information, not a constant
    merged = {}
    for pid in range(2):
        r = json.loads((tmp_path / f"p{pid}.json").read_text())
        assert r["pid"] == pid and r["count"] == 2 and len(r["scores"]) == 2
        merged.update(r["scores"])
        # one engine spanning both processes (one device each) gives every process all the single-process rows
        assert r["engine_processes"] == [0, 1] and r["local_devices"] == 1
        np.testing.assert_array_equal(np.asarray(r["together"]), np.asarray(ref["scores"]["0"]))
    assert sorted(merged) == sorted(ref["scores"])
    for k, v in ref["scores"].items():
        np.testing.assert_array_equal(np.asarray(merged[k]), np.asarray(v))
