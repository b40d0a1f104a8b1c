"""Orbax checkpoint IO (jalias.weights.orbax_io)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jalias.weights import orbax_io
from jalias.weights.orbax_io import fingerprint, load, load_meta, save


def make_params(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "vision": {
            "layer_0": {
                "kernel": rng.standard_normal((8, 16)).astype(np.float32),
                "bias": rng.standard_normal(16).astype(np.float32),
            },
            "pos": jnp.asarray(rng.standard_normal((1, 4, 8)), dtype=jnp.bfloat16),
        },
        "text": {"embedding": rng.standard_normal((10, 8)).astype(ml_dtypes.bfloat16)},
        "ids": np.arange(5, dtype=np.int32),
    }


CONFIG = {"hidden_size": 8, "layers": [1, 2], "name": "tiny"}


def assert_same_tree(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        if isinstance(a[k], dict):
            assert_same_tree(a[k], b[k])
        else:
            x, y = np.asarray(a[k]), np.asarray(b[k])
            assert x.dtype == y.dtype and x.shape == y.shape, k
            np.testing.assert_array_equal(x.astype(np.float64), y.astype(np.float64), err_msg=k)


def test_roundtrip_float32_and_bfloat16(tmp_path):
    params = make_params()
    meta = save(tmp_path / "ckpt", params, CONFIG)
    got, config, meta2 = load(tmp_path / "ckpt", verify=True)
    assert_same_tree(params, got)
    assert isinstance(got["vision"]["pos"], np.ndarray) and got["vision"]["pos"].dtype == jnp.bfloat16
    assert config == CONFIG
    assert meta2 == meta
    assert meta["format_version"] == 1 and meta["dtype"] == "mixed"
    assert meta["param_count"] == 8 * 16 + 16 + 4 * 8 + 10 * 8 + 5
    assert meta["fingerprint"] == fingerprint(params) == fingerprint(got)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "jalias.json", "params"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp dirs left behind


def test_save_casts_floating_leaves_only(tmp_path):
    params = make_params()
    meta = save(tmp_path / "ckpt", params, CONFIG, dtype="bfloat16")
    got, _, _ = load(tmp_path / "ckpt")
    assert meta["dtype"] == "bfloat16"
    assert got["vision"]["layer_0"]["kernel"].dtype == jnp.bfloat16
    assert got["ids"].dtype == np.int32
    np.testing.assert_array_equal(
        got["vision"]["layer_0"]["kernel"], params["vision"]["layer_0"]["kernel"].astype(ml_dtypes.bfloat16)
    )


def test_fingerprint_properties():
    a, b = make_params(0), make_params(0)
    assert fingerprint(a) == fingerprint(b)
    assert len(fingerprint(a)) == 64
    # Insertion order of dict keys does not matter; values, dtypes, shapes and names do.
    reordered = {k: a[k] for k in reversed(list(a))}
    assert fingerprint(reordered) == fingerprint(a)
    b["vision"]["layer_0"]["bias"][3] += 1e-3
    assert fingerprint(b) != fingerprint(a)
    c = make_params(0)
    c["text"]["embedding"] = c["text"]["embedding"].astype(np.float32)
    assert fingerprint(c) != fingerprint(a)
    d = make_params(0)
    d["text"]["embedding2"] = d["text"].pop("embedding")
    assert fingerprint(d) != fingerprint(a)
    # Sampled mode: stable, distinct from full mode, blind to unsampled elements.
    assert fingerprint(a, sample=4) == fingerprint(make_params(0), sample=4) != fingerprint(a)
    e = make_params(0)
    e["vision"]["layer_0"]["kernel"][0, 1] += 1.0  # flat index 1: not among 4 samples of 128 (stride 32)
    assert fingerprint(e, sample=4) == fingerprint(a, sample=4)
    assert fingerprint(e) != fingerprint(a)
    with pytest.raises(ValueError, match="positive"):
        fingerprint(a, sample=0)


def test_overwrite(tmp_path):
    dst = tmp_path / "ckpt"
    save(dst, make_params(0), CONFIG)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save(dst, make_params(1), CONFIG)
    assert load(dst)[2]["fingerprint"] == fingerprint(make_params(0))
    save(dst, make_params(1), {"v": 2}, overwrite=True)
    params, config, meta = load(dst)
    assert_same_tree(params, make_params(1))
    assert config == {"v": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_failure_mid_save_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing_write_json(path, obj):
        calls.append(path.name)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(orbax_io, "_write_json", failing_write_json)
    with pytest.raises(OSError, match="simulated"):
        save(tmp_path / "ckpt", make_params(), CONFIG)
    assert calls == ["config.json"]  # the params had already been written to the temp dir
    assert list(tmp_path.iterdir()) == []


def test_failure_during_overwrite_keeps_old_checkpoint(tmp_path, monkeypatch):
    dst = tmp_path / "ckpt"
    save(dst, make_params(0), CONFIG)

    def failing_write_params(path, params):
        path.mkdir()
        (path / "partial").write_bytes(b"x")
        raise RuntimeError("killed (simulated)")

    monkeypatch.setattr(orbax_io, "_write_params", failing_write_params)
    with pytest.raises(RuntimeError, match="simulated"):
        save(dst, make_params(1), CONFIG, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    params, _, _ = load(dst, verify=True)
    assert_same_tree(params, make_params(0))


def test_save_input_errors(tmp_path):
    with pytest.raises(ValueError, match="JSON"):
        save(tmp_path / "a", make_params(), {"f": object()})
    with pytest.raises(ValueError, match="floating dtype"):
        save(tmp_path / "a", make_params(), CONFIG, dtype="int8")
    with pytest.raises(ValueError, match="no array leaves"):
        save(tmp_path / "a", {}, CONFIG)
    with pytest.raises(ValueError, match=r"\['name'\] is not a numeric array"):
        save(tmp_path / "a", {"w": np.ones(2), "name": np.array(["x"])}, CONFIG)
    with pytest.raises(FileNotFoundError, match="parent directory"):
        save(tmp_path / "no" / "such" / "dir", make_params(), CONFIG)
    assert list(tmp_path.iterdir()) == []


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no jalias checkpoint"):
        load(tmp_path / "missing")

    dst = tmp_path / "ckpt"
    save(dst, make_params(), CONFIG)
    meta_path = dst / "jalias.json"
    good_meta = meta_path.read_text()

    meta_path.write_text("{not json")
    with pytest.raises(ValueError, match="corrupt checkpoint metadata"):
        load(dst)
    meta_path.write_text(json.dumps({**json.loads(good_meta), "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99 not supported"):
        load_meta(dst)
    meta_path.write_text(json.dumps({**json.loads(good_meta), "param_count": 3}))
    with pytest.raises(ValueError, match="metadata says 3"):
        load(dst)
    meta_path.write_text(json.dumps({**json.loads(good_meta), "fingerprint": "0" * 64}))
    load(dst)  # not verified by default
    with pytest.raises(ValueError, match="fingerprint does not match"):
        load(dst, verify=True)
    meta_path.write_text(good_meta)

    (dst / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="corrupt model config"):
        load(dst)
    (dst / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json missing"):
        load(dst)
    (dst / "config.json").write_text("{}")

    import shutil

    shutil.rmtree(dst / "params")
    with pytest.raises(FileNotFoundError, match="params missing"):
        load(dst)
    (dst / "params").mkdir()
    with pytest.raises(ValueError, match="cannot restore Orbax params"):
        load(dst)


@pytest.mark.parametrize("form", ["relative", "home", "absolute"])
def test_relative_home_and_absolute_paths(tmp_path, monkeypatch, form):
    """Orbax needs absolute paths; save/load accept what a user types (README: jalias.load("weights/tiny"))."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    path = {"relative": "ckpts/a", "home": "~/ckpts/a", "absolute": str(tmp_path / "ckpts" / "a")}[form]
    params = make_params(3)
    (tmp_path / "ckpts").mkdir()
    save(path, params, CONFIG)
    assert (tmp_path / "ckpts" / "a" / "params").is_dir()
    got, config, _ = load(path, verify=True)
    assert_same_tree(params, got)
    assert load_meta(path)["fingerprint"] == fingerprint(params)


