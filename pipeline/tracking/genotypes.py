"""Genotypes in MLflow: logged with their hash, registered under an alias, found again by any reference
(run id, ``parent:<run id>``, ``models:/name@alias``, a file, a built-in name) and checked against the hash."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mlflow.entities import Param, RunTag
from mlflow.exceptions import MlflowException

from pipeline.errors import UserError
from pipeline.tracking.retry import display_uri
from pipeline.tracking.runs import get_run, is_run_id, log_batch
from pipeline.tracking.store import TrackingContext, mlflow_client, retried

if TYPE_CHECKING:  # dcpnas (torch) is imported where needed: processes that only log start in a second
    from torch import Tensor

    from dcpnas.genotype import Genotype
    from dcpnas.spaces import SearchSpace

GENOTYPE_DIR = "genotype"
GENOTYPE_PARAM_PREFIX = "genotype."
PARENT_REF = "parent:"  # find_genotype("parent:<run id>"): the Parent genotype of a search run
PARENT_GENOTYPE_FILE = "genotype_parent.json"
PARENT_GENOTYPE_HASH_PARAM = "parent_genotype_hash"
GENOTYPE_HASH_PARAM = "genotype.hash"  # a param, so immutable: find_genotype checks the artifact against it


def log_genotype(
    ctx: TrackingContext,
    run_id: str,
    genotype: Genotype,
    alpha: Tensor | None = None,
    alpha_history: Sequence[Tensor] | None = None,
    space: SearchSpace | None = None,
) -> str:
    """Log the run's genotype (JSON, flat params, hash tag, cell diagrams, alpha plots); return its hash.

    A run holds one genotype: logging a different one raises before anything is overwritten.
    """
    from dcpnas.visualize import save_genotype_artifacts

    genotype.validate()
    client = mlflow_client(ctx.uri)
    h = genotype.hash
    logged = get_run(ctx, run_id)["params"].get(GENOTYPE_HASH_PARAM)
    if logged not in (None, h):
        raise ValueError(f"run {run_id} already holds genotype {logged[:12]}; log genotype {h[:12]} in a new run")
    params = {f"{GENOTYPE_PARAM_PREFIX}{k}": v for k, v in genotype.flat().items()} | {GENOTYPE_HASH_PARAM: h}
    with tempfile.TemporaryDirectory() as tmp:
        save_genotype_artifacts(genotype, tmp, alpha, alpha_history, space)

        def log() -> None:
            client.log_artifacts(run_id, tmp, GENOTYPE_DIR)
            batch = [Param(k, v) for k, v in params.items()]
            log_batch(client, run_id, params=batch, tags=[RunTag("genotype_hash", h)])

        retried(ctx, f"genotype of run {run_id}", log)
    return h


def log_parent_genotype(ctx: TrackingContext, run_id: str, genotype: Genotype) -> str:
    """Log the search's Parent genotype beside the Child's (``genotype/genotype_parent.json``, param
    ``parent_genotype_hash``); ``find_genotype("parent:<run id>")`` returns it."""
    genotype.validate()
    client = mlflow_client(ctx.uri)
    with tempfile.TemporaryDirectory() as tmp:
        genotype.save(Path(tmp) / PARENT_GENOTYPE_FILE)
        client.log_artifact(run_id, str(Path(tmp) / PARENT_GENOTYPE_FILE), GENOTYPE_DIR)
    log_batch(client, run_id, params=[Param(PARENT_GENOTYPE_HASH_PARAM, genotype.hash)])
    return genotype.hash


def register_genotype(ctx: TrackingContext, run_id: str, name: str, alias: str) -> str:
    """Register the run's genotype as a model version (reused if this run already has one) and point
    ``alias`` at it; returns the version. Uses ``create_model_version``: in MLflow 3
    ``register_model("runs:/...")`` fails without a LoggedModel (docs/stack.md §4.1)."""
    client = mlflow_client(ctx.uri)
    run = client.get_run(run_id)
    h = run.data.params.get(GENOTYPE_HASH_PARAM)
    if h is None:
        raise UserError(f"run {run_id} has no logged genotype to register")
    try:
        client.create_registered_model(name, description="DCP-NAS genotypes (genotype/genotype.json)")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    version = (
        existing[0]
        if existing
        else client.create_model_version(
            name,
            source=f"{run.info.artifact_uri}/{GENOTYPE_DIR}",
            run_id=run_id,
            tags={"genotype_hash": h, "space": run.data.params.get(f"{GENOTYPE_PARAM_PREFIX}space", "")},
        )
    )
    client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def find_genotype(ctx: TrackingContext, ref: str) -> tuple[Genotype, str | None]:
    """The genotype behind ``ref`` and the run that logged it (None for files).

    ``ref``: a run id, ``parent:<run id>`` (that search's Parent genotype), ``models:/name@alias``,
    ``models:/name/version``, a JSON path or a built-in name. The artifact's hash must match the hash
    recorded when it was logged (and registered).
    """
    from dcpnas.genotype import Genotype, GenotypeError, load_genotype

    client = mlflow_client(ctx.uri)
    expected: dict[str, str | None] = {}
    artifact, hash_param = "genotype.json", GENOTYPE_HASH_PARAM
    try:
        if ref.startswith(PARENT_REF) and is_run_id(ref.removeprefix(PARENT_REF)):
            run_id = ref.removeprefix(PARENT_REF)
            artifact, hash_param = PARENT_GENOTYPE_FILE, PARENT_GENOTYPE_HASH_PARAM
        elif ref.startswith("models:/"):
            name, at, alias = ref.removeprefix("models:/").partition("@")
            if at:
                mv = client.get_model_version_by_alias(name, alias)
            else:
                name, _, number = name.rpartition("/")
                mv = client.get_model_version(name, number)
            run_id = mv.run_id
            expected["registered"] = mv.tags.get("genotype_hash")
        elif is_run_id(ref) and not Path(ref).exists():
            run_id = ref
        else:
            return load_genotype(ref), None
        expected["logged"] = client.get_run(run_id).data.params.get(hash_param)
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(run_id, f"{GENOTYPE_DIR}/{artifact}", tmp)
            genotype = Genotype.load(path).validate()
    except MlflowException as e:
        raise UserError(f"genotype {ref} at {display_uri(ctx.uri)}: {e.message}") from None
    except (GenotypeError, OSError) as e:
        raise UserError(f"genotype {ref}: {e}") from None
    for what, h in expected.items():
        if h is not None and h != genotype.hash:
            raise UserError(
                f"genotype {ref}: artifact of run {run_id} hashes to {genotype.hash[:12]}, "
                f"but {h[:12]} was {what}; the artifact was changed after logging"
            )
    return genotype, run_id
