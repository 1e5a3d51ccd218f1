"""Parquet shards on any fsspec filesystem (docs/data.md, "Format"): manifest, atomic writer, verified reader.

A dataset is a root URI holding ``manifest.json`` and ``<split>/shard-NNNNN.parquet`` files, one row per
example (``key``, ``label``, encoded ``image`` bytes). Every file is written under a temporary name and
renamed into place, and the manifest is written last, so a crash never leaves a shard or a dataset that
looks complete.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import UserError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SCHEMA = pa.schema([("key", pa.string()), ("label", pa.int64()), ("image", pa.binary())])
DEFAULT_SHARD_BYTES = 256 * 10**6
DEFAULT_ROW_GROUP_ROWS = 256


def resolve(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, root path) of a URI or plain path; a missing backend or unknown protocol is a UserError."""
    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as e:
        raise UserError(f"cannot reach {uri!r}: {e}") from e
    return fs, path.rstrip("/") or "/"


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes | memoryview) -> None:
    """Write under a temporary name, then rename: readers never see a partial file."""
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


@dataclass(frozen=True)
class ShardInfo:
    """One Parquet file: path relative to the dataset root, row count, size, checksum, rows per row group."""

    path: str
    rows: int
    size: int
    sha256: str
    row_groups: list[int]


@dataclass
class SplitInfo:
    """A split's shards, per-class row counts, and the inputs the converter skipped or re-encoded (with reasons)."""

    shards: list[ShardInfo]
    class_counts: list[int]
    skipped: list[dict[str, str]] = field(default_factory=list)
    normalized: list[dict[str, str]] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return sum(s.rows for s in self.shards)


@dataclass
class Manifest:
    """What a reader needs to trust a dataset: schema version, class names (id = position), splits, provenance."""

    classes: list[str]
    splits: dict[str, SplitInfo]
    source: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    class_names: list[str] = field(default_factory=list)  # human-readable names by id (e.g. ImageNet's words)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        """Parse and check a manifest; ``where`` names it in errors."""
        try:
            d = json.loads(text)
            version = d["schema_version"]
            if not isinstance(version, int):
                raise TypeError(f"schema_version is {version!r}")
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"malformed manifest {where}: {e}") from e
        if version > SCHEMA_VERSION:
            raise UserError(
                f"manifest {where} has schema_version {version}, newer than this dcpnas reads "
                f"({SCHEMA_VERSION}): upgrade dcpnas"
            )
        try:
            splits = {
                name: SplitInfo(**{**s, "shards": [ShardInfo(**x) for x in s["shards"]]})
                for name, s in d["splits"].items()
            }
            names = list(d.get("class_names", []))
            return cls(list(d["classes"]), splits, d.get("source", {}), version, names)
        except (KeyError, TypeError, AttributeError) as e:
            raise UserError(f"malformed manifest {where}: {e!r}") from e


def shard_path(split: str, index: int) -> str:
    return f"{split}/shard-{index:05d}.parquet"


def write_shard(
    fs: fsspec.AbstractFileSystem,
    root: str,
    relpath: str,
    keys: Sequence[str],
    labels: Sequence[int],
    images: Sequence[bytes],
    row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
) -> ShardInfo:
    """Encode one shard in memory (to hash it), then commit it atomically. Images are stored uncompressed."""
    table = pa.table([pa.array(keys, pa.string()), pa.array(labels, pa.int64()), pa.array(images, pa.binary())], SCHEMA)
    buf = pa.BufferOutputStream()
    pq.write_table(
        table,
        buf,
        row_group_size=row_group_rows,
        compression={"key": "zstd", "label": "zstd", "image": "none"},
        use_dictionary=False,
        write_statistics=["key", "label"],
    )
    data = buf.getvalue()
    meta = pq.read_metadata(pa.BufferReader(data))
    write_atomic(fs, f"{root}/{relpath}", memoryview(data))
    groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    return ShardInfo(relpath, len(table), data.size, hashlib.sha256(memoryview(data)).hexdigest(), groups)


