"""Evolutionary search, the baseline of the original research code.

A population of token sequences (random, or the label and its mutants) evolves for a number of generations or
until the budget is spent: the best `elitism` survive unchanged (and are not rescored), the rest are children of
parents chosen by tournament or truncation selection, made by uniform crossover and per-token point mutation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from jalias.search.base import Checkpoint, ScoringEngine, SearchConfig, SearchResult, coerce_config
from jalias.search.searchrun import SearchRun
from jalias.search.vocab import initial_ids, mutate


@dataclass
class EvolutionConfig(SearchConfig):
    population: int = 50
    generations: Optional[int] = 100  # None: until the budget is spent
    selection: str = "tournament"  # 'tournament' | 'truncation'
    tournament_size: int = 3
    truncation_fraction: float = 0.5  # parents drawn from this top fraction (truncation selection)
    crossover_rate: float = 0.5  # probability that a child is a uniform crossover of two parents
    mutation_rate: Optional[float] = None  # per-token mutation probability; None: 1 / length
    elitism: int = 2  # best members copied unchanged into the next generation

    def validate(self, engine: ScoringEngine) -> None:
        super().validate(engine)
        if self.population < 2:
            raise ValueError(f"population must be >= 2, got {self.population}")
        if not 0 <= self.elitism < self.population:
            raise ValueError(f"elitism must be in [0, population), got {self.elitism}")
        if self.selection not in ("tournament", "truncation"):
            raise ValueError(f"selection must be 'tournament' or 'truncation', got {self.selection!r}")
        if self.tournament_size < 1:
            raise ValueError(f"tournament_size must be >= 1, got {self.tournament_size}")
        if not 0 < self.truncation_fraction <= 1:
            raise ValueError(f"truncation_fraction must be in (0, 1], got {self.truncation_fraction}")
        if not 0 <= self.crossover_rate <= 1:
            raise ValueError(f"crossover_rate must be in [0, 1], got {self.crossover_rate}")
        if self.mutation_rate is not None and not 0 <= self.mutation_rate <= 1:
            raise ValueError(f"mutation_rate must be in [0, 1], got {self.mutation_rate}")


def rank_order(objective: np.ndarray, rung: np.ndarray) -> np.ndarray:
    """int[P] member indices best first: members that passed more halving rungs first, then by objective."""
    return np.lexsort((-objective, -rung))


def select_parents(order: np.ndarray, n: int, config: EvolutionConfig, rng: np.random.Generator) -> np.ndarray:
    """int[n, 2] parent indices from a population ranked best first by `order` int[P]."""
    size = order.size
    if config.selection == "tournament":
        # a tournament's winner is the entrant with the best rank
        entrants = rng.integers(size, size=(n, 2, config.tournament_size))
        return order[entrants.min(axis=2)]
    top = max(1, int(round(config.truncation_fraction * size)))
    return order[rng.integers(top, size=(n, 2))]


def make_children(pop: np.ndarray, parents: np.ndarray, allowed: np.ndarray, crossover_rate: float,
                  mutation_rate: float, rng: np.random.Generator, accept=None) -> np.ndarray:
    """int32[n, L] children of pop int32[P, L] from parents int[n, 2]: uniform crossover with probability
    crossover_rate (else a copy of the first parent), then each token mutated with probability mutation_rate.
    Children equal to a population member or an earlier child, or that accept(ids[1, L]) -> bool[1] refuses
    (SearchRun.round_trips), get extra point mutations (up to 10 tries)."""
    n, length = parents.shape[0], pop.shape[1]
    cross = rng.random(n) < crossover_rate
    take_first = rng.random((n, length)) < 0.5
    children = np.where(cross[:, None] & ~take_first, pop[parents[:, 1]], pop[parents[:, 0]])
    mutated = rng.random((n, length)) < mutation_rate
    children = np.where(mutated, allowed[rng.integers(allowed.size, size=(n, length))], children).astype(np.int32)
    seen = {tuple(row) for row in pop.tolist()}
    for i in range(n):
        for _ in range(10):
            if tuple(children[i].tolist()) not in seen and (accept is None or accept(children[i][None])[0]):
                break
            children[i] = mutate(children[i], allowed, rng, 1)
        seen.add(tuple(children[i].tolist()))
    return children


def initial_population(config: EvolutionConfig, allowed: np.ndarray, mutation_rate: float,
                       rng: np.random.Generator, first=None) -> np.ndarray:
    """int32[P, L]: random sequences, or (init='label') the label followed by mutants of it. first(): a starting
    sequence (default `vocab.initial_ids`; SearchRun.initial_ids draws ones that round-trip)."""
    first = first or (lambda: initial_ids(config, allowed, rng))
    if config.init == "random":
        return np.stack([first() for _ in range(config.population)])
    label = first()
    mutants = [mutate(label, allowed, rng, max(1, rng.binomial(config.length, mutation_rate)))
               for _ in range(config.population - 1)]
    return np.stack([label] + mutants)


def run(engine: ScoringEngine, config: Optional[EvolutionConfig] = None, *,
        on_checkpoint: Optional[Checkpoint] = None, resume_state: Optional[dict] = None,
        on_progress: Optional[Callable[[int], None]] = None) -> SearchResult:
    """Evolutionary search on `engine` within config.budget candidate-image evaluations."""
    config = coerce_config(config, EvolutionConfig, "evolution")
    sr = SearchRun("evolution", engine, config, on_checkpoint, resume_state, on_progress)
    budget, rng, allowed = sr.budget, sr.rng, sr.allowed
    mutation_rate = 1.0 / config.length if config.mutation_rate is None else config.mutation_rate
    full_rung = len(budget.rungs) - 1

    st = sr.state
    if st is None:
        pop = initial_population(config, allowed, mutation_rate, rng, first=sr.initial_ids)
        scored = budget.evaluate(pop, min_keep=config.elitism)
        if scored.unpaid.any():
            return sr.result("budget")
        st = sr.checkpoint({"population": pop.tolist(), "objective": scored.objective.tolist(),
                            "rung": scored.rung.tolist(), "generation": 0})

    while True:
        if config.generations is not None and st["generation"] >= config.generations:
            return sr.result("generations")
        if budget.remaining < budget.n_images:
            return sr.result("budget")
        pop = np.asarray(st["population"], dtype=np.int32)
        obj = np.asarray(st["objective"], dtype=np.float32)
        rung = np.asarray(st["rung"], dtype=np.int32)
        order = rank_order(obj, rung)

        # 1. elites survive as they are (only fully scored ones, so their scores stay exact)
        elites = [i for i in order[: config.elitism] if rung[i] == full_rung]

        # 2. children of selected parents, scored (with halving, only the best reach all images)
        n_children = config.population - len(elites)
        parents = select_parents(order, n_children, config, rng)
        children = make_children(pop, parents, allowed, config.crossover_rate, mutation_rate, rng,
                                 accept=sr.round_trips)
        scored = budget.evaluate(children, min_keep=config.elitism)
        if scored.unpaid.any():
            return sr.result("budget")

        # 3. next generation
        st.update(
            population=pop[elites].tolist() + children.tolist(),
            objective=obj[elites].tolist() + scored.objective.tolist(),
            rung=rung[elites].tolist() + scored.rung.tolist(),
            generation=st["generation"] + 1,
        )
        sr.checkpoint(st)
