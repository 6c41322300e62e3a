"""Searched stage-wise schedules: Diff-ES's evolutionary search, a genetic algorithm, random and greedy search.

Every search works on the same space (`stages.StageSpace`: integer levels per stage and unit group) under the same
budget (their sum, fixed), with the same cached fitness; only the way candidates are proposed differs:

- `evolution` (Diff-ES section 3.2 and its implementation details): survivors + offspring (4 + 16), each offspring
  one level-switch mutation of a random survivor (move `m` levels, 1 <= m <= `max_mutation`, from one cell to
  another, so the sum stays exact); the population starts from even, random and patterned schedules.
- `genetic` (DiffSparse A.5.4): tournament parents, uniform crossover repaired to the budget, per-cell mutation
  with a small probability, elites carried over.
- `random`: budget-exact random individuals, the best kept.
- `greedy`: from the even spread, try every one-level move between two cells and take the best, until none helps.

A search advances a generation at a time (`step`), can be stopped after any generation and resumed from its
`state_dict` (the random generator's state included), so a run with the same seed gives the same result.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from diffsparse.allocate.stages import StageSpace

ALGORITHMS = ("evolution", "genetic", "random", "greedy")


def _key(x: np.ndarray) -> bytes:
    return np.asarray(x, dtype=np.int64).tobytes()


class Search:
    """Base: a population of individuals (stages x groups integer levels) with a fixed level sum, and a fitness
    (higher is better) evaluated once per distinct individual."""

    name = "search"

    def __init__(self, space: StageSpace, total: int, fitness: Callable[[np.ndarray], float], seed: int = 0,
                 population: int = 20, **options):  # fmt: skip
        space.check(space.even(total), total)
        self.space, self.total, self.fitness_fn = space, total, fitness
        self.population_size = population
        self.rng = np.random.default_rng(seed)
        self.options = options
        self.cache: dict[bytes, float] = {}
        self.evaluated: list[tuple[list, float]] = []  # every distinct individual, in order of evaluation
        self.population: list[np.ndarray] = []
        self.generation = 0
        self.done = False

    # --- evaluation -----------------------------------------------------------------------------------------------
    def fitness(self, x: np.ndarray) -> float:
        key = _key(x)
        if key not in self.cache:
            self.space.check(x, self.total)  # every candidate meets the budget exactly
            self.cache[key] = float(self.fitness_fn(x))
            self.evaluated.append((np.asarray(x).tolist(), self.cache[key]))
        return self.cache[key]

    def ranked(self, individuals: list[np.ndarray]) -> list[np.ndarray]:
        """Individuals by fitness, best first (ties: the earlier one)."""
        order = sorted(range(len(individuals)), key=lambda i: (-self.fitness(individuals[i]), i))
        return [individuals[i] for i in order]

    @property
    def best(self) -> tuple[np.ndarray, float]:
        x, f = max(self.evaluated, key=lambda item: item[1])
        return np.asarray(x), f

    # --- candidates -----------------------------------------------------------------------------------------------
    def random_individual(self) -> np.ndarray:
        """Levels of sum `total`, each unit of level given to a random cell that still has room."""
        upper = self.space.upper().reshape(-1)
        flat = np.zeros_like(upper)
        for _ in range(self.total):
            room = np.flatnonzero(flat < upper)
            flat[self.rng.choice(room)] += 1
        return flat.reshape(self.space.shape)

    def patterned(self) -> list[np.ndarray]:
        """Even, increasing, decreasing, high-low-high and low-high-low over the stages (the same in every group)."""
        k, g = self.space.shape
        ramp = np.linspace(-1.0, 1.0, k)
        shapes = [np.zeros(k), ramp, -ramp, np.abs(ramp) - np.abs(ramp).mean(), np.abs(ramp).mean() - np.abs(ramp)]
        return [self.repair(self.space.even(self.total) + np.rint(s * self.space.levels / 4).astype(int)[:, None]
                            * np.ones((1, g), dtype=int)) for s in shapes]  # fmt: skip

    def repair(self, x: np.ndarray) -> np.ndarray:
        """Clip to 0..levels, then add or remove single levels at random cells until the sum is `total`."""
        upper = self.space.upper()
        x = np.clip(np.asarray(x, dtype=np.int64), 0, upper).copy()
        flat, upper = x.reshape(-1), upper.reshape(-1)
        while flat.sum() != self.total:
            if flat.sum() < self.total:
                flat[self.rng.choice(np.flatnonzero(flat < upper))] += 1
            else:
                flat[self.rng.choice(np.flatnonzero(flat > 0))] -= 1
        return x

    def level_switch(self, x: np.ndarray, max_mutation: int) -> np.ndarray:
        """Diff-ES's mutation: move m levels (1..max_mutation) from one cell to another; the sum is unchanged."""
        flat = np.asarray(x).reshape(-1).copy()
        upper = self.space.upper().reshape(-1)
        givers = np.flatnonzero(flat > 0)
        takers = np.flatnonzero(flat < upper)
        if len(givers) == 0 or len(takers) == 0:
            return flat.reshape(x.shape)
        for _ in range(100):
            i, j = self.rng.choice(givers), self.rng.choice(takers)
            if i != j:
                break
        else:
            return flat.reshape(x.shape)
        m = int(self.rng.integers(1, max_mutation + 1))
        m = min(m, flat[i], upper[j] - flat[j])
        flat[i] -= m
        flat[j] += m
        return flat.reshape(x.shape)

    # --- the loop -------------------------------------------------------------------------------------------------
    def initialise(self) -> None:
        raise NotImplementedError

    def step(self) -> None:
        """One generation (the first call evaluates the initial population)."""
        if not self.population:
            self.initialise()
        else:
            self.advance()
        self.generation += 1

    def advance(self) -> None:
        raise NotImplementedError

    # --- resuming -------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "algorithm": self.name,
            "total": self.total,
            "generation": self.generation,
            "done": self.done,
            "population": [x.tolist() for x in self.population],
            "evaluated": self.evaluated,
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["algorithm"] != self.name or state["total"] != self.total:
            raise ValueError(
                f"Saved search state is {state['algorithm']} with level sum {state['total']}, not {self.name} with "
                f"{self.total}: resume with the same algorithm and budget, or start a new output_dir."
            )
        self.generation, self.done = state["generation"], state["done"]
        self.population = [np.asarray(x, dtype=np.int64) for x in state["population"]]
        self.evaluated = [(x, f) for x, f in state["evaluated"]]
        self.cache = {_key(np.asarray(x)): f for x, f in self.evaluated}
        self.rng.bit_generator.state = state["rng"]