def write_manifest(fs: fsspec.AbstractFileSystem, root: str, manifest: Manifest) -> None:
    write_atomic(fs, f"{root}/{MANIFEST}", manifest.to_json().encode())


class ShardWriter:
    """Streams examples into size-bounded shards per split and commits the manifest on close.

    ``with ShardWriter(uri, classes) as w: w.add("train", key, label, jpeg_bytes)``. Keys must be unique within
    a split. If the block raises, no manifest is written, so the partial output is never mistaken for a dataset.
    """

    def __init__(
        self,
        uri: str,
        classes: Sequence[str],
        *,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
        source: dict[str, Any] | None = None,
    ) -> None:
        self.fs, self.root = resolve(uri)
        self.manifest = Manifest(classes=list(classes), splits={}, source=source or {})
        self.shard_bytes, self.row_group_rows = shard_bytes, row_group_rows
        self._pending: dict[str, tuple[list[str], list[int], list[bytes]]] = {}
        self._pending_bytes: dict[str, int] = {}

    def _split(self, split: str) -> SplitInfo:
        return self.manifest.splits.setdefault(split, SplitInfo([], [0] * len(self.manifest.classes)))

    def add(self, split: str, key: str, label: int, image: bytes) -> None:
        if not 0 <= label < len(self.manifest.classes):
            raise ValueError(f"label {label} of {key!r} is outside the {len(self.manifest.classes)} classes")
        self._split(split).class_counts[label] += 1
        keys, labels, images = self._pending.setdefault(split, ([], [], []))
        keys.append(key)
        labels.append(label)
        images.append(image)
        self._pending_bytes[split] = self._pending_bytes.get(split, 0) + len(image)
        if self._pending_bytes[split] >= self.shard_bytes:
            self._flush(split)

    def skip(self, split: str, source: str, reason: str) -> None:
        """Record an input that could not be stored, so ``data inspect`` can list it."""
        self._split(split).skipped.append({"source": source, "reason": reason})

    def _flush(self, split: str) -> None:
        keys, labels, images = self._pending.pop(split, ([], [], []))
        self._pending_bytes.pop(split, None)
        if keys:
            info = self._split(split)
            relpath = shard_path(split, len(info.shards))
            info.shards.append(write_shard(self.fs, self.root, relpath, keys, labels, images, self.row_group_rows))

    def close(self) -> Manifest:
        for split in list(self._pending):
            self._flush(split)
        write_manifest(self.fs, self.root, self.manifest)
        return self.manifest

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()


