"""Search spaces: which ops an edge chooses from, and the cell's node layout (method §2)."""

from __future__ import annotations

from dataclasses import dataclass

from dcpnas.ops import create_op  # noqa: F401  (registers the ops)
from dcpnas.registry import OPS, SPACES


@dataclass(frozen=True)
class SearchSpace:
    """A DARTS-style cell space: ``steps`` intermediate nodes, each fed by every earlier state.

    ``ops`` fixes the column order of the architecture parameters; ``none`` must be present
    (mixed ops need a zero candidate) and is never selected into a genotype.
    """

    name: str
    ops: tuple[str, ...]
    steps: int = 4
    inputs_per_node: int = 2
    description: str = ""

    def __post_init__(self) -> None:
        for op in self.ops:
            OPS.get(op)
        if "none" not in self.ops:
            raise ValueError(f"space '{self.name}' needs a 'none' op")
        if len(set(self.ops)) != len(self.ops):
            raise ValueError(f"space '{self.name}' lists an op twice")

    @property
    def num_ops(self) -> int:
        return len(self.ops)

    @property
    def num_edges(self) -> int:
        return sum(2 + i for i in range(self.steps))

    @property
    def concat(self) -> tuple[int, ...]:
        return tuple(range(2, 2 + self.steps))

    def edges(self) -> list[tuple[int, int]]:
        """(source state, target node) per edge, in alpha row order; nodes count from 2."""
        return [(j, i + 2) for i in range(self.steps) for j in range(2 + i)]

    @property
    def selectable_ops(self) -> tuple[str, ...]:
        return tuple(o for o in self.ops if o != "none")


def register_space(space: SearchSpace) -> SearchSpace:
    SPACES.add(space.name, space)
    return space


def get_space(name: str) -> SearchSpace:
    return SPACES.get(name)


# The DCP-NAS space in the retraining repo's column order (none last), method §2.2.
register_space(
    SearchSpace(
        "dcpnas",
        (
            "max_pool_3x3",
            "avg_pool_3x3",
            "skip_connect",
            "sep_conv_3x3",
            "sep_conv_5x5",
            "dil_conv_3x3",
            "dil_conv_5x5",
            "none",
        ),
        description="DCP-NAS / DARTS 8-op space (M=8), repo column order",
    )
)
# Same ops in DARTS' column order, so published DARTS genotypes validate against their own space.
register_space(
    SearchSpace(
        "darts",
        (
            "none",
            "max_pool_3x3",
            "avg_pool_3x3",
            "skip_connect",
            "sep_conv_3x3",
            "sep_conv_5x5",
            "dil_conv_3x3",
            "dil_conv_5x5",
        ),
        description="DARTS 8-op space, DARTS column order",
    )
)
# A cheaper space for sweeps: no 5x5 kernels, so every binary conv is 3x3 or 1x1.
register_space(
    SearchSpace(
        "dcpnas_3x3",
        ("max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "dil_conv_3x3", "none"),
        description="DCP-NAS space without 5x5 ops (M=6): fewer BOPs, smaller supernet",
    )
)
# Convolution-only space: forbids the parameter-free ops that dominate collapsed searches.
register_space(
    SearchSpace(
        "dcpnas_conv",
        ("skip_connect", "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5", "none"),
        description="DCP-NAS space without pooling ops (M=6): every chosen op but skip is a binary conv",
    )
)
