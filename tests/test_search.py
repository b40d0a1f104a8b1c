"""Search methods against the toy engine: improvement, exact budgets, determinism, resumption, vocab filters."""
import dataclasses
import json

import numpy as np
import pytest

from jalias.search import (
    METHODS,
    Budget,
    EvolutionConfig,
    GCGConfig,
    HalvingConfig,
    LocalConfig,
    SearchConfig,
    ScoringEngine,
    SearchResult,
    SoftConfig,
    objective,
    run_search,
)
from jalias.search.base import coerce_config
from jalias.search.vocab import allowed_token_ids, ascii_word_piece_mask
from toy_engine import ToyEngine

# Small settings per method: a few iterations each, well under a second per run.
SMALL = {
    "evolution": dict(population=16, generations=None),
    "local": dict(n_candidates=64),
    "gcg": dict(search_width=64, topk=32),
    "soft": dict(),
}
BUDGET = {"evolution": 1500, "local": 1500, "gcg": 1500, "soft": 600}


def config_for(method, **overrides):
    fields = {"budget": BUDGET[method], "seed": 0, **SMALL[method], **overrides}
    return METHODS[method].config_cls(**fields)


def engine(**kw):
    return ToyEngine(**{"vocab_size": 500, "seed": 0, **kw})


def comparable(result: SearchResult) -> dict:
    d = result.to_dict()
    d.pop("wall_time_s")
    return d


# --- objective and budget ---------------------------------------------------------------------------------------

def test_objective_values():
    iou = np.array([[1.0, 0.5, 1.0, 0.0], [0.2, 0.4, 0.0, 0.0]], np.float32)
    neg = np.array([False, False, True, True])
    # positives: mean(1, .5) = .75; negatives: mean(1 - [1, 0]) = .5 -> .75 - .5 * .5
    np.testing.assert_allclose(objective(iou, neg, 0.5), [0.5, 0.3 - 0.5], rtol=1e-6)
    np.testing.assert_allclose(objective(iou[:, :2], neg[:2], 0.5), [0.75, 0.3], rtol=1e-6)
    with pytest.raises(ValueError, match="iou must be"):
        objective(iou, neg[:3], 0.5)


def test_budget_pays_only_what_it_can():
    e = engine(n_positive=3)
    assert isinstance(e, ScoringEngine)
    b = Budget(e, budget=20, negative_weight=0.5, halving=HalvingConfig(mode="off"), seed=0)
    ids = np.tile(e.target_ids, (10, 1))
    assert b.score(ids).shape == (6, 3)  # floor(20 / 3) rows
    assert b.used == 18 == e.evals
    assert b.grad(e.target_ids) is None and b.used == 18  # 3 * 3 > 2 left: refused, nothing charged
    assert b.score(ids).shape == (0, 3) and b.used == 18
    assert b.top[0][1] == pytest.approx(1.0) and len(b.top) == 1  # identical rows are kept once
    assert b.history == [(18, 1.0, 1.0)]


def test_halving_scores_survivors_exactly_and_saves_budget():
    e = engine(n_positive=12, n_negative=4)
    cfg = HalvingConfig(mode="on", min_images=4, eta=2.0)
    b = Budget(e, budget=10**6, negative_weight=0.5, halving=cfg, seed=3)
    assert b.rungs == [4, 8, 16]
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 498, size=(40, 4)).astype(np.int32)
    ids[7] = e.target_ids
    scored = b.evaluate(ids)
    assert b.used == e.evals == 40 * 4 + 20 * 4 + 10 * 8  # each rung scores only the images it adds
    assert scored.full.sum() == 10 and scored.full[7]
    exact = objective(e.score(ids[scored.full]), e.is_negative, 0.5)
    np.testing.assert_array_equal(scored.objective[scored.full], exact)
    assert scored.best_full() == 7 and b.top[0][0] == tuple(e.target_ids.tolist())
    assert (scored.rung[~scored.full] < 2).all()


