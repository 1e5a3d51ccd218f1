"""Class-balanced search splits (method §7.3): deterministic from a seed, saved as JSON with a sha256.

The driver builds the split once (e.g. ``{"weights": 0.5, "arch": 0.5}`` of CIFAR-10 train, or
``{"weights": 0.1, "arch": 0.025}`` of ImageNet train, PC-DARTS style) and logs the file; every trial of a
sweep loads the same file and streams each part with ``ShardStream(..., keys=split.parts["weights"])``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from pipeline.data.shards import resolve, write_atomic
from pipeline.errors import UserError

SPLIT_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class SearchSplit:
    """Disjoint named parts of one split's keys (sorted), with per-class counts and where they came from."""

    seed: int
    fractions: dict[str, float]
    parts: dict[str, list[str]]
    class_counts: dict[str, list[int]]
    source: str = ""
    schema_version: int = SPLIT_SCHEMA_VERSION

    def _canonical(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @property
    def sha256(self) -> str:
        """Hash of the canonical JSON: equal hashes mean identical parts, seed and fractions."""
        return hashlib.sha256(self._canonical().encode()).hexdigest()

    def save(self, uri: str) -> str:
        """Write the split (with its hash) atomically to any fsspec URI; return the hash."""
        fs, path = resolve(uri)
        write_atomic(fs, path, json.dumps({**json.loads(self._canonical()), "sha256": self.sha256}).encode())
        return self.sha256

    @classmethod
    def load(cls, uri: str) -> SearchSplit:
        """Read a saved split, refusing one whose content no longer matches its recorded hash."""
        fs, path = resolve(uri)
        try:
            d = json.loads(fs.cat_file(path))
            recorded = d.pop("sha256")
            split = cls(**d)
        except FileNotFoundError as e:
            raise UserError(f"split file {uri} not found") from e
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"malformed split file {uri}: {e!r}") from e
        if split.sha256 != recorded:
            raise UserError(
                f"split file {uri} was modified: content hash {split.sha256[:16]}…, recorded {recorded[:16]}…"
            )
        return split


def balanced_split(
    keys: Sequence[str], labels: Sequence[int], fractions: Mapping[str, float], seed: int, source: str = ""
) -> SearchSplit:
    """Take ``fractions[part]`` of every class for each part, at random but deterministically from ``seed``.

    Each class is sorted by key and permuted by a generator seeded with (seed, class), so the result does not
    depend on input order, process, or platform. Part sizes per class are differences of floor(cumulative
    fraction x class size): within one example of the exact fraction, and fractions summing to 1 use every key.
    """
    if any(f < 0 for f in fractions.values()) or sum(fractions.values()) > 1 + 1e-9:
        raise UserError(f"split fractions must be >= 0 and sum to <= 1, got {dict(fractions)}")
    keys_arr, labels_arr = np.asarray(keys, dtype=object), np.asarray(labels, dtype=np.int64)
    names = list(fractions)
    cum = np.cumsum([0.0, *fractions.values()])
    parts: dict[str, list[str]] = {n: [] for n in names}
    counts = {n: [0] * (int(labels_arr.max()) + 1 if len(labels_arr) else 0) for n in names}
    for c in np.unique(labels_arr):
        members = np.sort(keys_arr[labels_arr == c])
        members = members[np.random.default_rng([seed, int(c)]).permutation(len(members))]
        bounds = np.floor(cum * len(members) + 1e-9).astype(int)
        for i, n in enumerate(names):
            parts[n].extend(members[bounds[i] : bounds[i + 1]])
            counts[n][c] = int(bounds[i + 1] - bounds[i])
    return SearchSplit(
        seed=seed,
        fractions=dict(fractions),
        parts={n: sorted(map(str, p)) for n, p in parts.items()},
        class_counts=counts,
        source=source,
    )
