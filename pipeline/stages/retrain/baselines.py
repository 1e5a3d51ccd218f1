"""Random-genotype baselines: the control that says what a search is worth (docs/retrain.md).

After the searched genotypes are retrained, ``retrain.random_baselines`` (k) genotypes per retrained
space are drawn uniformly (``dcpnas.sampling``, seed ``retrain.random_seed``; distinct, and distinct
from the searched ones), optionally only those whose OPs lie within ``retrain.random_ops_tolerance``
of the best searched genotype of that space, and retrained with the searched genotypes' config:
the same steps, epochs, seeds and data. Their runs hang under the sweep run (they come from no
search trial), tagged ``stage=retrain, origin=random``, and are keyed by genotype and recipe, so a
re-run of ``dcpnas run`` finds them again.
"""

from __future__ import annotations

from collections.abc import Callable

from dcpnas.genotype import Genotype
from dcpnas.registry import SPACES
from dcpnas.sampling import random_genotypes, space_size
from dcpnas.spaces import get_space
from pipeline.config import Config
from pipeline.data.streams import image_size
from pipeline.errors import UserError
from pipeline.models import build_network, cost_metrics
from pipeline.names import ORIGIN_TAG
from pipeline.stages.retrain.plan import retrain_key
from pipeline.stages.retrain.stage import RetrainJob


def check_capacity(cfg: Config) -> None:
    """Before any compute: each sweep space must hold k random genotypes besides up to top_k searched ones."""
    r = cfg.retrain
    if not (r.random_baselines and r.top_k):
        return
    for name in (s for s in cfg.sweep.spaces if s in SPACES):  # an unknown space is the sweep's error
        size = space_size(get_space(name))
        if r.random_baselines + r.top_k > size:
            raise UserError(
                f"retrain.random_baselines {r.random_baselines}: space '{name}' holds only {size} distinct "
                f"genotype(s), and up to retrain.top_k {r.top_k} of them are the searched ones"
            )


def genotype_ops(cfg: Config, genotype: Genotype, classes: int) -> float:
    """OPs of the genotype's final retrain network at the retrain image size (the report's ``ops``)."""
    return cost_metrics(build_network(cfg, genotype, cfg.retrain.steps[-1], classes), image_size(cfg))["ops"]


def _within(cfg: Config, classes: int, ref: float, tol: float) -> Callable[[Genotype], bool]:
    return lambda g: abs(genotype_ops(cfg, g, classes) / ref - 1) <= tol


def sample_baselines(cfg: Config, searched: list[Genotype], classes: int) -> list[Genotype]:
    """The random genotypes to retrain next to ``searched`` (best first): k per space that ``searched`` covers."""
    r = cfg.retrain
    out: list[Genotype] = []
    for space in dict.fromkeys(g.space for g in searched):
        accept, window = None, ""
        if r.random_ops_tolerance is not None:
            ref = genotype_ops(cfg, next(g for g in searched if g.space == space), classes)
            tol = r.random_ops_tolerance
            window = f" within retrain.random_ops_tolerance {tol:g} of the searched genotype's {ref:,.0f} OPs"
            accept = _within(cfg, classes, ref, tol)
        try:
            out += random_genotypes(get_space(space), r.random_baselines, r.random_seed, searched, accept)
        except ValueError as e:
            raise UserError(f"retrain.random_baselines {r.random_baselines}{window}: {e}") from None
    return out


def baseline_key(cfg: Config, genotype: Genotype) -> str:
    return f"random:{genotype.hash[:12]},{retrain_key(cfg)}"


def baseline_jobs(cfg: Config, genotypes: list[Genotype], sweep_run_id: str) -> list[RetrainJob]:
    """A retrain under the sweep run for each random genotype, tagged ``origin=random``."""
    tags = {ORIGIN_TAG: "random", "random_seed": cfg.retrain.random_seed}
    return [RetrainJob(g, sweep_run_id, tags, baseline_key(cfg, g)) for g in genotypes]