class ShardDataset:
    """A converted dataset: its checked manifest, verified shard access, and the key/label index of a split.

    Opening reads the manifest and lists each split once to check that every shard exists with its recorded
    size (cheap, also on object stores); ``verify()`` re-hashes the bytes.
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.fs, self.root = resolve(uri)
        where = f"{uri.rstrip('/')}/{MANIFEST}"
        try:
            text = self.fs.cat_file(f"{self.root}/{MANIFEST}").decode()
        except FileNotFoundError as e:
            raise UserError(f"no dataset at {uri}: {MANIFEST} not found (create one with `dcpnas data convert`)") from e
        except OSError as e:
            raise UserError(f"cannot read {where}: {e}") from e
        self.manifest = Manifest.from_json(text, where)
        self.fingerprint = hashlib.sha256(text.encode()).hexdigest()
        self._index: dict[str, tuple[np.ndarray, np.ndarray, dict[str, int]]] = {}
        self._check_files()

    @property
    def classes(self) -> list[str]:
        return self.manifest.classes

    def split(self, name: str) -> SplitInfo:
        try:
            return self.manifest.splits[name]
        except KeyError:
            raise UserError(f"dataset {self.uri} has no split {name!r} (has: {sorted(self.manifest.splits)})") from None

    def path(self, shard: ShardInfo) -> str:
        return f"{self.root}/{shard.path}"

    def _check_files(self) -> None:
        for name, info in self.manifest.splits.items():
            folders = {posixpath.dirname(self.path(s)) for s in info.shards}
            try:
                sizes = {
                    (d, posixpath.basename(e["name"])): e["size"] for d in folders for e in self.fs.ls(d, detail=True)
                }
            except FileNotFoundError:
                sizes = {}
            for s in info.shards:
                size = sizes.get((posixpath.dirname(self.path(s)), posixpath.basename(s.path)))
                if size != s.size:
                    state = "is missing" if size is None else f"has {size} bytes, the manifest says {s.size}"
                    raise UserError(f"shard {s.path} of split {name!r} in {self.uri} {state}")

    def open_shard(self, shard: ShardInfo) -> pq.ParquetFile:
        """Open a shard for row-group reads, refusing one whose layout differs from the manifest."""
        pf = pq.ParquetFile(self.fs.open(self.path(shard), "rb"))
        groups = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
        if groups != shard.row_groups:
            raise UserError(f"shard {shard.path} in {self.uri} does not match its manifest (row groups {groups})")
        return pf

    def index(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Keys (object array) and labels of a split in global row order (shards in manifest order)."""
        return self._lookup(split)[:2]

    def _lookup(self, split: str) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
        if split not in self._index:
            shards = self.split(split).shards
            with ThreadPoolExecutor(8) as pool:
                tables = list(pool.map(lambda s: self.open_shard(s).read(columns=["key", "label"]), shards))
            table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
            keys = table.column("key").to_numpy(zero_copy_only=False)
            lookup = {k: i for i, k in enumerate(keys)}
            if len(lookup) != len(keys):
                raise UserError(f"split {split!r} of {self.uri} has duplicate keys")
            self._index[split] = (keys, table.column("label").to_numpy().astype(np.int64), lookup)
        return self._index[split]

    def rows_for_keys(self, split: str, keys: Iterable[str]) -> np.ndarray:
        """Sorted global row ids of ``keys``; keys the split does not hold are an error (wrong split file?)."""
        lookup = self._lookup(split)[2]
        wanted = set(keys)
        missing = [k for k in wanted if k not in lookup]
        if missing:
            raise UserError(f"{len(missing)} keys are not in split {split!r} of {self.uri}, e.g. {sorted(missing)[:3]}")
        return np.sort(np.fromiter((lookup[k] for k in wanted), np.int64, len(wanted)))

    def verify(self, splits: Iterable[str] | None = None, progress: bool = False) -> None:
        """Re-hash every shard; raise one UserError listing each shard whose sha256 differs from the manifest."""
        from tqdm import tqdm

        shards = [s for name in (splits or self.manifest.splits) for s in self.split(name).shards]
        bad = []
        with tqdm(total=sum(s.size for s in shards), unit="B", unit_scale=True, disable=not progress) as bar:
            for s in shards:
                h = hashlib.sha256()
                with self.fs.open(self.path(s), "rb") as f:
                    while chunk := f.read(1 << 23):
                        h.update(chunk)
                        bar.update(len(chunk))
                if h.hexdigest() != s.sha256:
                    bad.append(f"{s.path}: sha256 {h.hexdigest()[:16]}…, manifest {s.sha256[:16]}…")
        if bad:
            raise UserError(f"checksum mismatch in {self.uri} (modified or corrupt shards):\n  " + "\n  ".join(bad))

    def __getstate__(self) -> dict[str, Any]:
        """Ship to DataLoader workers without the (large) key index."""
        return {**self.__dict__, "_index": {}}


def open_dataset(uri: str) -> ShardDataset:
    """Open the dataset at ``uri`` (any fsspec URI or path): manifest checked, shard files present."""
    return ShardDataset(uri)
