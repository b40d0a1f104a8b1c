"""One table of measured search settings: the CLI, the Python API, the demo and the benchmark all read it."""

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest

from jalias.run.rundir import RunSettings
from jalias.search import METHODS, GCGConfig, SearchConfig
from jalias.search.base import coerce_config
from jalias.search.defaults import MEASURED, measured

ROOT = Path(__file__).resolve().parents[1]


def _planted():
    spec = importlib.util.spec_from_file_location("planted_bench", ROOT / "benchmarks" / "planted.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["planted_bench"] = mod
    spec.loader.exec_module(mod)
    return mod


def _settings(**kw) -> RunSettings:
    return RunSettings(weights="w", annotations="a.json", images="img", **kw)


def _fields(cfg) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg).items()}


def test_benchmark_rows_are_the_measured_table():
    planted = _planted()
    for name in METHODS:
        assert planted.SETTINGS[name][0] == name
        assert planted.SETTINGS[name][1] is MEASURED[name]


@pytest.mark.parametrize("method", list(METHODS))
def test_every_entry_point_gets_the_measured_settings(method):
    cls = METHODS[method].config_cls
    want = cls.from_dict(measured(method))
    # run_search with no config or a dict of common fields, and the CLI / search_dataset / demo settings object
    assert _fields(coerce_config(None, cls, method)) == _fields(want)
    assert _fields(coerce_config(SearchConfig(), cls, method)) == _fields(want)
    run_cfg = _fields(_settings(method=method, budget=10_000).search_config([]))
    for key, value in _fields(want).items():
        assert run_cfg[key] == value, key


def test_measured_gcg_is_not_nanogcgs_llm_setting():
    cfg = coerce_config(None, GCGConfig, "gcg")
    assert (cfg.search_width, cfg.topk, cfg.patience) == (64, 64, 20)
    assert (cfg.halving.mode, cfg.halving.min_images, cfg.halving.eta) == ("on", 1, 8.0)
    assert (GCGConfig().search_width, GCGConfig().topk) == (512, 256)  # the class keeps the un-tuned base values


def test_options_override_measured_and_explicit_instances_stay():
    cfg = coerce_config({"search_width": 16}, GCGConfig, "gcg")
    assert cfg.search_width == 16 and cfg.topk == 64
    assert coerce_config(GCGConfig(), GCGConfig, "gcg").search_width == 512
    run_cfg = _settings(method="gcg", options={"topk": 8}).search_config([])
    assert (run_cfg.topk, run_cfg.search_width) == (8, 64)


def test_table_is_read_only():
    with pytest.raises(TypeError):
        MEASURED["gcg"]["topk"] = 1
    copy = measured("gcg")
    copy["halving"]["eta"] = 2.0
    assert MEASURED["gcg"]["halving"]["eta"] == 8.0


@pytest.mark.parametrize("options, message", [
    ({"search_width": "abc"}, "option search_width expects int, got 'abc'"),
    ({"keep_if_better": 1}, "option keep_if_better expects bool, got 1"),
    ({"max_steps": 2.5}, "option max_steps expects int or null, got 2.5"),
    ({"topk": True}, "option topk expects int, got True"),
])
def test_option_types_are_checked(options, message):
    with pytest.raises(ValueError) as e:
        _settings(method="gcg", options=options).validate()
    assert str(e.value) == message


def test_good_option_types_pass():
    _settings(method="gcg", options={"search_width": 8, "max_steps": None, "keep_if_better": True}).validate()
    _settings(method="soft", options={"lr": 1}).validate()


def test_dict_configs_are_type_checked_too():
    """The check lives in SearchConfig.from_dict, so run_search / coerce_config with a dict get it as well."""
    with pytest.raises(ValueError, match="option search_width expects int, got 'abc'"):
        coerce_config({"search_width": "abc"}, GCGConfig, "gcg")
    import numpy as np

    assert coerce_config({"search_width": np.int64(8)}, GCGConfig, "gcg").search_width == 8


def test_default_dtype_lives_in_one_function_read_by_every_default(monkeypatch):
    """float32 on every backend until bf16 is measured equal on a GPU (it has not been); the CLI's --dtype, the
    Python API and load_model leave dtype unset and read `default_dtype`."""
    import inspect

    import jax.numpy as jnp

    from jalias import cli
    from jalias.model import layers
    from jalias.run import api, model

    for backend in (None, "cpu", "gpu", "tpu"):
        assert layers.default_dtype(backend) == "float32"
    for fn in (api.search_dataset, api.evaluate_prompt, model.load_model):
        assert inspect.signature(fn).parameters["dtype"].default is None, fn.__name__
    for command in (cli.search, cli.eval_):
        option = inspect.signature(command).parameters["dtype"].default
        assert option.default is None and "float32 on every backend" in option.help
    monkeypatch.setattr(layers, "default_dtype", lambda backend=None: "bfloat16")  # as if bf16 were measured equal
    assert model.load_model("tiny")[0].dtype == jnp.bfloat16


def test_adapter_defaults_are_what_the_adapter_benchmark_measured():
    """`jalias adapt` (CLI and Python) and benchmarks/adapt.py's --quick and --trained presets use one
    AdaptConfig: the same steps, LoRA preservation weight, embed length and feature weight that RESULTS.md
    reports."""
    import inspect

    from jalias.adapt import AdaptConfig
    from jalias.cli import adapt as adapt_cli

    spec = importlib.util.spec_from_file_location("adapt_bench", ROOT / "benchmarks" / "adapt.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["adapt_bench"] = bench
    spec.loader.exec_module(bench)
    cfg = AdaptConfig()
    assert bench.PRESETS["quick"]["steps"] == bench.PRESETS["trained"]["steps"] == cfg.steps
    params = inspect.signature(adapt_cli).parameters
    assert params["preserve"].default.default == cfg.w_preserve and params["steps"].default.default is None
    args = bench.parser().parse_args([])
    assert args.preserve == cfg.w_preserve and args.preserve_neighbours == cfg.preserve_neighbours
    # embed: as many rows as the alias has tokens, pulled to its prompt features (CLI, Python and benchmark)
    from jalias.adapt.config import parse_length

    assert parse_length(params["length"].default.default) == cfg.length == parse_length(args.length) == -1
    assert args.features == cfg.w_features
    # lora: pulled to the alias's detector states (CLI, Python and benchmark)
    assert params["states"].default.default == cfg.w_states == args.states == 100.0
