"""The search's hot loop on an accelerator: host syncs per step, and which rows a phase reads."""

from __future__ import annotations

import traceback
from collections import Counter
from collections.abc import Callable

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from dcpnas.search import DCPNASSearch, SearchConfig, TensorSearchData, pair_indices

HOST_COPIES = (torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu)


def dcpnas_file() -> str:
    files = [f.filename for f in traceback.extract_stack() if "/dcpnas/" in f.filename]
    return files[-1].rsplit("/", 1)[-1] if files else "elsewhere"


class SyncCounter(TorchDispatchMode):
    """Counts the reads that sync the host with a GPU, by the innermost ``dcpnas`` file on the stack:
    ``aten._local_scalar_dense`` (``.item()``, ``float()``, ``bool()``) and copies to the host
    (``.tolist()``, ``.numpy()``, ``.cpu()``, which on CPU tensors never reach the dispatcher).

    Not counted: the optimisers' ``step`` counters (torch keeps them on the host, ``capturable=False``)
    and scalar reads in ``genotype.py``, which reads the host copy of alpha it made (counted once).
    """

    def __init__(self, search: DCPNASSearch) -> None:
        super().__init__()
        self.search, self.where = search, Counter()
        counter = self

        class Copies(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if func in HOST_COPIES:
                    counter.where[dcpnas_file()] += 1
                return func(*args, **(kwargs or {}))

        self.copies = Copies()

    def __enter__(self):
        self.copies.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.copies.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            steps = {st["step"].data_ptr() for o in self.search.opt.values() for st in o.state.values() if "step" in st}
            where = dcpnas_file()
            if args[0].data_ptr() not in steps and where != "genotype.py":
                self.where[where] += 1
        return func(*args, **(kwargs or {}))


def uneven_data(n_weights: int = 40, n_arch: int = 16, batch: int = 8, **kw) -> TensorSearchData:
    g = torch.Generator().manual_seed(0)

    def split(n: int):
        y = torch.randint(0, 3, (n,), generator=g)
        x = torch.randn(n, 3, 8, 8, generator=g) + y.view(-1, 1, 1, 1).float()
        return x, y

    return TensorSearchData(split(n_weights), split(n_arch), split(12), batch_size=batch, **kw)


@pytest.mark.slow
def test_hot_loop_syncs_the_host_at_most_once_per_step_with_architecture_updates(
    tiny_config: Callable[..., SearchConfig],
) -> None:
    # One epoch, architecture on from the first step: 4 weight batches against 2 arch batches per phase.
    search = DCPNASSearch(tiny_config(epochs=1, warmup_epochs=0, finite_check_steps=4))
    with SyncCounter(search) as syncs:
        search.run(uneven_data(n_weights=32, n_arch=16))  # 8 steps, the epoch's metrics, the genotype
    # search.py: divergence checks after steps 4 and 8 and before the metrics, the metrics' and the
    # evaluation's one read each, alpha's entropy. genotype.py: one host copy of alpha for the epoch's
    # genotype, one for the returned one. So 8 reads in 8 steps, the epoch's end included.
    decoupled = syncs.where.pop("decoupled.py", 0)
    assert syncs.where == {"search.py": 6, "genotype.py": 2}, syncs.where
    # The back-tracker's read of its last step size, once per architecture step, is being removed by
    # its owner (dcpnas/decoupled.py): until then it is the one per-step sync left.
    assert decoupled in (0, 8)


def test_cycle_pairing_reads_every_weight_row_once_per_phase() -> None:
    data = uneven_data(n_weights=43, n_arch=16, batch=8, seed=3)  # 5 weight batches (3 rows left), 2 arch
    ids_w = data.w[0][:, 0, 0, 0]  # a unique value per row
    for phase in ("parent", "child"):
        pairs = list(data.batches(1, phase))
        read = torch.cat([wb[0][:, 0, 0, 0] for wb, _ in pairs])
        assert len(pairs) == 5 and len(set(read.tolist())) == 40 and set(read.tolist()) <= set(ids_w.tolist())
        arch = [set(ab[0][:, 0, 0, 0].tolist()) for _, ab in pairs]
        assert arch[0] | arch[1] == arch[2] | arch[3] and len(arch[0] | arch[1]) == 16  # whole arch passes
        resumed = list(data.batches(1, phase, start=3))  # resume mid-phase: the same remaining pairs
        assert all(torch.equal(a[0][0], b[0][0]) and torch.equal(a[1][0], b[1][0]) for a, b in zip(resumed, pairs[3:]))
    assert len(list(uneven_data(n_weights=43, n_arch=20, pairing="min").batches(0, "parent"))) == 2
    assert list(pair_indices(3, 2, "cycle")) == [(0, 0, 0), (1, 1, 0), (2, 0, 1)]
