"""``dcpnas submit``: send ``ray_job.yaml`` to a Ray cluster through the Jobs API and follow it to the end.

The job file holds ``submit_job``'s keyword arguments (see the comments in ``ray_job.yaml``). The address
is the cluster's dashboard URL: ``--address``, else ``RAY_API_SERVER_ADDRESS``, else ``RAY_ADDRESS``, else
``http://127.0.0.1:8265`` (what ``ray dashboard cluster/aws.yaml`` forwards to). Token auth needs nothing
here: Ray's client adds the bearer token when ``RAY_AUTH_MODE=token`` and the token is in
``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH`` / ``~/.ray/auth_token`` (docs/stack.md §3).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.config import parse_override
from pipeline.errors import UserError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
DEFAULT_JOB = "ray_job.yaml"
CONNECT_TIMEOUT_S = 10.0
SHELL_OPERATORS = {"&&", "||", ";", "|", "&", ">", ">>", "<"}


class JobSpec(BaseModel):
    """The job file, strictly: a misspelt key would otherwise be dropped silently and the job run without it."""

    model_config = ConfigDict(extra="forbid")
    entrypoint: str = Field(min_length=1)
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    entrypoint_num_cpus: float | None = Field(None, ge=0)
    entrypoint_num_gpus: float | None = Field(None, ge=0)
    entrypoint_memory: int | None = Field(None, ge=0)
    entrypoint_resources: dict[str, float] | None = None
    metadata: dict[str, str] | None = None


def load_job(path: str | Path) -> JobSpec:
    """Read and check a job file; the error names the offending field."""
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text())
    except OSError as e:
        raise UserError(f"job file {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise UserError(f"job file {path} is not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise UserError(f"job file {path} must be a mapping with at least 'entrypoint'")
    try:
        return JobSpec.model_validate(tree)
    except ValidationError as e:
        fields = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise UserError(f"job file {path}: {fields}") from None


def build_entrypoint(entrypoint: str, config: str | None, overrides: list[str]) -> str:
    """The job's command with its config replaced (``--config X`` option or first positional) and overrides appended.

    Overrides are checked here (``key=value``, value as YAML) so a typo fails before anything is uploaded,
    and shell-quoted so values with spaces or brackets reach the driver intact.
    """
    for item in overrides:
        parse_override(item)
    if config is not None:
        tokens = shlex.split(entrypoint)
        if SHELL_OPERATORS & set(tokens) or len(tokens) < 2:
            raise UserError(
                f"--config needs a plain 'PROGRAM SUBCOMMAND CONFIG ...' entrypoint, got {entrypoint!r}; "
                "edit the job file instead"
            )
        tokens = _replace_config(tokens, config)
        entrypoint = shlex.join(tokens)
    return " ".join([entrypoint, *(f"--set {shlex.quote(item)}" for item in overrides)])


def _replace_config(tokens: list[str], config: str) -> list[str]:
    for i, tok in enumerate(tokens):
        if tok == "--config" and i + 1 < len(tokens):
            return [*tokens[: i + 1], config, *tokens[i + 2 :]]
        if tok.startswith("--config="):
            return [*tokens[:i], f"--config={config}", *tokens[i + 1 :]]
    if len(tokens) > 2 and not tokens[2].startswith("-"):
        return [*tokens[:2], config, *tokens[3:]]
    return [*tokens[:2], config, *tokens[2:]]


def resolve_address(address: str | None) -> str:
    """The dashboard URL to use; explicit beats RAY_API_SERVER_ADDRESS beats RAY_ADDRESS beats the default."""
    url = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    if "://" not in url:
        url = f"http://{url}"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"the Ray dashboard address must be http(s)://HOST:PORT, got '{url}'")
    return url.rstrip("/")


def check_reachable(url: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Fail in seconds on a dead address: Ray's client would retry or hang on a silently dropped connection."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout_s).close()
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise UserError(
            f"cannot reach the Ray dashboard at {url} ({reason}). Is the cluster up? For `ray up` clusters run "
            "`ray dashboard cluster/aws.yaml` (or gcp.yaml) in another terminal; for KubeRay "
            "`kubectl port-forward svc/dcpnas-head-svc 8265:8265`; or pass --address."
        ) from None


@contextmanager
def _explicit_address() -> Iterator[None]:
    """Hide RAY_ADDRESS / RAY_API_SERVER_ADDRESS while the client is built: Ray lets them override its argument."""
    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


@contextmanager
def _jobs_api_errors(url: str) -> Iterator[None]:
    """Turn the Jobs API client's failures (refused, unauthenticated, HTTP errors) into one-line user errors."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as e:
        raise UserError(
            f"the Ray Jobs API at {url} wants the cluster's token: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH "
            f"(or ~/.ray/auth_token; `ray get-auth-token` prints it on the head). Ray said: {str(e).splitlines()[0]}"
        ) from None
    except ConnectionError as e:
        raise UserError(f"cannot talk to the Ray Jobs API at {url}: {e}") from None
    except RuntimeError as e:  # the client's HTTP errors: bad runtime_env, package too large, version mismatch
        raise UserError(f"the Ray Jobs API at {url} refused the request: {e}") from None


