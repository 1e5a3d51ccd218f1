"""Suite-wide settings, and the fixtures several test modules share (a test module never imports another).

``make test`` runs the suite on 2 pytest-xdist workers (``--dist loadgroup``). Tests spread freely over both,
Ray tests included: two local Ray instances side by side work (each ``ray.init`` starts its own, and a
``ray start`` cluster records its address in its own temp dir, so no plain ``ray.init`` joins it). The tests
that start 2-node loopback clusters with ``ray start`` share the ``loopback-cluster`` group and run one after
another on one worker.

Each xdist worker runs torch on one intra-op thread: two workers with a thread per core each oversubscribe the
cores, and OpenMP's spinning threads then made the fast tests 4x slower (10:52 instead of 2:54 on 2 cores).

The fixtures import the project inside their bodies: this file is imported by every pytest run, and a run of one
small test module should not pay for the search or the data pipeline.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from local_cluster import LocalCluster  # cluster/local_cluster.py, loaded from its file by the `lc` fixture

    from dcpnas.search import SearchConfig
    from pipeline.config import Config

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported: also for the tests' subprocesses
    import torch

    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]


# ---- the 2-node loopback Ray cluster (cluster/local_cluster.py) ---------------------------------------------------


@pytest.fixture(scope="session")
def lc() -> ModuleType:
    """cluster/local_cluster.py: cluster/ is a script directory, not a package, so the module is loaded from its
    file (any pytest invocation works) and registered as ``local_cluster``, as an import would."""
    spec = importlib.util.spec_from_file_location("local_cluster", ROOT / "cluster" / "local_cluster.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["local_cluster"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A fresh directory right under /tmp: Ray's unix socket paths below it must fit in 107 bytes, and pytest's
    tmp_path is too deep."""
    d = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def loopback_cluster(lc: ModuleType, short_tmp: Path) -> Iterator[LocalCluster]:
    """A started 2-node loopback cluster (1 CPU each) in ``short_tmp/c``; stopped after the test, killing exactly
    its own processes."""
    with lc.LocalCluster(short_tmp / "c", grace_s=2.0) as c:
        yield c


# ---- tiny searches -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_config() -> Callable[..., SearchConfig]:
    """``tiny_config(**overrides)``: a search of 3 classes, 4 channels and 3 cells, 2 epochs (1 warm-up), that runs
    in seconds on CPU; keywords override any SearchConfig field."""
    from dcpnas.search import SearchConfig

    def make(**overrides: Any) -> SearchConfig:
        base: dict[str, Any] = dict(
            space="dcpnas_3x3",
            num_classes=3,
            init_channels=4,
            layers=3,
            epochs=2,
            warmup_epochs=1,
            arch_lr=0.05,
            psi_lr=5.0,
            seed=7,
        )
        return SearchConfig(**{**base, **overrides})

    return make


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The digits dataset converted to shards once per module; returns their URI."""
    from pipeline.data.convert import Options, convert
    from pipeline.data.sources import digits

    uri = str(tmp_path_factory.mktemp("digits") / "shards")
    convert(digits(), uri, Options(workers=1, progress=False))
    return uri


@pytest.fixture(scope="session")
def stage_config() -> Callable[..., Config]:
    """``stage_config(shards_uri, output_dir, **search)``: the pipeline config of a tiny search stage (2 epochs,
    1 warm-up, a tenth of the data per phase) on the given shards; keywords set ``search.<key>``."""
    from pipeline.config import load_config

    def make(uri: str, out: Path, **search: Any) -> Config:
        sets = [
            "data.source=shards",
            f"data.uri={uri}",
            "data.batch_size=32",
            "data.weight_fraction=0.1",
            "data.arch_fraction=0.1",
            "search.init_channels=4",
            "search.layers=3",
            "search.epochs=2",
            "search.warmup_epochs=1",
            "search.arch_lr=0.01",
            f"output_dir={out}",
            *(f"search.{k}={v}" for k, v in search.items()),
        ]
        return load_config(None, sets)

    return make
