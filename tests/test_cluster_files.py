"""Deployment files: everything under cluster/ and configs/ parses, agrees with ray_job.yaml, validates against Ray's
and DeepSpeed's own schemas offline, keeps token auth on, commits no secrets, and the job upload stays small."""

from __future__ import annotations

import copy
import json
import re
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
YAML_FILES = sorted([*CLUSTER.rglob("*.yaml"), *CONFIGS, ROOT / "ray_job.yaml"])
JSON_FILES = sorted(CLUSTER.rglob("*.json"))
LAUNCHERS = [CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml"]
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)
URI_WITH_PASSWORD = re.compile(r"://[^/\s:@]+:([^@\s]+)@")
VARIABLE = re.compile(r"^(\$\([A-Z_][A-Z0-9_]*\)|\$\{[A-Z_][A-Z0-9_]*(:?[-?][^}]*)?\})$")


def docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def job() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "ray_job.yaml").read_text())


def by_kind(path: Path, kind: str) -> dict[str, Any]:
    return next(d for d in docs(path) if d.get("kind") == kind)


def walk(node: Any) -> Any:
    """Every mapping in a parsed YAML tree."""
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


# -- parsing -----------------------------------------------------------------------------------------------------------
def test_every_yaml_and_json_file_parses() -> None:
    assert len(YAML_FILES) >= 12 and len(JSON_FILES) == 2
    for path in YAML_FILES:
        assert docs(path), f"{path} is empty"
    for path in JSON_FILES:
        assert isinstance(json.loads(path.read_text()), dict), path


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_strictly(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.name == path.stem


def test_imagenet_search_config_carries_the_spec_hyperparameters() -> None:
    cfg = load_config(ROOT / "configs" / "imagenet-search.yaml")
    s, d, w = cfg.search_config(), cfg.data, cfg.sweep
    assert (s.lam, s.mu, s.discrepancy, s.hessian, s.decoupled, s.tau) == (5e-3, 0.2, "fro", "ggn", True, 0.5)
    assert (s.epochs, s.warmup_epochs, s.init_channels, s.layers, s.stem, s.partial_channels) == (
        50, 35, 16, 8, "imagenet", 2,
    )  # fmt: skip
    assert (s.num_classes, s.arch_lr, s.arch_betas, s.parent_weight_decay) == (1000, 6e-3, (0.5, 0.999), 3e-5)
    assert (d.source, d.weight_fraction, d.arch_fraction, d.image_size) == ("shards", 0.1, 0.025, 224)
    assert d.uri is not None and d.uri.startswith("s3://")
    assert w.gpus_per_worker == 1 and d.batch_size % w.workers == 0
    assert str(w.storage_path).startswith("s3://")  # multi-node: shared storage for checkpoints
    assert cfg.retrain.network == "imagenet" and cfg.retrain.layers == 10


@pytest.mark.parametrize(("size", "channels"), [("s", 48), ("m", 72), ("l", 108)])
def test_retrain_configs_follow_the_two_step_recipe(size: str, channels: int) -> None:
    from dcpnas.genotype import load_genotype

    r = load_config(ROOT / "configs" / f"imagenet-retrain-{size}.yaml").retrain
    assert load_genotype(str(r.genotype)).normal  # the built-in genotype resolves
    assert (r.genotype, r.network, r.init_channels, r.layers) == ("ddpnas_mcn_2", "imagenet", channels, 10)
    assert r.steps == ["binary_act", "binary_all"] and r.epochs == 256
    assert (r.lr, r.min_lr, r.weight_decay, r.batch_size, r.workers) == (1e-3, 1e-5, [1e-5, 0.0], 512, 8)
    assert (r.engine, r.bf16, r.gpus_per_worker) == ("deepspeed", "auto", 1)


# -- one entrypoint everywhere -----------------------------------------------------------------------------------------
def test_rayjob_runs_exactly_what_ray_job_yaml_runs() -> None:
    j, rayjob = job(), by_kind(CLUSTER / "kuberay" / "rayjob.yaml", "RayJob")
    spec = rayjob["spec"]
    assert spec["entrypoint"] == j["entrypoint"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"] == j["runtime_env"]["env_vars"]
    assert runtime_env["excludes"] == j["runtime_env"]["excludes"]
    assert (spec["entrypointNumCpus"], spec["entrypointNumGpus"]) == (
        j["entrypoint_num_cpus"],
        j["entrypoint_num_gpus"],
    )
    # the RayJob uploads the checkout baked into the image
    assert f"WORKDIR {runtime_env['working_dir']}" in (CLUSTER / "Dockerfile").read_text()
    assert (
        spec["clusterSelector"]["ray.io/cluster"]
        == by_kind(CLUSTER / "kuberay" / "raycluster.yaml", "RayCluster")["metadata"]["name"]
    )


@pytest.mark.parametrize("path", [*LAUNCHERS, CLUSTER / "kuberay" / "raycluster.yaml"], ids=lambda p: p.name)
def test_documented_job_entrypoint_matches_ray_job_yaml(path: Path) -> None:
    documented = re.findall(r"^# job entrypoint: (.+)$", path.read_text(), re.MULTILINE)
    assert documented == [job()["entrypoint"]]


def test_the_entrypoint_config_exists_and_loads() -> None:
    tokens = job()["entrypoint"].split()
    assert tokens[:2] == ["dcpnas", "run"]
    load_config(ROOT / tokens[2])


def test_one_image_everywhere() -> None:
    images = {yaml.safe_load(p.read_text())["docker"]["image"] for p in LAUNCHERS}
    for path in [CLUSTER / "kuberay" / "raycluster.yaml", CLUSTER / "mlflow" / "k8s.yaml"]:
        images |= {c["image"] for d in docs(path) for m in walk(d) for c in m.get("containers", [])}
    images.discard("postgres:16")
    compose = yaml.safe_load((CLUSTER / "mlflow" / "docker-compose.yaml").read_text())
    images.add(compose["services"]["mlflow"]["image"])
    assert images == {"REGISTRY/dcpnas:0.1.0"}


# -- Ray cluster launcher: Ray's own schema, token auth, private dashboard, GPU workers -------------------------------
@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_config_validates_against_rays_schema(path: Path) -> None:
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(path.read_text())
    validate_config(prepare_config(copy.deepcopy(config)))  # defaults merged offline: no cloud credentials needed
    broken = copy.deepcopy(config)
    broken["available_node_types"]["head"]["bogus_key"] = 1
    with pytest.raises(jsonschema.ValidationError, match="bogus_key"):
        validate_config(prepare_config(broken))


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_keeps_token_auth_and_a_local_only_dashboard(path: Path) -> None:
    c = yaml.safe_load(path.read_text())
    starts = [cmd for cmd in c["head_start_ray_commands"] + c["worker_start_ray_commands"] if "ray start" in cmd]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token ray start" in cmd for cmd in starts)
    assert "--env RAY_AUTH_MODE=token" in c["docker"]["run_options"]
    head_start = next(cmd for cmd in c["head_start_ray_commands"] if "ray start" in cmd)
    assert "--dashboard-host=127.0.0.1" in head_start
    assert c["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}  # the token is shipped, never written
    types = c["available_node_types"]
    assert types[c["head_node_type"]]["resources"]["GPU"] == 0
    gpu_types = [t for name, t in types.items() if name != c["head_node_type"]]
    assert gpu_types and all(t["resources"]["GPU"] == 8 for t in gpu_types)
    assert c["docker"]["worker_run_options"] == ["--gpus all"]


def test_no_file_turns_token_auth_off() -> None:
    for path in [*YAML_FILES, CLUSTER / "Dockerfile"]:
        text = path.read_text()
        assert not re.search(r"RAY_AUTH_MODE[=:]\s*\"?disabled", text), path
    cluster = by_kind(CLUSTER / "kuberay" / "raycluster.yaml", "RayCluster")
    assert cluster["spec"]["authOptions"] == {"mode": "token"}
    assert cluster["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"


# -- secrets -----------------------------------------------------------------------------------------------------------
def literal_secrets_k8s(path: Path) -> list[str]:
    found = []
    for d in docs(path):
        if d.get("kind") == "Secret":
            found.append(f"{path.name}: a Secret manifest with values")
        for m in walk(d):
            if "name" in m and "value" in m and isinstance(m["name"], str) and SECRET_NAME.search(m["name"]):
                found.append(f"{path.name}: env {m['name']} has a literal value")
            for v in m.values():
                if isinstance(v, str) and (pw := URI_WITH_PASSWORD.search(v)) and not VARIABLE.match(pw.group(1)):
                    found.append(f"{path.name}: password in URI {v}")
    return found


def literal_secrets_compose(path: Path) -> list[str]:
    found = []
    for name, service in yaml.safe_load(path.read_text())["services"].items():
        env = service.get("environment", {})
        pairs = (
            [tuple(e.split("=", 1)) if "=" in e else (e, None) for e in env] if isinstance(env, list) else env.items()
        )
        for key, value in pairs:
            if value is None:
                continue  # passed through from the shell
            if SECRET_NAME.search(key) and not VARIABLE.match(str(value)):
                found.append(f"{name}: {key} is a literal")
            if (pw := URI_WITH_PASSWORD.search(str(value))) and not VARIABLE.match(pw.group(1)):
                found.append(f"{name}: {key} has a password in its URI")
    return found


def test_manifests_reference_secrets_and_hold_no_values() -> None:
    k8s = [p for p in [*CLUSTER.rglob("*.yaml")] if p.name != "docker-compose.yaml" and "apiVersion" in p.read_text()]
    assert len(k8s) == 3
    assert [s for p in k8s for s in literal_secrets_k8s(p)] == []
    assert literal_secrets_compose(CLUSTER / "mlflow" / "docker-compose.yaml") == []
    refs = [m["secretKeyRef"]["name"] for m in walk(docs(CLUSTER / "mlflow" / "k8s.yaml")) if "secretKeyRef" in m]
    assert set(refs) == {"mlflow-db", "mlflow-s3", "mlflow-auth"}
    for path in [*YAML_FILES, *JSON_FILES, CLUSTER / "Dockerfile"]:
        assert not re.search(r"AKIA[0-9A-Z]{16}|BEGIN [A-Z ]*PRIVATE KEY", path.read_text()), path


def test_the_secret_checks_catch_literals(tmp_path: Path) -> None:
    bad_k8s = tmp_path / "k.yaml"
    bad_k8s.write_text(
        "apiVersion: v1\nkind: Pod\nspec:\n  containers:\n  - env:\n    - {name: DB_PASSWORD, value: hunter2}\n"
        "    - {name: URI, value: 'postgresql://u:hunter2@db/x'}\n"
    )
    assert len(literal_secrets_k8s(bad_k8s)) == 2
    bad_compose = tmp_path / "c.yaml"
    bad_compose.write_text(
        "services:\n  a:\n    environment:\n      - POSTGRES_PASSWORD=hunter2\n      - AWS_SECRET_ACCESS_KEY\n"
    )
    assert literal_secrets_compose(bad_compose) == ["a: POSTGRES_PASSWORD is a literal"]


def test_mlflow_server_uses_postgres_and_an_object_store() -> None:
    containers = [c for d in docs(CLUSTER / "mlflow" / "k8s.yaml") for m in walk(d) for c in m.get("containers", [])]
    mlflow = next(c for c in containers if c["name"] == "mlflow")
    assert mlflow["command"][:2] == ["mlflow", "server"]
    assert any(a.startswith("--artifacts-destination=s3://") for a in mlflow["command"])
    env = {e["name"]: e for e in mlflow["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith("postgresql://$(DB_USER):$(DB_PASSWORD)@")
    assert "--app-name=basic-auth" in mlflow["command"] and env["MLFLOW_DISABLE_TELEMETRY"]["value"] == "true"
    workers = int(next(a for a in mlflow["command"] if a.startswith("--workers=")).split("=")[1])
    per_worker = int(env["MLFLOW_SQLALCHEMYSTORE_POOL_SIZE"]["value"]) + int(
        env["MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW"]["value"]
    )
    postgres = next(c for c in containers if c["name"] == "postgres")
    assert workers * per_worker < int(postgres["args"][1].removeprefix("max_connections="))  # pools fit Postgres
    ray_pods = [c for m in walk(docs(CLUSTER / "kuberay" / "raycluster.yaml")) for c in m.get("containers", [])]
    for c in ray_pods:  # the pipeline reads MLflow's own variables, from the server's Secret
        creds = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e}
        assert creds == {
            "MLFLOW_TRACKING_USERNAME": {"name": "mlflow-auth", "key": "username"},
            "MLFLOW_TRACKING_PASSWORD": {"name": "mlflow-auth", "key": "password"},
        }
    compose = yaml.safe_load((CLUSTER / "mlflow" / "docker-compose.yaml").read_text())["services"]
    assert compose["mlflow"]["ports"] == ["${MLFLOW_BIND:-127.0.0.1}:5000:5000"]  # loopback unless configured
    assert "ports" not in compose["postgres"]
    assert job()["runtime_env"]["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"  # the Service above


# -- DeepSpeed references --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_references_validate_and_match_the_retrain_l_config(stage: int) -> None:
    from deepspeed.runtime.config import DeepSpeedConfig

    ds = json.loads((CLUSTER / "deepspeed" / f"zero{stage}.json").read_text())
    r = load_config(ROOT / "configs" / "imagenet-retrain-l.yaml").retrain
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["train_batch_size"] == r.batch_size
    assert ds["train_micro_batch_size_per_gpu"] * r.workers * ds["gradient_accumulation_steps"] == r.batch_size
    assert ds["bf16"] == {"enabled": True}  # retrain.bf16: auto -> on with CUDA
    # DeepSpeed's own parser (strict on zero_optimization); one process here, so the batch is checked for world size 1
    parsed = DeepSpeedConfig({**ds, "train_batch_size": ds["train_micro_batch_size_per_gpu"]})
    assert parsed.zero_optimization_stage == stage and parsed.bfloat16_config.enabled


# -- the job upload --------------------------------------------------------------------------------------------------
def test_job_upload_excludes_the_venv_and_run_outputs_and_stays_small(tmp_path: Path) -> None:
    from ray._private.runtime_env.packaging import create_package

    excludes = job()["runtime_env"]["excludes"]
    for pattern in [".venv", "runs/", "mlruns/", "ray_results", ".cache", "*.db", "report/", ".git"]:
        assert pattern in excludes
    # Ray's own packager with our excludes alone (not .gitignore), on this checkout with its venv and runs
    target = tmp_path / "pkg.zip"
    create_package(str(ROOT), target, include_gitignore=False, excludes=excludes)
    names = zipfile.ZipFile(target).namelist()
    top = {n.split("/", 1)[0] for n in names}
    assert not top & {".venv", "runs", "mlruns", "ray_results", ".cache", "report", ".git"}
    assert not [n for n in names if n.endswith((".db", ".pt"))]
    assert {"pipeline", "dcpnas", "pyproject.toml"} <= top
    assert "pipeline/configs/imagenet-search.yaml" in names
    assert target.stat().st_size < 20 * 2**20, f"upload is {target.stat().st_size / 2**20:.1f} MB"
