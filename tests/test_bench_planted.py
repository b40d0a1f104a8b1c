"""The planted benchmark's bookkeeping: first reach, medians with 'not reached', and the target verdict."""
import importlib.util
from pathlib import Path

import pytest

_path = Path(__file__).resolve().parents[1] / "benchmarks" / "planted.py"
_spec = importlib.util.spec_from_file_location("planted_bench", _path)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_first_reach_and_best_at():
    hist = [(10, 0.1, 0.5), (50, 0.2, 0.89), (90, 0.3, 0.91), (200, 0.4, 0.95)]
    assert bench.first_reach(hist) == 90
    assert bench.first_reach(hist, 0.99) is None
    assert bench.best_at(hist, 5) == 0.0 and bench.best_at(hist, 60) == pytest.approx(0.89)
    assert bench.best_at(hist, 10_000) == pytest.approx(0.95)


def test_median_counts_not_reached_as_infinite():
    assert bench.median_or_none([100, 300, None]) == 300
    assert bench.median_or_none([100, 300, None, None]) is None  # the median run did not reach it
    assert bench.median_or_none([100, 200, 300, 400]) == 250


def row(e):
    return {"evals_to_0.9": e}


def test_target_uses_the_fastest_evolution_row():
    res = {"evolution": row(50_000), "evolution-1img": row(30_000), "gcg": row(4_000), "soft": row(None)}
    v = bench.target_verdict(res, 100_000)
    assert v["evolution_method"] == "evolution-1img" and v["best_method"] == "gcg"
    assert v["ratio"] == pytest.approx(7.5) and v["met"] is False
    v = bench.target_verdict({**res, "evolution-1img": row(None)}, 100_000)
    assert v["evolution_method"] == "evolution" and v["met"] is True and v["ratio"] == pytest.approx(12.5)


def test_target_when_evolution_never_reaches_or_is_missing():
    assert bench.target_verdict({"evolution": row(None), "gcg": row(4_000)}, 50_000)["met"] is True
    assert bench.target_verdict({"evolution": row(None), "gcg": row(6_000)}, 50_000)["met"] is None  # < 10x budget
    assert bench.target_verdict({"gcg": row(4_000)}, 50_000)["met"] is None  # nothing to compare with
    v = bench.target_verdict({"evolution": row(9_000), "gcg": row(None)}, 50_000)
    assert v["met"] is False and "no other method" in v["why"]


def test_merge_pools_runs_by_seed():
    a = [{"problem": 10, "label_iou": 0.1, "runs": {"gcg": [{"seed": 0, "v": "old"}], "soft": [{"seed": 0}]}}]
    b = [{"problem": 10, "label_iou": 0.9, "runs": {"gcg": [{"seed": 1, "v": "b1"}, {"seed": 0, "v": "new"}]}}]
    (m,) = bench.merge_runs([a, b])
    assert m["label_iou"] == 0.1 and m["runs"]["soft"] == [{"seed": 0}]
    assert m["runs"]["gcg"] == [{"seed": 0, "v": "new"}, {"seed": 1, "v": "b1"}]  # same seed replaced, new seed added
    assert a[0]["runs"]["gcg"] == [{"seed": 0, "v": "old"}]  # inputs are not modified
    with pytest.raises(SystemExit, match="different problems"):
        bench.merge_runs([a, [{"problem": 11, "runs": {}}]])