class Evolution(Search):
    """Diff-ES: survivors + offspring, level-switch mutation."""

    name = "evolution"

    def initialise(self) -> None:
        survivors = self.options.get("survivors", 4)
        start = self.patterned()
        while len(start) < survivors + self.options.get("offspring", 16):
            start.append(self.random_individual())
        self.population = self.ranked(start)[:survivors]

    def advance(self) -> None:
        survivors, offspring = self.options.get("survivors", 4), self.options.get("offspring", 16)
        max_mutation = self.options.get("max_mutation", 5)
        children = [self.level_switch(self.population[self.rng.integers(len(self.population))], max_mutation)
                    for _ in range(offspring)]  # fmt: skip
        self.population = self.ranked(self.population + children)[:survivors]


class Genetic(Search):
    """Tournament selection, uniform crossover repaired to the budget, rare per-cell mutation, elites kept."""

    name = "genetic"

    def initialise(self) -> None:
        self.population = self.ranked([self.random_individual() for _ in range(self.population_size)])

    def _tournament(self) -> np.ndarray:
        a, b = self.rng.integers(len(self.population), size=2)
        return self.population[min(a, b)]  # the population is ranked: the lower index is the fitter

    def advance(self) -> None:
        elites = self.options.get("elites", 2)
        p_mutation = self.options.get("mutation_probability", 0.05)
        children = []
        while len(children) < self.population_size - elites:
            a, b = self._tournament(), self._tournament()
            child = np.where(self.rng.random(a.shape) < 0.5, a, b)
            mutate = self.rng.random(a.shape) < p_mutation
            child = np.where(mutate, self.rng.integers(0, self.space.levels + 1, a.shape), child)
            children.append(self.repair(child))
        self.population = self.ranked(self.population[:elites] + children)


class RandomSearch(Search):
    """Budget-exact random individuals, `population` per generation."""

    name = "random"

    def initialise(self) -> None:
        self.advance()

    def advance(self) -> None:
        fresh = [self.random_individual() for _ in range(self.population_size)]
        self.population = self.ranked(self.population + fresh)[:1]


class Greedy(Search):
    """Hill climbing from the even spread: all one-level moves between two cells, the best taken, until none
    improves (then `done`)."""

    name = "greedy"

    def initialise(self) -> None:
        self.population = [self.space.even(self.total)]
        self.fitness(self.population[0])

    def advance(self) -> None:
        current = self.population[0]
        flat, upper = current.reshape(-1), self.space.upper().reshape(-1)
        moves = []
        for i in np.flatnonzero(flat > 0):
            for j in np.flatnonzero(flat < upper):
                if i != j:
                    y = flat.copy()
                    y[i] -= 1
                    y[j] += 1
                    moves.append(y.reshape(current.shape))
        best = self.ranked(moves)[0] if moves else current
        if self.fitness(best) > self.fitness(current):
            self.population = [best]
        else:
            self.done = True


SEARCHES = {cls.name: cls for cls in (Evolution, Genetic, RandomSearch, Greedy)}


def make_search(algorithm: str, space: StageSpace, total: int, fitness, seed: int = 0, **options) -> Search:
    if algorithm not in SEARCHES:
        raise ValueError(f"Unknown search {algorithm!r}; choose one of {ALGORITHMS}.")
    return SEARCHES[algorithm](space, total, fitness, seed=seed, **options)
