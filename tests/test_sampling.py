"""Random genotypes: uniform over exactly the genotypes a search can return, distinct, reproducible, bounded."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter

import pytest

from dcpnas.genotype import Genotype
from dcpnas.sampling import random_genotypes, sample_genotype, space_size
from dcpnas.spaces import SearchSpace, get_space

TINY = SearchSpace("tiny", ("skip_connect", "max_pool_3x3", "none"), steps=2)  # 2 ops, 2 nodes


def all_genotypes(space: SearchSpace) -> set[str]:
    """Every genotype of ``space`` by enumeration, as the hashes ``from_alphas`` would give."""
    cells = []
    for node_choices in itertools.product(
        *(
            [
                (tuple(zip(ops, inputs)))
                for inputs in itertools.combinations(range(node + 2), 2)
                for ops in itertools.product(space.selectable_ops, repeat=2)
            ]
            for node in range(space.steps)
        )
    ):
        cells.append(tuple(e for pair in node_choices for e in pair))
    return {Genotype(space.name, n, space.concat, r, space.concat).hash for n, r in itertools.product(cells, cells)}


def test_space_size_counts_every_genotype() -> None:
    assert space_size(TINY) == len(all_genotypes(TINY)) == (1 * 4 * 3 * 4) ** 2  # C(2,2)·2² × C(3,2)·2², per cell
    assert space_size(get_space("dcpnas_3x3")) == (1 * 3 * 6 * 10 * 5**8) ** 2
    assert space_size(get_space("dcpnas")) == (180 * 7**8) ** 2


def test_samples_are_valid_and_uniform_over_the_space() -> None:
    rng = random.Random(0)
    draws = Counter(sample_genotype(TINY, rng).hash for _ in range(28800))
    assert set(draws) == all_genotypes(TINY)  # every genotype reachable, nothing else (each one validates)
    expected = 28800 / space_size(TINY)  # 12.5 per genotype
    chi2 = sum((c - expected) ** 2 / expected for c in draws.values())
    assert chi2 < 2304 + 5 * math.sqrt(2 * 2304)  # chi-square with 2303 dof: mean 2303, sd 68
    g = sample_genotype(get_space("dcpnas"), random.Random(1))
    assert g.validate() is g and "none" not in {op for op, _ in g.normal + g.reduce}
    for cell in (g.normal, g.reduce):  # two distinct inputs per node, in input order
        assert all(cell[k][1] < cell[k + 1][1] for k in range(0, len(cell), 2))


def test_random_genotypes_are_distinct_reproducible_and_skip_the_searched() -> None:
    space = get_space("dcpnas_3x3")
    first = random_genotypes(space, 5, seed=7)
    assert [g.hash for g in first] == [g.hash for g in random_genotypes(space, 5, seed=7)]
    assert [g.hash for g in first] != [g.hash for g in random_genotypes(space, 5, seed=8)]
    assert len({g.hash for g in first}) == 5
    again = random_genotypes(space, 4, seed=7, exclude=[first[0]])
    assert first[0].hash not in {g.hash for g in again} and again[0].hash == first[1].hash


def test_the_space_or_the_acceptance_window_can_run_out() -> None:
    everything = random_genotypes(TINY, space_size(TINY), seed=0, max_draws=100_000)
    assert len({g.hash for g in everything}) == space_size(TINY)
    with pytest.raises(
        ValueError, match=r"space 'tiny' holds only 2303 genotype\(s\) besides the searched ones, not 2304"
    ):
        random_genotypes(TINY, 2304, seed=0, exclude=everything[:1])
    pools = lambda g: g.count("max_pool_3x3") + g.count("max_pool_3x3", "reduce")  # noqa: E731
    picked = random_genotypes(TINY, 3, seed=0, accept=lambda g: pools(g) == 4)
    assert [pools(g) for g in picked] == [4, 4, 4]
    with pytest.raises(ValueError, match=r"30 draws found only 0 of 2 acceptable"):
        random_genotypes(TINY, 2, seed=0, accept=lambda g: False, max_draws=30)
