"""Whole-search checkpoints: written atomically, loaded with ``weights_only=True``, and refused
when the configuration that produced them differs from the one resuming (nanoGPT's rule)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch


class ResumeMismatchError(ValueError):
    """A checkpoint written under another configuration."""


def config_hash(config: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a (nested, JSON-able) configuration dict."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":"), default=list).encode()).hexdigest()


def check_same_config(saved: dict[str, Any], current: dict[str, Any], where: str = "") -> None:
    """Raise naming every field whose value differs between a checkpoint and the current run."""
    keys = sorted(set(saved) | set(current))
    diff = [k for k in keys if json.dumps(saved.get(k), default=list) != json.dumps(current.get(k), default=list)]
    if diff:
        detail = ", ".join(f"{k}: checkpoint={saved.get(k)!r} now={current.get(k)!r}" for k in diff)
        raise ResumeMismatchError(f"refusing to resume {where or 'checkpoint'}: config differs ({detail})")


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """torch.save to a temporary name, fsync, then rename: a crash never leaves a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    if not Path(path).exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)