def test_negative_images_penalise_segment_everything():
    plain, with_neg = engine(n_positive=4), engine(n_positive=4, n_negative=3)
    every_plain = objective(plain.score(plain.everything_ids[None]), plain.is_negative, 0.5)[0]
    every_neg = objective(with_neg.score(with_neg.everything_ids[None]), with_neg.is_negative, 0.5)[0]
    target_neg = objective(with_neg.score(with_neg.target_ids[None]), with_neg.is_negative, 0.5)[0]
    assert 0.1 < every_plain < 0.9  # "everything" covers the blobs partially
    assert every_neg == pytest.approx(every_plain - 0.5)  # predicted on every negative image
    assert target_neg == pytest.approx(1.0)  # the target predicts nothing on negatives


# --- every method -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", list(METHODS))
def test_improves_and_respects_budget(method):
    e = engine()
    r = run_search(method, e, config_for(method))
    assert r.method == method and r.best
    assert r.best[0].objective > r.history[0][1] + 0.2, (r.history[0], r.best[0])
    assert r.evals_used <= BUDGET[method] and r.evals_used == e.evals
    assert r.evals_used > BUDGET[method] - 4 * (3 + 1)  # stops only when no further step is affordable
    objs = [c.objective for c in r.best]
    assert objs == sorted(objs, reverse=True) and len({tuple(c.ids) for c in r.best}) == len(r.best)
    top = r.best[0]
    assert objective(e.score(np.array([top.ids])), e.is_negative, 0.5)[0] == pytest.approx(top.objective)
    assert [h[0] for h in r.history] == sorted(h[0] for h in r.history)
    assert [h[1] for h in r.history] == sorted(h[1] for h in r.history)
    json.dumps(r.to_dict())
    assert comparable(SearchResult.from_dict(json.loads(json.dumps(r.to_dict())))) == comparable(r)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("budget", [3, 50])
def test_budget_smaller_than_a_batch(method, budget):
    e = engine()
    r = run_search(method, e, config_for(method, budget=budget))
    assert r.evals_used <= budget and r.evals_used == e.evals
    assert r.stop_reason == "budget"
    if budget < e.n_images:
        assert r.best == [] and r.evals_used == 0
    else:
        assert r.best


@pytest.mark.parametrize("method", list(METHODS))
def test_deterministic_per_seed(method):
    a = run_search(method, engine(), config_for(method, seed=5))
    b = run_search(method, engine(), config_for(method, seed=5))
    c = run_search(method, engine(), config_for(method, seed=6))
    assert comparable(a) == comparable(b)
    assert (a.history, [x.ids for x in a.best]) != (c.history, [x.ids for x in c.best])


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("stop_after", [1, 4])
def test_resume_is_exact(method, stop_after):
    cfg = config_for(method, seed=2)
    full = run_search(method, engine(), cfg)

    saved = []

    def interrupt(state):
        saved.append(json.loads(json.dumps(state)))  # what the CLI writes to disk
        if len(saved) == stop_after:
            raise Interrupt

    e1 = engine()
    with pytest.raises(Interrupt):
        run_search(method, e1, cfg, on_checkpoint=interrupt)
    state = saved[-1]
    assert state["budget"]["used"] == e1.evals  # the checkpoint accounts for every evaluation made

    e2 = engine()
    resumed = run_search(method, e2, cfg, resume_state=state)
    assert comparable(resumed) == comparable(full)
    assert e2.evals == full.evals_used - state["budget"]["used"]  # nothing repeated, nothing lost


def test_resume_refuses_another_config():
    saved = []
    run_search("local", engine(), config_for("local"), on_checkpoint=saved.append)
    with pytest.raises(ValueError, match="seed"):
        run_search("local", engine(), config_for("local", seed=9), resume_state=saved[0])
    with pytest.raises(ValueError, match="method"):
        run_search("gcg", engine(), config_for("gcg"), resume_state=saved[0])
    # a larger budget is allowed: the run just goes on longer
    more = run_search("local", engine(), config_for("local", budget=3000), resume_state=saved[-1])
    assert BUDGET["local"] < more.evals_used <= 3000


