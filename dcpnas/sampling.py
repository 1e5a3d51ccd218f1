"""Uniform random genotypes of a search space: the control a search must beat (Li & Talwalkar, 2019).

A genotype is drawn the way DARTS' derivation shapes one: every intermediate node, in each cell,
takes ``inputs_per_node`` distinct earlier states (listed in input order, as ``Genotype.from_alphas``
lists them) each with a non-``none`` op, all choices uniform and independent. So every genotype a
search can return is drawn with the same probability.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable

from dcpnas.genotype import CELL_TYPES, Genotype
from dcpnas.spaces import SearchSpace

DRAWS_PER_GENOTYPE = 100  # rejection-sampling budget: random_genotypes gives up after k x this many draws


def space_size(space: SearchSpace) -> int:
    """How many distinct genotypes ``space`` holds: per cell, prod over nodes of C(inputs, n) x ops^n."""
    n, ops = space.inputs_per_node, len(space.selectable_ops)
    cell = math.prod(math.comb(node + 2, n) * ops**n for node in range(space.steps))
    return cell ** len(CELL_TYPES)


def sample_genotype(space: SearchSpace, rng: random.Random) -> Genotype:
    """One genotype drawn uniformly from ``space``."""
    cells = []
    for _ in CELL_TYPES:
        edges = []
        for node in range(space.steps):
            inputs = sorted(rng.sample(range(node + 2), space.inputs_per_node))
            edges += [(rng.choice(space.selectable_ops), src) for src in inputs]
        cells.append(tuple(edges))
    return Genotype(space.name, cells[0], space.concat, cells[1], space.concat).validate(space)


def random_genotypes(
    space: SearchSpace,
    k: int,
    seed: int,
    exclude: Iterable[Genotype] = (),
    accept: Callable[[Genotype], bool] | None = None,
    max_draws: int | None = None,
) -> list[Genotype]:
    """``k`` distinct genotypes of ``space``, none in ``exclude``, each passing ``accept`` (e.g. an OPs
    window), drawn in a fixed order from ``seed``: the same arguments always give the same list.

    Raises ``ValueError`` when the space holds fewer than ``k`` genotypes outside ``exclude``, or when
    ``max_draws`` (default ``k x DRAWS_PER_GENOTYPE``) draws find fewer than ``k`` acceptable ones.
    """
    seen = {g.hash for g in exclude}
    available = space_size(space) - len(seen)
    if k > available:
        raise ValueError(f"space '{space.name}' holds only {available} genotype(s) besides the searched ones, not {k}")
    rng = random.Random(seed)
    out: list[Genotype] = []
    budget = max_draws if max_draws is not None else k * DRAWS_PER_GENOTYPE
    for _ in range(budget):
        if len(out) == k:
            break
        g = sample_genotype(space, rng)
        if g.hash in seen:
            continue
        seen.add(g.hash)  # a rejected genotype is not drawn into the count again
        if accept is None or accept(g):
            out.append(g)
    if len(out) < k:
        raise ValueError(f"space '{space.name}': {budget} draws found only {len(out)} of {k} acceptable genotype(s)")
    return out
