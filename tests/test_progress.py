"""The search progress bar: it moves with every charged chunk of evaluations, its ETA is evaluations left over
measured evaluations/s, and it ends at the budget however the search stops."""
import io

import numpy as np
import pytest
from rich.console import Console

from jalias.run.progress import Progress, Throughput, clock_text
from jalias.search import Budget, GCGConfig, HalvingConfig, run_search
from toy_engine import ToyEngine


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_bar_moves_per_chunk_eta_is_left_over_rate_and_ends_at_the_budget():
    clock, buf = FakeClock(), io.StringIO()
    e = ToyEngine(vocab_size=100, seed=0, n_positive=4)
    ids = np.random.default_rng(0).choice(98, size=(20, 3), replace=False).astype(np.int32)
    with Progress(True, Console(file=buf, width=200, force_terminal=True), clock=clock) as p:
        task = p.start("fake (1/1)", 100, None)
        seen = []

        def on_progress(used):  # what run_search(on_progress=...) gets from the budget
            clock.t += 2.0  # every chunk of 16 evaluations takes 2 s
            p.advance(task, used)
            t = p._bar.tasks[0]
            seen.append((t.completed, t.fields["rate"], t.fields["eta"], p._speed[task].eta, t.fields["status"]))

        # a fake search: five chunks of 4 candidates x 4 images, then it stops early (80 of 100)
        b = Budget(e, 100, 0.5, HalvingConfig(mode="off"), 0, on_charge=on_progress)
        for c in range(5):
            b.score(ids[4 * c: 4 * c + 4])
        assert [s[0] for s in seen] == [16, 32, 48, 64, 80]  # one update per chunk, monotone
        assert seen[0][1] == "-" and seen[0][2] == "-:--:--"  # one chunk (it also compiled): no rate yet
        for k, (used, rate, eta_text, eta, status) in enumerate(seen[1:], start=1):
            assert rate == "8" and eta == pytest.approx((100 - used) / 8.0)  # 16 evaluations per 2 s
            assert eta_text == clock_text((100 - used) / 8.0)
            assert status == "compiling / first step..."  # cleared only by the first checkpoint
        p.update(task, {"budget": {"used": 80, "top": [[[1, 2, 3], 0.5, 0.25]]}})
        assert p._bar.tasks[0].fields["status"] == "" and p._bar.tasks[0].completed == 80
        p.finish(task, 80, "steps")
        t = p._bar.tasks[0]
        assert t.completed == t.total == 100 and t.fields["eta"] == "0:00:00"
        assert "80 evals used" in t.fields["status"] and "steps" in t.fields["status"]
        p._bar.refresh()
        p.stop(task)
    out = buf.getvalue()
    assert "100/100" in out and "ETA 0:00:00" in out


def test_throughput_restarts_its_clock_when_work_is_redone():
    clock = FakeClock()
    s = Throughput(total=1000, used=200, clock=clock)
    assert s.rate is None and s.eta is None
    s.add(300)
    clock.t += 10
    s.add(500)
    assert s.rate == pytest.approx(20.0) and s.eta == pytest.approx(25.0)
    s.add(400)  # an out-of-memory retry resumed from an earlier checkpoint
    assert s.rate is None
    assert clock_text(None) == "-:--:--" and clock_text(3725.2) == "1:02:05"


def test_run_search_reports_every_charge():
    e = ToyEngine(vocab_size=500, seed=0, n_positive=4)
    calls, checkpoints = [], []
    r = run_search("gcg", e, GCGConfig(budget=600, search_width=32, topk=16), on_progress=calls.append,
                   on_checkpoint=checkpoints.append)
    assert calls == sorted(calls) and calls[-1] == r.evals_used == e.evals
    assert len(calls) > len(checkpoints)  # finer than checkpoints: gradients and each halving rung
    assert e.grad_calls + e.score_calls == len(calls)  # one call per charged chunk


def test_no_rate_from_chunks_charged_in_quick_succession():
    clock = FakeClock()
    s = Throughput(total=100, used=0, clock=clock)
    s.add(10)
    clock.t += 0.001  # e.g. a gradient charged right after a scored batch
    s.add(20)
    assert s.rate is None and s.eta is None
    clock.t += 1.0
    s.add(30)
    assert s.rate == pytest.approx(20 / 1.001) and s.eta == pytest.approx(70 / s.rate)
