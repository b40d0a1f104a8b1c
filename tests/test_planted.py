"""Planted-alias problems: a real (non-degenerate, prompt-sensitive) problem with a known answer, of both kinds
("direction": graded concept direction, "random": unstructured control), and every search method making progress
on it through the real Engine within an exact budget."""
import jax
import numpy as np
import pytest

from jalias.data.planted import MAX_COVER, MIN_COVER, make_planted, mean_iou, planted_vocab, predict
from jalias.engine import Engine
from jalias.search import METHODS, ScoringEngine, run_search
from jalias.tokenizer import token_strings

N_SEARCH, N_HELDOUT = 4, 2


@pytest.fixture(scope="module")
def problem():
    return make_planted(0, n_search=N_SEARCH, n_heldout=N_HELDOUT)


@pytest.fixture(scope="module")
def random_problem():
    return make_planted(0, n_search=N_SEARCH, n_heldout=N_HELDOUT, kind="random")


@pytest.fixture(scope="module", params=["direction", "random"])
def any_problem(request, problem, random_problem):
    return problem if request.param == "direction" else random_problem


@pytest.fixture(scope="module")
def engine(problem):
    # small chunks and no prefix cache: few compiled variants (this test is about search, not engine speed)
    return Engine(problem.model, problem.search_images, problem.search_masks, chunk_size=16, prefix_cache=False)


def test_hidden_sequence_scores_exactly_one(any_problem):
    problem = any_problem
    engine = Engine(problem.model, problem.search_images, problem.search_masks, chunk_size=16, prefix_cache=False)
    assert isinstance(engine, ScoringEngine)  # what the search methods rely on
    assert problem.stats["kind"] in ("direction", "random")
    assert problem.hidden_ids.dtype == np.int32 and problem.hidden_ids.shape == (4,)
    assert np.isin(problem.hidden_ids, problem.allowed_vocab).all()
    assert len(problem.search_images) == N_SEARCH and len(problem.heldout_images) == N_HELDOUT
    np.testing.assert_array_equal(engine.score(problem.hidden_ids[None]), np.ones((1, N_SEARCH), np.float32))
    held = Engine(problem.model, problem.heldout_images, problem.heldout_masks, chunk_size=1, prefix_cache=False)
    np.testing.assert_array_equal(held.score(problem.hidden_ids[None]), np.ones((1, N_HELDOUT), np.float32))


def test_masks_are_non_trivial(any_problem):
    problem = any_problem
    masks = np.stack(problem.search_masks + problem.heldout_masks)
    assert masks.dtype == bool and masks.shape == (N_SEARCH + N_HELDOUT, 64, 64)
    cover = masks.mean((1, 2))
    assert (cover > 0).all()  # the Engine refuses an empty GT on a positive image
    assert ((cover >= MIN_COVER) & (cover <= MAX_COVER)).mean() >= 0.75


def test_ground_truth_is_what_torch_sam3_predicts_for_the_hidden_sequence(any_problem):
    """The planted GT is SAM3's answer to the hidden prompt, checked against an independent implementation:
    transformers' Sam3Model holding the planted weights, with the text-prompt mask rule restated on the torch side
    (parity_utils.torch_predicted_masks). Measured pixel-exact on every image (2026-12-03); one pixel per
    4,096-pixel mask is allowed for a logit within float32 rounding of 0 on another CPU."""
    from parity_utils import content_prompts, torch_forward, torch_model_of, torch_predicted_masks

    from jalias.model.preprocess import preprocess

    problem = any_problem
    images = problem.search_images + problem.heldout_images
    masks = np.stack(problem.search_masks + problem.heldout_masks)
    hm = torch_model_of(problem.model)
    ids, attn = content_prompts([problem.hidden_ids] * len(images))
    px = preprocess(images, problem.model.config.image_size).astype(np.float32)
    ref = torch_predicted_masks(torch_forward(hm, px, ids, attn), masks.shape[1:])
    assert ref.any((1, 2)).all()
    wrong = (ref != masks).sum((1, 2))
    assert wrong.max() <= 1, wrong


def test_random_sequences_and_label_score_low(any_problem):
    problem = any_problem
    engine = Engine(problem.model, problem.search_images, problem.search_masks, chunk_size=16, prefix_cache=False)
    rng = np.random.default_rng(7)
    v = problem.allowed_vocab
    random_ids = v[rng.integers(v.size, size=(32, 4))]
    iou = engine.score(random_ids).mean(1)
    assert iou.mean() < 0.5, iou
    assert iou.max() < 0.9, iou
    label = engine.score(problem.label_ids[None]).mean()
    assert label < 0.75, label
    # prompt-sensitive: random sequences do not all predict the same thing
    pred = predict(problem.model, problem.search_images + problem.heldout_images, random_ids[:8])
    pairwise = [mean_iou(pred[i:i + 1], pred[j])[0] for i in range(8) for j in range(i + 1, 8)]
    assert np.mean(pairwise) < 0.6


