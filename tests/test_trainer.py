"""The fit of every stage: Ray Train without the helper actors it never uses (docs/stack.md §2.7)."""

from __future__ import annotations

import pytest

from pipeline.runtime.trainer import lean_trainer


def _noop(config: dict) -> None:
    """A worker function; never run here."""


@pytest.mark.parametrize("local", [False, True])
def test_lean_trainer_leaves_out_exactly_the_unused_helper_actors(local: bool) -> None:
    from ray.train.torch import TorchTrainer

    def callbacks(cls: type) -> list[str]:
        return [type(c).__name__ for c in cls(_noop)._create_default_callbacks()]

    full, lean = callbacks(TorchTrainer), callbacks(lean_trainer(local))
    dropped = {"DatasetsCallback", "PlacementGroupCleanerCallback"} if local else {"DatasetsCallback"}
    assert dropped <= set(full)  # a Ray upgrade that renames or drops them fails here, not silently
    assert lean == [name for name in full if name not in dropped]