@pytest.mark.parametrize("method", list(METHODS))
def test_vocab_filter_is_respected(method):
    e = engine(record=True)
    whitelist = list(range(0, 500, 3)) + list(e.special_ids)
    run_search(method, e, config_for(method, allowed_tokens=whitelist))
    seen = np.unique(np.concatenate(e.seen_ids))
    assert set(seen.tolist()) <= set(range(0, 500, 3)) - set(e.special_ids)


def test_ascii_only_filter():
    strings = ["cat</w>", "ing", "Ab3</w>", "ï¸ı</w>", "!", "</w>", "a b", "<|endoftext|>"]
    assert ascii_word_piece_mask(strings).tolist() == [True, True, True, False, False, False, False, False]
    ids = allowed_token_ids(SearchConfig(ascii_only=True), 8, token_strings=strings)
    assert ids.tolist() == [0, 1, 2]

    e = engine(record=True)
    try:
        from jalias.tokenizer import token_strings
        ascii_ids = set(np.flatnonzero(ascii_word_piece_mask(token_strings()[:500])).tolist())
        cfg = config_for("local", ascii_only=True)
    except ImportError:  # tokenizer not available: ascii_only then means "the explicit allowed_tokens"
        ascii_ids = set(range(100, 300))
        cfg = config_for("local", ascii_only=True, allowed_tokens=sorted(ascii_ids))
    r = run_search("local", e, cfg)
    seen = set(np.unique(np.concatenate(e.seen_ids)).tolist())
    assert seen <= ascii_ids - set(e.special_ids)
    assert all(isinstance(c.text, str) and c.text for c in r.best)


def test_special_tokens_never_proposed():
    ids = allowed_token_ids(SearchConfig(), 49408, special_ids=(0,))
    assert 49406 not in ids and 49407 not in ids and 0 not in ids and ids.size == 49405
    with pytest.raises(ValueError, match="exclude_special"):
        run_search("local", engine(), config_for("local", exclude_special=False))


@pytest.mark.parametrize("method", list(METHODS))
def test_label_init_starts_from_the_label(method):
    e = engine(record=True)
    label = e.target_ids.copy()
    label[2:] = [7, 8]  # a "natural label" that is half right
    r = run_search(method, e, config_for(method, init="label", label_ids=label.tolist()))
    label_obj = objective(e.score(label[None]), e.is_negative, 0.5)[0]
    assert e.seen_ids[0][0].tolist() == label.tolist()
    assert r.history[0][1] >= label_obj and r.best[0].objective > label_obj


@pytest.mark.parametrize("method", ["local", "gcg", "evolution"])
def test_halving_runs_within_budget(method):
    e = engine(n_positive=12, n_negative=4)
    halving = HalvingConfig(mode="on", min_images=4)
    r = run_search(method, e, config_for(method, budget=6000, halving=halving))
    assert r.evals_used <= 6000 and r.evals_used == e.evals
    assert r.best[0].objective > r.history[0][1]
    top = r.best[0]
    assert objective(e.score(np.array([top.ids])), e.is_negative, 0.5)[0] == pytest.approx(top.objective)