def test_direction_is_graded_and_gradients_point_at_it(problem, engine):
    """The "direction" kind's promise: each right token adds to the IoU, and the soft loss's token gradient ranks the
    hidden token near the top of the 2,000-word vocabulary (on the "random" kind it ranks it ~500th)."""
    rng = np.random.default_rng(3)
    v, h = problem.allowed_vocab, problem.hidden_ids
    allowed = np.zeros(engine.vocab_size, bool)
    allowed[v] = True
    by_wrong, ranks = {}, []
    for n_wrong in (1, 2, 4):
        cands = np.repeat(h[None], 12, 0)
        for c in cands:
            c[rng.choice(4, n_wrong, replace=False)] = v[rng.integers(v.size, size=n_wrong)]
        by_wrong[n_wrong] = engine.score(cands).mean()
        if n_wrong == 1:
            for c in cands[:4]:
                pos = int(np.flatnonzero(c != h)[0]) if (c != h).any() else 0
                g = np.where(allowed, engine.token_grad(c)[pos], np.inf)
                ranks.append(int((g < g[h[pos]]).sum()))
    assert 1.0 > by_wrong[1] > by_wrong[2] > by_wrong[4], by_wrong
    assert by_wrong[4] < 0.4, by_wrong
    assert np.median(ranks) < 100, ranks  # top 5% of 2,000 (a random ranking: ~1,000)


def test_label_and_vocab(problem):
    assert problem.label == "striped blob"
    strings = token_strings()
    assert [strings[i] for i in problem.label_ids] == ["striped</w>", "blob</w>"]
    v = problem.allowed_vocab
    assert v.size == 2000 and (np.diff(v) > 0).all() and np.isin(problem.label_ids, v).all()
    assert all(strings[i].endswith("</w>") and strings[i][:-4].isalpha() for i in v)
    small = planted_vocab(50)  # the 50 lowest-id whole words of 3+ ascii lowercase letters, checked token by token
    is_word = lambda t: t.endswith("</w>") and len(t) >= 7 and t[:-4].isascii() and t[:-4].isalpha() and t.islower()
    want = [i for i in range(int(small[-1]) + 1) if is_word(strings[i])]
    assert small.tolist() == want and len(want) == 50
    # ids 5 and the first word forced in: the other words fill the rest (the first word counted once)
    forced = planted_vocab(50, include=(5, want[0]))
    assert forced.tolist() == sorted([5, want[0], *want[1:49]])
    with pytest.raises(ValueError, match="vocabulary size"):
        planted_vocab(1, include=(5,))


def test_deterministic_for_a_seed(problem):
    again = make_planted(0, n_search=N_SEARCH, n_heldout=N_HELDOUT)
    np.testing.assert_array_equal(again.hidden_ids, problem.hidden_ids)
    for a, b in zip(again.search_masks + again.heldout_masks, problem.search_masks + problem.heldout_masks):
        np.testing.assert_array_equal(a, b)
    same = jax.tree_util.tree_map(lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))),
                                  again.model.params, problem.model.params)
    assert all(jax.tree_util.tree_leaves(same))
    other = make_planted(1, n_search=N_SEARCH, n_heldout=N_HELDOUT)
    assert other.label != problem.label and not np.array_equal(other.hidden_ids, problem.hidden_ids)


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_search"):
        make_planted(0, n_search=0)
    with pytest.raises(ValueError, match="length"):
        make_planted(0, length=0)
    with pytest.raises(ValueError, match="vocab"):
        make_planted(0, vocab=[1])
    with pytest.raises(ValueError, match="kind"):
        make_planted(0, kind="smooth")


# Small settings so that each method gets several iterations of a 1,200-evaluation budget on 4 images.
SMALL = {
    "evolution": dict(population=12, generations=None),
    "local": dict(n_candidates=24),
    "gcg": dict(search_width=24, topk=16),
    "soft": dict(),
}
BUDGET = 1200


@pytest.mark.parametrize("method", list(SMALL))
def test_method_improves_within_exact_budget(method, problem, engine):
    cfg = METHODS[method].config_cls(length=4, budget=BUDGET, seed=0, allowed_tokens=problem.allowed_vocab.tolist(),
                                     **SMALL[method])
    before = engine.evals
    result = run_search(method, engine, cfg)
    spent = engine.evals - before
    assert result.evals_used <= BUDGET
    assert result.evals_used > BUDGET - 4 * (1 + 3)  # spent down to less than one more step
    assert spent == result.evals_used  # the Engine counts what the Budget charged (scores and gradients)
    start = result.history[0]
    best = result.best[0]
    assert best.objective > start[1] and best.train_iou > start[2] + 0.05, (start, best)
    assert np.isin(best.ids, problem.allowed_vocab).all()
    # the reported train IoU is the Engine's exact mean IoU of the best sequence
    assert engine.score(np.asarray(best.ids, np.int32)[None]).mean() == pytest.approx(best.train_iou, abs=1e-6)
