"""Bounded retry of tracking writes: a tracking hiccup shorter than the bound never fails a trial.

MLflow's HTTP client retries each request a few times by itself (connect/read errors, 408/429/5xx; kept
short by ``pipeline.MLFLOW_DEFAULTS``). This layer adds what it lacks: a bound in seconds instead of a
count, so a server restart or a rescheduled pod is waited out; the same for a SQLite store used directly
("database is locked"); whole units (open a run = search + create) retried together, so a retry finds
what the failed attempt created; and, after the bound, an error that says what was being written where.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import requests
from mlflow.exceptions import MlflowException

T = TypeVar("T")
FIRST_WAIT_S = 1.0
MAX_WAIT_S = 30.0
POOL_TIMEOUT = "QueuePool limit"  # sqlalchemy.exc.TimeoutError: "QueuePool limit of size 5 overflow 10 reached"


def display_uri(uri: str) -> str:
    """The URI without a password, for messages and logged values."""
    parts = urlsplit(uri)
    if not parts.password:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")))


class TrackingUnavailable(RuntimeError):
    """A tracking write still failed after the retry bound; the message names the server and the write."""


def is_transient(e: BaseException) -> bool:
    """Worth retrying: HTTP 408, 429 or 5xx (SQLite's "database is locked" arrives as 503), failed connections,
    and the server's SQLAlchemy pool timeout, which MLflow 3.17 reports as a 400 BAD_REQUEST (its session
    wrapper maps every SQLAlchemyError but OperationalError to 400). Never other 4xx: bad requests, refused
    credentials, missing runs fail at once."""
    if isinstance(e, MlflowException):
        status = e.get_http_status_code()
        return status in (408, 429) or status >= 500 or POOL_TIMEOUT in e.message
    return isinstance(e, requests.ConnectionError | requests.Timeout)


def retrying(fn: Callable[[], T], what: str, uri: str, bound_s: float) -> T:
    """``fn()``, retried on transient errors with jittered exponential waits (1 s doubling to 30 s) for up to
    ``bound_s`` seconds; then :class:`TrackingUnavailable` naming ``what`` and the server ``uri`` (password
    masked, also inside MLflow's message, which quotes the request URL).

    ``fn`` must be idempotent: MLflow keys metrics by (key, step, timestamp, value), so a resent batch with
    the same timestamps adds nothing; params, tags and terminal states overwrite with equal values.
    """
    deadline = time.monotonic() + bound_s
    wait = FIRST_WAIT_S
    while True:
        try:
            return fn()
        except Exception as e:
            left = deadline - time.monotonic()
            if not is_transient(e):
                raise
            if left <= 0:
                shown = display_uri(uri)
                raise TrackingUnavailable(
                    f"MLflow at {shown}: {what} still failing after {bound_s:.0f} s (tracking.retry_s): "
                    + str(e).replace(uri.rstrip("/"), shown.rstrip("/"))
                ) from e
            time.sleep(min(left, random.uniform(wait / 2, wait)))
            wait = min(wait * 2, MAX_WAIT_S)