def test_negatives_steer_search_away_from_everything():
    e = engine(n_positive=4, n_negative=4)
    r = run_search("gcg", e, config_for("gcg", budget=4000, negative_weight=1.0))
    iou = e.score(np.array([r.best[0].ids]))
    assert r.best[0].objective > 0.5 and iou[0, 4:].min() == 1.0  # nothing predicted on the negatives


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="unknown search method"):
        run_search("annealing", engine())
    with pytest.raises(ValueError, match="length"):
        run_search("gcg", engine(), GCGConfig(length=31))
    with pytest.raises(ValueError, match="label_ids"):
        run_search("soft", engine(), SoftConfig(init="label"))
    with pytest.raises(ValueError, match="unknown LocalConfig field"):
        run_search("local", engine(), {"search_width": 3})
    with pytest.raises(ValueError, match="expected EvolutionConfig"):
        run_search("evolution", engine(), LocalConfig())
    # a plain SearchConfig carries the common fields into any method's config
    cfg = coerce_config(SearchConfig(budget=123, seed=4), EvolutionConfig, "evolution")
    assert isinstance(cfg, EvolutionConfig) and cfg.budget == 123 and cfg.seed == 4 and cfg.population == 32


# --- pure helpers -----------------------------------------------------------------------------------------------

def test_gcg_helpers():
    from jalias.search.gcg import sample_ids_from_grad, top_k_tokens, unique_rows

    grad = np.array([[0.0, -3.0, -1.0, -2.0, 5.0], [1.0, 0.0, -1.0, -1.0, -9.0]], np.float32)
    allowed = np.array([True, True, True, True, False])
    top = top_k_tokens(grad, allowed, 3)
    assert top.tolist() == [[1, 3, 2], [2, 3, 1]]  # most negative first, token 4 filtered, ties by id
    ids = np.array([0, 0], np.int32)
    cands = sample_ids_from_grad(ids, top, 50, 1, np.random.default_rng(0))
    assert cands.shape == (50, 2) and ((cands != ids).sum(axis=1) == 1).all()
    assert set(cands[:, 0].tolist()) <= {0, 1, 2, 3} and set(cands[:, 1].tolist()) <= {0, 1, 2, 3}
    both = sample_ids_from_grad(ids, top, 20, 2, np.random.default_rng(0))
    assert ((both != ids).sum(axis=1) == 2).all()
    rows = np.array([[1, 2], [0, 0], [1, 2], [3, 1]], np.int32)
    assert unique_rows(rows, ids).tolist() == [[1, 2], [3, 1]]


def test_local_candidates_cover_a_position():
    from jalias.search.local import position_candidates

    allowed = np.arange(10, 20, dtype=np.int32)
    ids = np.array([11, 12, 13], np.int32)
    all_c = position_candidates(ids, 1, allowed, 100, np.random.default_rng(0))
    assert sorted(all_c[:, 1].tolist()) == [t for t in range(10, 20) if t != 12]
    assert (all_c[:, [0, 2]] == [11, 13]).all()
    some = position_candidates(ids, 0, allowed, 4, np.random.default_rng(0))
    assert some.shape == (4, 3) and len(set(some[:, 0].tolist())) == 4 and 11 not in some[:, 0]


def test_soft_projection_metrics():
    from jalias.search.soft import nearest_tokens, projection_keys

    table = np.array([[1.0, 0.0], [10.0, 1.0], [0.0, 1.0]], np.float32)
    x = np.array([[1.0, -0.05], [0.1, 2.0]], np.float32)
    assert np.asarray(nearest_tokens(x, *projection_keys(table, "cosine"))).tolist() == [0, 2]
    # by distance the first row is closest to [1, 0]; with [9, 1] it would be [10, 1] under both metrics
    assert np.asarray(nearest_tokens(np.array([[9.0, 1.0]], np.float32), *projection_keys(table, "l2"))).tolist() == [1]
    assert np.asarray(nearest_tokens(np.array([[3.0, 0.2]], np.float32), *projection_keys(table, "l2"))).tolist() == [0]


def test_soft_l2_projection_runs():
    e = engine()
    r = run_search("soft", e, config_for("soft", projection="l2", weight_decay=0.01))
    assert r.evals_used == e.evals <= BUDGET["soft"] and r.best[0].objective > r.history[0][1]


