"""DCP-NAS in pure PyTorch: Parent/Child supernets, tangent propagation, decoupled optimisation.

Importing the package registers every op, search space and network by name.
"""

from dcpnas import network as _network  # noqa: F401  (registers networks)
from dcpnas.genotype import Genotype, load_genotype
from dcpnas.registry import NETWORKS, OPS, SPACES
from dcpnas.search import DCPNASSearch, SearchConfig
from dcpnas.spaces import SearchSpace, get_space

__all__ = [
    "NETWORKS",
    "OPS",
    "SPACES",
    "DCPNASSearch",
    "Genotype",
    "SearchConfig",
    "SearchSpace",
    "get_space",
    "load_genotype",
]