def _client(url: str) -> Any:
    from ray.job_submission import JobSubmissionClient

    check_reachable(url)
    with _jobs_api_errors(url), _explicit_address():
        return JobSubmissionClient(url)


def _runtime_env(spec: JobSpec, job_file: Path) -> dict[str, Any]:
    """The runtime env with a local working_dir made absolute against the job file's folder."""
    env = dict(spec.runtime_env)
    wd = env.get("working_dir")
    if isinstance(wd, str) and "://" not in wd:
        path = (job_file.parent / wd).resolve()
        if not path.is_dir():
            raise UserError(f"job file {job_file}: runtime_env.working_dir: {path} is not a directory")
        env["working_dir"] = str(path)
    return env


async def _tail(client: Any, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        print(chunk, end="", flush=True)


def follow(client: Any, job_id: str, poll_s: float = 2.0) -> Any:
    """Stream the job's logs until it ends; returns its ``JobDetails``. A dropped log stream falls back to polling."""
    try:
        asyncio.run(_tail(client, job_id))
    except Exception as e:  # websocket/aiohttp errors come in many types; the status poll below decides
        print(f"\n[dcpnas submit] log stream ended early ({e}); waiting for the job's status", file=sys.stderr)
    while not client.get_job_status(job_id).is_terminal():
        time.sleep(poll_s)
    return client.get_job_info(job_id)


def main(args: argparse.Namespace) -> int:
    """Submit, print the job id, follow; 0 only when the job SUCCEEDED."""
    from ray.job_submission import JobStatus

    job_file = Path(args.job)
    spec = load_job(job_file)
    entrypoint = build_entrypoint(spec.entrypoint, args.config, args.set)
    runtime_env = _runtime_env(spec, job_file)
    url = resolve_address(args.address)
    client = _client(url)
    with _jobs_api_errors(url):
        job_id = client.submit_job(
            entrypoint=entrypoint,
            runtime_env=runtime_env,
            entrypoint_num_cpus=spec.entrypoint_num_cpus,
            entrypoint_num_gpus=spec.entrypoint_num_gpus,
            entrypoint_memory=spec.entrypoint_memory,
            entrypoint_resources=spec.entrypoint_resources,
            metadata=spec.metadata,
        )
    print(f"submitted job {job_id} to {url}: {entrypoint}", flush=True)
    if args.no_wait:
        print(f"follow it with: ray job logs --follow --address {url} {job_id}")
        return 0
    try:
        info = follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job keeps running. Stop it with: ray job stop --address {url} {job_id}")
        return 130
    if info.status == JobStatus.SUCCEEDED:
        print(f"job {job_id} SUCCEEDED")
        return 0
    print(f"job {job_id} {info.status}: {info.message or 'no reason given'}", file=sys.stderr)
    return 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submit", help="submit ray_job.yaml to a Ray cluster (Jobs API) and follow its logs")
    p.add_argument(
        "--address", help=f"Ray dashboard URL (default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS, {DEFAULT_ADDRESS})"
    )
    p.add_argument("--job", default=DEFAULT_JOB, help=f"job file (default: {DEFAULT_JOB})")
    p.add_argument("--config", help="replace the entrypoint's config (a path inside the uploaded working_dir)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="append a config override")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return without following")
    p.set_defaults(func=main)