def test_evolution_truncation_selection_and_label_population():
    from jalias.search.evolution import initial_population

    cfg = config_for("evolution", selection="truncation", crossover_rate=1.0, mutation_rate=0.5)
    e = engine()
    r = run_search("evolution", e, cfg)
    assert r.evals_used == e.evals and r.best[0].objective > r.history[0][1]
    label_cfg = EvolutionConfig(population=8, init="label", label_ids=[5, 6], length=4)
    pop = initial_population(label_cfg, np.arange(100, dtype=np.int32), 0.25, np.random.default_rng(0))
    assert pop.shape == (8, 4) and pop[0, :2].tolist() == [5, 6]
    assert all((row != pop[0]).sum() >= 1 for row in pop[1:])  # every other member is a mutant of the label


def test_budget_full_coverage_in_any_image_order():
    e = engine(n_positive=2, n_negative=1)
    b = Budget(e, budget=100, negative_weight=0.5, halving=HalvingConfig(mode="off"), seed=0)
    iou = b.score(e.everything_ids[None], images=np.array([2, 0, 1]))
    assert iou.shape == (1, 3) and b.used == 3
    expected = objective(e.score(e.everything_ids[None]), e.is_negative, 0.5)[0]
    assert b.top[0][1] == pytest.approx(float(expected))


def test_searches_pass_their_negative_weight_to_the_engine():
    """The soft loss a search differentiates is weighted like its own exact objective: gcg's token_grad and soft's
    soft_loss_and_grad get the search's negative_weight (0.25), not the engine's default (0.5)."""
    class Recording(ToyEngine):
        def token_grad(self, ids, images=None, negative_weight=None):
            self.asked.append(("token_grad", negative_weight))
            return super().token_grad(ids, images, negative_weight)

        def soft_loss_and_grad(self, embeds, images=None, negative_weight=None):
            self.asked.append(("soft_loss_and_grad", negative_weight))
            return super().soft_loss_and_grad(embeds, images, negative_weight)

    e = Recording(vocab_size=500, seed=0, n_negative=2)
    e.asked = []
    for method in ("gcg", "soft"):
        r = run_search(method, e, config_for(method, budget=300, negative_weight=0.25))
        assert r.best
    assert {name for name, _ in e.asked} == {"token_grad", "soft_loss_and_grad"}
    assert {w for _, w in e.asked} == {0.25}
    # and the weight matters: with negatives present the loss differs from the engine's default weighting
    x = e.embedding_table[e.everything_ids]
    assert e.soft_loss_and_grad(x, negative_weight=0.25)[0] != pytest.approx(e.soft_loss_and_grad(x)[0], abs=1e-3)


def test_gcg_patience_restarts_and_resumes_exactly():
    """patience=2: a walk that has not beaten its own best for 2 steps restarts from random tokens; the run
    stays within budget, its result is the best seen over all walks, and resuming mid-run is exact."""
    cfg = config_for("gcg", budget=3000, seed=1, patience=2, search_width=16, topk=4)
    states = []
    full = run_search("gcg", engine(), cfg, on_checkpoint=lambda s: states.append(json.loads(json.dumps(s))))
    assert full.evals_used <= 3000
    restarts = [s["method_state"]["restarts"] for s in states]
    assert restarts[-1] >= 1 and restarts == sorted(restarts), restarts
    assert full.best[0].objective == pytest.approx(max(h[1] for h in full.history))
    middle = next(s for s in states if s["method_state"]["restarts"] >= 1)
    resumed = run_search("gcg", engine(), cfg, resume_state=middle)
    assert comparable(resumed) == comparable(full)
    with pytest.raises(ValueError, match="patience"):
        run_search("gcg", engine(), config_for("gcg", patience=0))


# --- retokenization filter --------------------------------------------------------------------------------------

class EvenOnlyEngine(ToyEngine):
    """A toy engine whose 'tokenizer' round-trips exactly the sequences of even ids (a filter with a known answer,
    standing in for `Engine.round_trips`)."""

    def round_trips(self, ids):
        return (np.asarray(ids) % 2 == 0).all(axis=-1)


