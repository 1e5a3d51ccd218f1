"""``parent_outputs: replay`` in the loop: batch order, passes, resume (its gradients: test_search_loop.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from dcpnas.checkpoint import load_checkpoint, save_checkpoint
from dcpnas.search import DCPNASSearch, SearchConfig, TensorSearchData


def batch(g: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.randint(0, 3, (n,), generator=g)
    return torch.randn(n, 3, 8, 8, generator=g) + y.view(-1, 1, 1, 1), y


def data(seed: int = 0) -> TensorSearchData:
    g = torch.Generator().manual_seed(seed)
    return TensorSearchData(batch(g, 24), batch(g, 24), batch(g, 12), batch_size=8, seed=seed)


def test_replay_reads_the_parent_batches_and_runs_no_parent_pass(tiny_config: Callable[..., SearchConfig]) -> None:
    """After warm-up; a warm-up Child phase reads its own batches and runs the live teacher."""
    s = DCPNASSearch(tiny_config(warmup_epochs=1, epochs=2, parent_outputs="replay"))
    seen: dict[tuple[int, str], list[torch.Tensor]] = {}
    passes: dict[tuple[int, str], int] = {}  # Parent forwards within each phase's steps (evaluation left out)
    in_step: list[tuple[int, str]] = []

    def count(*_) -> None:
        for key in in_step:
            passes[key] = passes.get(key, 0) + 1

    s.parent.register_forward_hook(count)

    def recording(phase: str, step: Callable) -> Callable:
        def run_step(wb, ab) -> None:
            seen.setdefault((s.epoch, phase), []).append(wb[0])
            in_step.append((s.epoch, phase))
            step(wb, ab)
            in_step.clear()

        return run_step

    for phase in ("parent", "child"):
        setattr(s, f"{phase}_step", recording(phase, getattr(s, f"{phase}_step")))
    s.run(data())
    assert passes == {(0, "parent"): 3, (0, "child"): 3, (1, "parent"): 6}  # replayed: no Parent pass in (1, child)
    assert all(map(torch.equal, seen[1, "parent"], seen[1, "child"]))
    assert not torch.equal(seen[0, "parent"][0], seen[0, "child"][0])
    assert len(s.replay) == 0  # emptied at the epoch's end: a checkpoint there holds no replay


def test_replay_resumes_bitwise_from_the_middle_of_the_child_phase(
    tmp_path, tiny_config: Callable[..., SearchConfig]
) -> None:
    cfg = tiny_config(parent_outputs="replay")
    full = DCPNASSearch(cfg)
    full.run(data())
    interrupted = DCPNASSearch(cfg)
    interrupted.run(data(), max_steps=10)  # epoch 2: 3 Parent steps recorded, one replayed
    assert (interrupted.phase, interrupted.step, len(interrupted.replay)) == ("child", 1, 3)
    path = save_checkpoint(interrupted.state_dict(), tmp_path / "ckpt.pt")
    resumed = DCPNASSearch(cfg)
    resumed.load_state_dict(load_checkpoint(path))
    resumed.run(data())
    assert torch.equal(full.child.alpha, resumed.child.alpha)
    assert all(torch.equal(a, b) for a, b in zip(full.child.parameters(), resumed.child.parameters()))
