"""Data-parallel search: DDP ranks agree on every architecture step; the Ray Train stage runs and resumes."""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.config import Config

pytestmark = pytest.mark.distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, cfg_dict: dict, split_uri: str, out: str) -> None:
    from dcpnas.search import DCPNASSearch
    from pipeline.data.search_data import StreamSearchData
    from pipeline.data.splits import SearchSplit
    from pipeline.runtime.collectives import all_reduce_mean
    from pipeline.stages.search.worker import ddp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = Config.model_validate(cfg_dict)
    data = StreamSearchData.open(cfg, SearchSplit.load(split_uri), rank, world)
    kw = {"wrap": ddp, "reduce_mean": all_reduce_mean} if world > 1 else {}
    search = DCPNASSearch(cfg.search_config(), **kw)
    trace: list[str] = []
    step = search._arch_step

    def traced(name, alpha, grad, norms) -> None:  # record alpha after every architecture step
        step(name, alpha, grad, norms)
        trace.append(f"{name}:{hashlib.sha256(alpha.detach().numpy().tobytes()).hexdigest()}")

    search._arch_step = traced
    genotype = search.run(data)
    torch.save({"trace": trace, "hash": genotype.hash, "alpha": search.child.alpha.detach()}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def run_ranks(cfg: Config, split_uri: str, world: int, out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(_rank_main, args=(world, free_port(), cfg.resolved(), split_uri, str(out)), nprocs=world)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.mark.slow
def test_two_ranks_agree_after_every_arch_step_and_follow_one_rank(
    digits_shards: str, stage_config: Callable[..., Config], tmp_path: Path
) -> None:
    from pipeline.data.search_data import make_split

    cfg = stage_config(digits_shards, tmp_path)
    split_uri = str(tmp_path / "split.json")
    make_split(cfg).save(split_uri)
    two = run_ranks(cfg, split_uri, 2, tmp_path / "two")
    assert len(two[0]["trace"]) > 0
    assert two[0]["trace"] == two[1]["trace"]  # bitwise-identical alphas after each architecture step
    assert two[0]["hash"] == two[1]["hash"]
    one = run_ranks(cfg, split_uri, 1, tmp_path / "one")[0]
    # Same global batch (32 = 2 x 16), same initialisation and data order. Ranks read contiguous slices,
    # so a global batch holds other rows than the single-rank batch of the same step, and BN statistics
    # come from 16 rows, not 32: the trajectories agree in direction, not bitwise. Tolerance: cosine of
    # the alpha displacements > 0.25 (measured 0.56 before the scaled back-tracking, 0.35 with it: the shift
    # along alpha^t amplifies early differences; unrelated trajectories give ~0).
    start = torch.zeros_like(one["alpha"])
    cos = torch.nn.functional.cosine_similarity(
        (one["alpha"] - start).flatten(), (two[0]["alpha"] - start).flatten(), 0
    )
    assert cos > 0.25, cos


@pytest.mark.ray
@pytest.mark.slow
def test_ray_train_search_reports_checkpoints_and_resumes(
    digits_shards: str, stage_config: Callable[..., Config], tmp_path: Path
) -> None:
    import ray

    from pipeline.data.search_data import make_split
    from pipeline.runtime.trainer import Workers
    from pipeline.stages.search.worker import fit_search

    cfg = stage_config(digits_shards, tmp_path)
    split_uri = str(tmp_path / "split.json")
    make_split(cfg).save(split_uri)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = fit_search(cfg, split_uri, str(tmp_path / "ray"), "t", Workers(2, 0.5))
        assert result.error is None
        assert result.metrics["ranks_agree"] is True and result.metrics["epoch"] == 1
        with result.checkpoint.as_directory() as d:
            files = sorted(p.name for p in Path(d).iterdir())
        assert files == ["genotype.json", "search.pt"]
        # the same name and storage resume the finished run instead of starting over
        again = fit_search(cfg, split_uri, str(tmp_path / "ray"), "t", Workers(2, 0.5))
        assert again.metrics["genotype_hash"] == result.metrics["genotype_hash"]
    finally:
        ray.shutdown()
