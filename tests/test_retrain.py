"""Retraining: the step plan, model files, weight inheritance between stages, DeepSpeed ZeRO-1/2 against
plain DDP on two ranks, resume of an interrupted step, and the 1-bit network's accuracy on digits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dcpnas.binary import BinaryConv2d
from dcpnas.genotype import load_genotype
from dcpnas.network import create_network, inherit_weights, model_file
from pipeline.config import Config, load_config
from pipeline.errors import UserError
from pipeline.models import read_model
from pipeline.stages.retrain.plan import (
    check_resources,
    cosine_lr,
    deepspeed_config,
    param_groups,
    plan_steps,
    preflight,
    retrain_key,
    retrain_slots,
)


def retrain_config(out: Path, *sets: str) -> Config:
    return load_config(None, [f"output_dir={out}", f"tracking.uri=sqlite:///{out}/mlflow.db", *sets])


def tiny_net(stage: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_network("cifar", C=8, num_classes=10, layers=3, genotype="ddpnas_mcn_2", stage=stage)


def test_plan_is_teacher_then_the_two_published_steps(tmp_path) -> None:
    steps = plan_steps(retrain_config(tmp_path))
    assert [(s.name, s.stage, s.init_from, s.distill) for s in steps] == [
        ("teacher", "real", None, False),
        ("step1", "binary_act", None, True),
        ("step2", "binary_all", "step1", True),
    ]
    assert [s.weight_decay for s in steps[1:]] == [1e-5, 0.0]  # method §9.3: 1e-5 then 0
    plain = plan_steps(retrain_config(tmp_path, "retrain.teacher=none", "retrain.steps=[binary_all]"))
    assert [(s.name, s.distill) for s in plain] == [("step1", False)]


def test_cosine_schedule_runs_from_lr_to_min_lr() -> None:
    assert cosine_lr(1e-3, 1e-5, 0, 256) == pytest.approx(1e-3)
    assert cosine_lr(1e-3, 1e-5, 128, 256) == pytest.approx((1e-3 + 1e-5) / 2)
    assert cosine_lr(1e-3, 1e-5, 256, 256) == pytest.approx(1e-5)
    assert cosine_lr(1e-3, 1e-5, 64, 256) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi / 4)))


def test_weight_decay_skips_one_dimensional_tensors_only() -> None:
    model = tiny_net("binary_all")
    decay, rest = param_groups(model, 1e-5)
    assert decay["weight_decay"] == 1e-5 and rest["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in rest["params"])
    betas = {id(m.beta) for m in model.modules() if isinstance(m, BinaryConv2d) and m.beta is not None}
    assert betas <= {id(p) for p in decay["params"]}  # the 4-D scales decay, as timm does for the repo's M
    assert len(decay["params"]) + len(rest["params"]) == len(list(model.parameters()))


def test_step2_inherits_step1_weights_and_sets_scales_from_them() -> None:
    step1, step2 = tiny_net("binary_act"), tiny_net("binary_all")
    with torch.no_grad():
        for p in step1.parameters():
            p.add_(torch.randn_like(p))  # trained weights, far from step 2's random init
    initialised = inherit_weights(step2, step1.state_dict())
    convs = {n: m for n, m in step2.named_modules() if isinstance(m, BinaryConv2d) and m.binary_weights}
    assert sorted(initialised) == sorted(f"{n}.beta" for n in convs)
    for name, conv in convs.items():
        assert torch.equal(conv.weight, step1.get_submodule(name).weight)
        assert torch.allclose(conv.beta.flatten(), conv.weight.abs().mean(dim=(1, 2, 3)))
    for name, p in step1.state_dict().items():
        assert torch.equal(step2.state_dict()[name], p)
    with pytest.raises(ValueError, match="do not fit"):
        inherit_weights(
            tiny_net("binary_all"),
            create_network("cifar", C=4, num_classes=10, layers=3, genotype="ddpnas_mcn_2").state_dict(),
        )


def test_model_files_are_hash_checked_and_self_describing(tmp_path) -> None:
    path = tmp_path / "model.pt"
    torch.save(model_file(tiny_net("binary_act")), path)
    import hashlib

    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert read_model(str(path), sha)["spec"]["stage"] == "binary_act"
    with pytest.raises(UserError, match="does not hash"):
        read_model(str(path), "0" * 64)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(UserError, match="not a dcpnas model file"):
        read_model(str(tmp_path / "foreign.pt"))
    (tmp_path / "pickle.pt").write_bytes(b"\x80\x04not a checkpoint")
    with pytest.raises(UserError, match="cannot be read safely"):
        read_model(str(tmp_path / "pickle.pt"))


def test_bad_input_fails_before_training(tmp_path) -> None:
    cfg = retrain_config(tmp_path)
    wrong = json.loads(load_genotype("ddpnas_mcn_2").to_json())
    wrong["space"] = "dcpnas_conv"  # ops of another space
    from dcpnas.genotype import Genotype, GenotypeError

    with pytest.raises((UserError, GenotypeError), match="not in space 'dcpnas_conv'"):
        preflight(cfg, Genotype.from_dict(wrong), 10)
    teacher = tmp_path / "teacher.pt"
    torch.save(model_file(create_network("cifar", C=4, num_classes=7, layers=3, genotype="ddpnas_mcn_2")), teacher)
    with pytest.raises(UserError, match="predicts 7 classes, but the data has 10"):
        preflight(retrain_config(tmp_path, f"retrain.teacher={teacher}"), load_genotype("ddpnas_mcn_2"), 10)
    with pytest.raises(UserError, match=r"needs 2 GPU \(2 workers x 1\) but the cluster has 0"):
        check_resources(
            retrain_config(tmp_path, "retrain.workers=2", "retrain.gpus_per_worker=1", "retrain.batch_size=64"),
            {"CPU": 8},
        )
    with pytest.raises(UserError, match=r"retrain\.batch_size 63 must divide by retrain\.workers 2"):
        retrain_config(tmp_path, "retrain.workers=2", "retrain.batch_size=63")
    with pytest.raises(UserError, match=r"retrain\.zero_stage 3 is not supported: .* reconstruction loss"):
        retrain_config(tmp_path, "retrain.zero_stage=3")


def test_deepspeed_config_comes_from_the_retrain_section(tmp_path) -> None:
    cfg = retrain_config(tmp_path, "retrain.workers=2", "retrain.zero_stage=2", "retrain.batch_size=64")
    ds = deepspeed_config(cfg, 32, bf16=False, cuda=True)
    assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 32
    assert ds["zero_optimization"] == {"stage": 2} and ds["bf16"] == {"enabled": False}
    # CPU: no per-step contiguous gradient bucket (docs/benchmarks/retrain.md)
    assert deepspeed_config(cfg, 32, bf16=False, cuda=False)["zero_optimization"] == {
        "stage": 2,
        "contiguous_gradients": False,
    }
    assert "optimizer" not in ds  # ours: torch AdamW with timm's groups, no JIT-built DeepSpeed op


def test_retrains_side_by_side_fill_the_cluster_up_to_max_concurrent(tmp_path) -> None:
    half = retrain_config(tmp_path, "retrain.cpus_per_worker=0.5")
    assert retrain_slots(half, {"CPU": 2.0, "GPU": 0.0}) == 4
    assert retrain_slots(retrain_config(tmp_path, "retrain.cpus_per_worker=0.5", "retrain.max_concurrent=3"),
                         {"CPU": 2.0}) == 3  # fmt: skip
    gpus = retrain_config(tmp_path, "retrain.workers=2", "retrain.gpus_per_worker=1", "retrain.batch_size=64")
    assert retrain_slots(gpus, {"CPU": 64.0, "GPU": 5.0}) == 2  # two GPUs per retrain: the GPUs bound it
    assert retrain_slots(retrain_config(tmp_path), {"CPU": 0.5}) == 1  # never 0 (check_resources refuses)
    # how many run at once is scheduling, not recipe: a changed cap finds the same finished retrains
    assert retrain_key(half) == retrain_key(half.model_copy(update={"retrain": half.retrain.model_copy(
        update={"max_concurrent": 2})}))  # fmt: skip


# ---- real Ray Train + DeepSpeed -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def shards_config(tmp_path: Path, *sets: str) -> Config:
    from pipeline.data.search_data import ensure_shards

    cfg = retrain_config(tmp_path, "retrain.init_channels=8", "retrain.layers=3", *sets)
    return ensure_shards(cfg, log=lambda *_: None)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.distributed
def test_zero1_and_zero2_follow_the_ddp_loss_trajectory(tmp_path, ray_cluster) -> None:
    """Two CPU ranks, same data and seed: DeepSpeed ZeRO-1 and ZeRO-2 vs torch DDP, step by step."""
    from pipeline.models import num_classes
    from pipeline.stages.retrain.worker import fit_step

    trajectories = {}
    for engine, zero in (("ddp", 0), ("deepspeed", 1), ("deepspeed", 2)):
        cfg = shards_config(
            tmp_path,
            "retrain.workers=2",
            "retrain.cpus_per_worker=1",
            "retrain.batch_size=64",
            f"retrain.engine={engine}",
            f"retrain.zero_stage={zero}",
            "retrain.teacher=none",
            "retrain.steps=[binary_act]",
            "retrain.epochs=1",
            "retrain.lr=0.003",
        )
        step = plan_steps(cfg)[0]
        name = f"{engine}{zero}"
        result = fit_step(cfg, step, load_genotype("ddpnas_mcn_2"), num_classes(cfg), str(tmp_path / "ray"), name)
        trajectories[name] = result.metrics["step_losses"]
    ddp = torch.tensor(trajectories["ddp0"])
    assert len(ddp) == 1437 // 64 and ddp[-1] < ddp[0]  # digits train split: 1437 rows, global batch 64
    for name in ("deepspeed1", "deepspeed2"):
        # Same gradients (mean over ranks) and the same AdamW: only float summation order differs.
        assert torch.allclose(torch.tensor(trajectories[name]), ddp, rtol=1e-4, atol=1e-5), name


@pytest.mark.slow
@pytest.mark.ray
def test_interrupted_retrain_resumes_the_same_run_and_ends_where_an_uninterrupted_one_does(
    tmp_path, ray_cluster
) -> None:
    from pipeline import tracking
    from pipeline.stages.retrain.stage import run_retrain

    sets = ("retrain.teacher=none", "retrain.steps=[binary_all]", "retrain.epochs=2", "retrain.batch_size=128")
    cut = shards_config(tmp_path / "cut", *sets, "retrain.max_failures=0")
    [first] = run_retrain(cut, ["ddpnas_mcn_2"], stop_after=1, log=lambda *_: None)
    assert first["interrupted"] == "step1"
    [done] = run_retrain(cut, ["ddpnas_mcn_2"], log=lambda *_: None)
    assert done["run_id"] == first["run_id"]  # the same MLflow run continues
    ctx = tracking.prepare(cut.tracking.uri, cut.name)
    history = tracking.mlflow_client(ctx.uri).get_metric_history(done["run_id"], "step1/loss")
    assert sorted(m.step for m in history) == [0, 1]  # each epoch trained (and logged) once

    whole = shards_config(tmp_path / "whole", *sets)
    [ref] = run_retrain(whole, ["ddpnas_mcn_2"], log=lambda *_: None)
    models = []
    for c, out in ((cut, done), (whole, ref)):
        ctx = tracking.prepare(c.tracking.uri, c.name)
        local = tracking.download_artifact(ctx, out["run_id"], "step1/model.pt", tmp_path / out["run_id"])
        models.append(read_model(str(local))["state_dict"])
    assert models[0].keys() == models[1].keys()
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])  # bitwise: DeepSpeed state restored


@pytest.mark.slow
@pytest.mark.ray
def test_demo_retrain_reaches_90_percent_and_step2_starts_from_step1(tmp_path, ray_cluster) -> None:
    """The packaged demo recipe: real teacher, then binary activations, then 1-bit weights with KD."""
    from dcpnas.network import network_from_file
    from pipeline import tracking
    from pipeline.data.shards import open_dataset
    from pipeline.data.streams import device_batches, held_out_stream
    from pipeline.models import evaluate
    from pipeline.stages.retrain.stage import run_retrain

    cfg = retrain_config(tmp_path)
    [out] = run_retrain(cfg, ["ddpnas_mcn_2"], log=lambda *_: None)
    assert out["top1"] >= 0.90, out
    shards = shards_config(tmp_path)
    assert out["num_examples"] == open_dataset(shards.data.uri).split("test").num_rows  # every held-out image once
    assert out["binary_params"] > 0.8 * out["params"]  # the cells are 1-bit

    # Step 2 began with exactly step 1's final weights: its logged accuracy before any update equals step 1's
    # model with binarised weights (scales from the inherited weights), recomputed here from the step-1 artifact.
    ctx = tracking.prepare(cfg.tracking.uri, cfg.name)
    logged = tracking.mlflow_client(ctx.uri).get_metric_history(out["run_id"], "step2/init_top1")[0].value
    step1 = read_model(str(tracking.download_artifact(ctx, out["run_id"], "step1/model.pt", tmp_path / "a")))
    inherited = network_from_file(step1, stage="binary_all")
    device = torch.device("cpu")
    batches = device_batches(shards, held_out_stream(shards, 64), device)
    assert evaluate(inherited, batches, device)["top1"] == pytest.approx(logged, abs=1e-12)


@pytest.mark.slow
@pytest.mark.ray
def test_two_genotypes_in_one_command_retrain_side_by_side_each_in_its_own_run(tmp_path, ray_cluster) -> None:
    """``dcpnas retrain --genotype A --genotype B`` on a cluster that holds both: two runs under the config's
    retrain run, overlapping in time, each holding its own genotype (a third ref to A's genotype adds
    nothing); a re-run finds both finished."""
    from mlflow.tracking import MlflowClient

    from pipeline.stages.retrain.stage import run_retrain

    sets = ("retrain.teacher=none", "retrain.steps=[binary_all]", "retrain.epochs=1", "retrain.cpus_per_worker=0.5")
    cfg = shards_config(tmp_path, *sets, "retrain.batch_size=128")
    lines: list[str] = []
    refs = ["ddpnas_mcn_2", "tangent_1"]
    same = str(Path(__file__).resolve().parents[1] / "dcpnas" / "genotypes" / "ddpnas_mcn_2.json")
    out = run_retrain(cfg, [*refs, same], log=lines.append)  # a file of the first genotype: one retrain, not two
    assert "retrain: 2 genotypes, 2 at a time" in lines
    assert [r["genotype_hash"] for r in out] == [load_genotype(g).hash for g in refs]  # in the order asked
    client = MlflowClient(cfg.tracking.uri)
    runs = [client.get_run(r["run_id"]) for r in out]
    assert len({r.info.run_id for r in runs}) == 2 and len({r.data.tags["mlflow.parentRunId"] for r in runs}) == 1
    for run, ref in zip(runs, refs):  # each run holds the genotype it trained, not the other's
        assert (run.data.tags["genotype_ref"], run.data.params["genotype.hash"]) == (ref, load_genotype(ref).hash)
    a, b = (r.info for r in runs)
    assert a.start_time < b.end_time and b.start_time < a.end_time  # side by side
    again = run_retrain(cfg, refs, log=lambda *_: None)
    assert [r["run_id"] for r in again] == [r["run_id"] for r in out] and all(r["skipped"] for r in again)