def test_damaged_params_file_is_named_before_orbax_reads_it(tmp_path):
    """save records each params file's sha256; load names the file whose bytes changed (independent check: the
    digest of the file as written, via hashlib) and a checkpoint without the record still loads."""
    import hashlib

    meta = save(tmp_path / "ckpt", make_params(), CONFIG)
    files = sorted(p for p in (tmp_path / "ckpt" / "params").rglob("*") if p.is_file())
    assert set(meta["files"]) == {f.relative_to(tmp_path / "ckpt" / "params").as_posix() for f in files}
    for f in files:
        assert meta["files"][f.relative_to(tmp_path / "ckpt" / "params").as_posix()] == \
            hashlib.sha256(f.read_bytes()).hexdigest()
    victim = max(files, key=lambda f: f.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    rel = victim.relative_to(tmp_path / "ckpt" / "params").as_posix()
    with pytest.raises(ValueError, match=f"{rel} is damaged"):
        load(tmp_path / "ckpt")
    victim.unlink()
    with pytest.raises(ValueError, match=f"{rel} is missing"):
        load(tmp_path / "ckpt")
    # an older checkpoint (no digests recorded) is read as before
    save(tmp_path / "old", make_params(), CONFIG)
    m = json.loads((tmp_path / "old" / "jalias.json").read_text())
    del m["files"]
    (tmp_path / "old" / "jalias.json").write_text(json.dumps(m))
    got, _, _ = load(tmp_path / "old", verify=True)
    assert_same_tree(make_params(), got)