def test_round_trips_is_a_declared_protocol_member():
    """round_trips is part of ScoringEngine like special_ids / grad_cost: the real engine and the toy declare it,
    the toy's (no tokenizer) accepts every row, and an engine without it is not a ScoringEngine."""
    from jalias.engine import Engine

    assert "round_trips" in ScoringEngine.__dict__ and callable(Engine.round_trips)
    e = engine()
    np.testing.assert_array_equal(e.round_trips(np.zeros((3, 4), np.int32)), np.ones(3, bool))

    class NoRoundTrips:
        def __init__(self, inner):
            self.__dict__.update({k: getattr(inner, k) for k in (
                "n_images", "is_negative", "vocab_size", "max_length", "embedding_table", "special_ids",
                "grad_cost")})
            self.score, self.token_grad, self.soft_loss_and_grad = inner.score, inner.token_grad, \
                inner.soft_loss_and_grad

    assert not isinstance(NoRoundTrips(e), ScoringEngine)


@pytest.mark.parametrize("method", list(METHODS))
def test_retokenize_scores_and_reports_only_round_tripping_candidates(method):
    e = EvenOnlyEngine(vocab_size=500, seed=0, record=True)
    r = run_search(method, e, config_for(method))
    seen = np.concatenate(e.seen_ids)
    assert (seen % 2 == 0).all() and len(seen) > 0  # nothing else was ever scored (or paid for)
    assert r.evals_used == e.evals
    assert r.best and all(all(i % 2 == 0 for i in c.ids) for c in r.best)
    assert r.rejected > 0
    off = EvenOnlyEngine(vocab_size=500, seed=0, record=True)
    r_off = run_search(method, off, config_for(method, retokenize=False))
    assert (np.concatenate(off.seen_ids) % 2 == 1).any()  # without the filter odd ids are proposed and scored
    # refused proposals are not a reason to stop: the search spends its budget as it does without the filter
    assert r.evals_used >= 0.9 * r_off.evals_used, (r.evals_used, r_off.evals_used, r.stop_reason)


# --- search memory ----------------------------------------------------------------------------------------------

