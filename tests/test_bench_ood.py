"""The OOD benchmark's verdict bookkeeping, and one end-to-end run of the script on the embedded tiny model."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

_dir = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(_dir))
_spec = importlib.util.spec_from_file_location("ood_bench", _dir / "ood.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _concept(name, label_heldout, gains, evals):
    return {"concept": name, "label_iou": 0.1, "label_heldout_iou": label_heldout,
            "runs": {m: [{"heldout_gain": g, "heldout_iou": label_heldout + g, "evals_to_gain": e,
                          "history": [[e or 10, 0.0, 0.1 + g]], "wall_s": 1.0}]
                     for m, g, e in zip(("evolution-original", "gcg"), gains, evals)}}


def test_verdict_counts_concepts_with_gain_and_compares_evaluations():
    concepts = [_concept("a", 0.1, (0.1, 0.4), (None, 500)), _concept("b", 0.2, (0.35, 0.5), (8000, 400)),
                _concept("c", 0.1, (0.0, 0.1), (None, None))]
    s = bench.summarise(concepts, ["evolution-original", "gcg"], [1000])
    t = s["target"]
    assert (t["concepts_with_gain"], t["of"], t["half_met"]) == (2, 3, True)
    assert concepts[0]["best_method"] == "gcg" and concepts[1]["best_heldout_gain"] == pytest.approx(0.5)
    # medians count "not reached" as infinite: gcg 500 (2 of 3 reached), evolution-original not reached
    assert t["best_method"] == "gcg" and t["best_evals"] == 500 and t["evolution_original_evals"] is None
    assert s["methods"]["gcg"]["reached_gain"] == "2/3"


def test_script_runs_end_to_end_on_the_tiny_model(tmp_path):
    out = tmp_path / "ood.json"
    bench.main(["--weights", "tiny", "--concepts", "tomato", "--methods", "evolution-original,gcg",
                "--budgets", "30,60", "--seeds", "0", "--quick", "--json", str(out), "--out", str(tmp_path)])
    res = json.loads(out.read_text())
    assert [c["concept"] for c in res["concepts"]] == ["tomato"]
    assert set(res["methods"]) == {"evolution-original", "gcg"}
    for m in res["methods"].values():
        assert set(m) >= {"heldout_gain", "evals_to_gain"}
    run = res["concepts"][0]["runs"]["gcg"][0]
    assert run["evals"] <= 60 and run["heldout_gain"] == pytest.approx(
        run["heldout_iou"] - res["concepts"][0]["label_heldout_iou"])
    assert (tmp_path / "ood.png").is_file()
