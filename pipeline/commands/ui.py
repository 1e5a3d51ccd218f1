"""``dcpnas ui``: the MLflow UI over the store a config tracks into, until Ctrl-C.

Over SQLite it runs the same ``mlflow server`` as ``tracking.server.local_server`` (one process group,
stopped and waited for on exit), on loopback unless another host is asked for: the server has
no authentication. A server URI is already a UI, so it is only printed.
"""

from __future__ import annotations

import argparse
import ipaddress
import signal
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from urllib.parse import urlsplit

from pipeline import tracking
from pipeline.config import add_config_arguments, load_config
from pipeline.errors import UserError
from pipeline.tracking import dashboard
from pipeline.tracking.retry import display_uri
from pipeline.tracking.server import health_problem, local_server

HEALTH_EVERY_S = 5.0
PORT_TRIES = 20  # a busy --port: the next free one of these
HEALTH_FAILURES = 3  # consecutive failed checks before the server counts as gone (a loaded machine is slow)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM ends the UI like Ctrl-C, so the server group is stopped instead of orphaned."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def free_port(host: str, port: int, tries: int = PORT_TRIES) -> int:
    """``port`` or, when it is taken, the next free one of ``tries`` (0: any free port)."""
    for p in [port] if port == 0 else range(port, port + tries):
        with socket.socket() as s:
            try:
                s.bind((host, p))
            except OSError:
                continue
            if p != port:
                print(f"port {port} is in use; serving on {p}", flush=True)
            return s.getsockname()[1]
    raise UserError(f"ports {port}-{port + tries - 1} on {host} are all in use: pass --port with a free one")


def serve(uri: str, experiment: str, host: str = "127.0.0.1", port: int = 5000) -> None:
    """Serve the UI for ``uri`` until interrupted (Ctrl-C or SIGTERM); ``UserError`` if the server dies."""
    if urlsplit(uri).scheme in ("http", "https"):
        print(f"{display_uri(uri)} is an MLflow server: open it in a browser", flush=True)
        return
    if urlsplit(uri).scheme != "sqlite":
        raise UserError(f"dcpnas ui serves SQLite stores; for {display_uri(uri)} run `mlflow server` itself")
    if not is_loopback(host):
        print(f"warning: binding {host}: the MLflow UI has no authentication", file=sys.stderr, flush=True)
    artifacts = tracking.artifacts_dir(uri)
    experiment_id = tracking.ui_experiment(uri, experiment)
    with _sigterm_as_interrupt():
        try:
            with local_server(uri, artifacts, host, free_port(host, port)) as url:
                print(f"MLflow UI: {dashboard.experiment_url(url, experiment_id)}", flush=True)
                print("press Ctrl-C to stop", flush=True)
                failures = 0
                while failures < HEALTH_FAILURES:
                    time.sleep(HEALTH_EVERY_S)
                    failures = 0 if health_problem(url, 10.0) is None else failures + 1
                raise UserError(
                    f"the MLflow server at {url} stopped answering; see {artifacts.parent}/mlflow-server.log"
                )
        except KeyboardInterrupt:
            print("MLflow UI stopped", flush=True)


def main(args: argparse.Namespace) -> int:

    cfg = load_config(args.config, args.set)
    serve(tracking.existing_store(cfg.tracking.uri), cfg.experiment, args.host, args.port)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ui", help="serve the MLflow UI for the config's tracking store (loopback by default)")
    add_config_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1; others get a warning)")
    p.add_argument("--port", type=int, default=5000, help="port (taken: the next free one; 0: any free one)")
    p.set_defaults(func=main)