class PairEngine(ToyEngine):
    """A toy engine that records every (sequence, image) pair it scores."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.pairs = []

    def score(self, ids, images=None):
        self.pairs += [(tuple(r), int(j)) for r in np.asarray(ids).tolist() for j in self._images(images)]
        return super().score(ids, images)


def test_memory_pays_once_per_sequence_and_image():
    e = PairEngine(vocab_size=500, seed=0, n_positive=6)
    b = Budget(e, budget=10**6, negative_weight=0.5, halving=HalvingConfig(mode="off"), seed=0, cache_size=5)
    ids = np.random.default_rng(0).choice(498, size=(8, 4), replace=False).astype(np.int32)
    first = b.score(ids[:3], images=np.array([4, 1]))
    assert e.evals == 6 and b.used == 6 and b.saved == 0
    full = b.score(ids[:3])  # image 1 and 4 come from memory, whichever subset asked for them
    assert e.evals == b.used == 6 + 3 * 4 and b.saved == 6
    fresh = PairEngine(vocab_size=500, seed=0, n_positive=6)  # the same engine, nothing remembered
    np.testing.assert_array_equal(full, fresh.score(ids[:3]))  # remembered scores are the fresh scores
    np.testing.assert_array_equal(full[:, [4, 1]], first)
    again = b.score(np.concatenate([ids[:2], ids[:2]]))  # all known: nothing charged, nothing scored
    np.testing.assert_array_equal(again, np.concatenate([full[:2], full[:2]]))
    assert b.used == 18 and e.evals == 18 and b.saved == 6 + 24
    twice = b.score(np.stack([ids[3], ids[3]]), images=np.array([0]))  # a row repeated within one call
    assert b.used == 19 and b.saved == 31 and twice[0] == twice[1]
    b.score(ids[3:8])  # 5 new sequences fill the memory (capacity 5): the 3 first ones are forgotten
    assert len(b.memo) == 5 and tuple(ids[0]) not in b.memo and tuple(ids[7]) in b.memo
    assert b.used == 19 + 5 + 4 * 6 and b.saved == 31 + 1
    b.score(ids[:1])
    assert b.used == 48 + 6 and len(b.memo) == 5  # forgotten: paid again; the bound holds
    assert len(e.pairs) == b.used  # the engine scored exactly the pairs that were paid for


def test_memory_prefix_when_the_budget_runs_out():
    e = engine(n_positive=4)
    b = Budget(e, budget=14, negative_weight=0.5, halving=HalvingConfig(mode="off"), seed=0, cache_size=100)
    ids = np.random.default_rng(1).choice(498, size=(4, 3), replace=False).astype(np.int32)
    b.score(ids[1:2])
    assert b.used == 4
    # rows 0 (new, 4), 1 (known, free), 2 (new, 4) fit in the 10 left; row 3 would need 4 more than the 2 left
    got = b.score(ids)
    assert got.shape == (3, 4) and b.used == 12 == e.evals and b.saved == 4


@pytest.mark.parametrize("method", list(METHODS))
def test_memory_never_pays_twice_and_changes_nothing_else(method):
    """With memory a search is charged only for new (sequence, image) pairs; up to the point where the run
    without memory runs out, both take the same steps (the remembered scores are the exact ones) and the
    difference in evaluations used is exactly evals_saved."""
    halving = HalvingConfig(mode="on", min_images=2, eta=2.0)
    kw = dict(vocab_size=500, seed=0, n_positive=6, n_negative=2)
    cfg = config_for(method, budget=3000, halving=halving)
    runs = {}
    for size in (0, 20_000):
        e, states = PairEngine(**kw), []
        r = run_search(method, e, dataclasses.replace(cfg, cache_size=size),
                       on_checkpoint=lambda s: states.append(json.loads(json.dumps(s))))
        runs[size] = (e, r, states)
    e, r, states = runs[20_000]
    assert len(e.pairs) == len(set(e.pairs))  # no (sequence, image) pair was ever scored twice
    grads = e.evals - len(e.pairs)
    assert r.evals_used == e.evals and r.evals_saved == states[-1]["budget"]["saved"]
    e0, r0, states0 = runs[0]
    assert r0.evals_saved == 0 and len(e0.pairs) + grads >= r.evals_used  # same or more work without memory
    assert len(states0) >= 3
    for plain, memo in zip(states0[:-1], states):
        assert plain["method_state"] == memo["method_state"] and plain["budget"]["top"] == memo["budget"]["top"]
        assert plain["budget"]["used"] - memo["budget"]["used"] == memo["budget"]["saved"]
    if method in ("gcg", "evolution"):  # these re-propose sequences
        assert r.evals_saved > 0


def test_memory_is_bounded_and_resumes_exactly():
    cfg = config_for("gcg", budget=3000, seed=1, patience=2, search_width=16, topk=4, cache_size=30)
    states = []
    full = run_search("gcg", engine(), cfg, on_checkpoint=lambda s: states.append(json.loads(json.dumps(s))))
    assert full.evals_saved > 0 and max(s["budget"]["memo"]["n"] for s in states) == 30
    middle = states[len(states) // 2]  # the memory is full by then: resuming needs its order of last use too
    e = engine()
    resumed = run_search("gcg", e, cfg, resume_state=middle)
    assert comparable(resumed) == comparable(full)
    assert e.evals == full.evals_used - middle["budget"]["used"]
    with pytest.raises(ValueError, match="cache_size"):
        run_search("gcg", engine(), config_for("gcg", cache_size=-1))
