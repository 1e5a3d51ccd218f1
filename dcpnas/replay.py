"""Parent outputs recorded in the Parent phase and replayed in the Child phase (``parent_outputs: replay``).

A Child architecture-phase step needs three things from the frozen Parent: its soft targets on the weight
batch, its soft targets on the architecture batch and, with ``tangent: batch``, its tangent there. Computing
them live costs a Parent forward and a Parent forward + alpha-backward per Child step, about a fifth of the
step (docs/benchmarks/search_step.md). The Parent step computes exactly these quantities on the same batches
(in this mode the Child phase reads the Parent phase's batch order), only with the Parent as it was at that
step instead of at the end of its phase: the book's "tangent produced during the Parent phase". This buffer
keeps them on the device, one entry per step, for the following Child phase. Warm-up epochs do not replay:
their Child learns from the live Parent (docs/method.md, "Replay and search quality").
"""

from __future__ import annotations

from torch import Tensor

Entry = tuple[Tensor, Tensor, Tensor]  # (teacher, teacher_arch, tangent)


class ParentReplay:
    """Per step of the current epoch: the Parent's soft targets on both batches and its reduced tangent."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []

    def __len__(self) -> int:
        return len(self.entries)

    def record(self, step: int, teacher: Tensor, teacher_arch: Tensor, tangent: Tensor) -> None:
        """The Parent's outputs at Parent step ``step``; a step run again (a timing loop, the dry run's
        measurement) replaces its entry and drops any later one."""
        if step > len(self):
            raise RuntimeError(f"replay: Parent step {step} recorded after only {len(self)} steps")
        del self.entries[step:]
        self.entries.append((teacher.detach(), teacher_arch.detach(), tangent.detach()))

    def get(self, step: int) -> Entry:
        """What Parent step ``step`` recorded, for Child step ``step`` of the same epoch."""
        if step >= len(self):
            raise RuntimeError(f"replay: Child step {step} has no Parent step to replay ({len(self)} recorded)")
        return self.entries[step]

    def clear(self) -> None:
        self.entries.clear()

    def state_dict(self) -> dict[str, list[list[Tensor]]]:
        """Empty at epoch ends, where the pipeline checkpoints; a mid-epoch state holds this rank's entries."""
        return {"entries": [list(e) for e in self.entries]}

    def load_state_dict(self, state: dict[str, list[list[Tensor]]]) -> None:
        self.entries = [(t, ta, tg) for t, ta, tg in state["entries"]]
