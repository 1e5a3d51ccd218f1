"""Converters from ImageNet / ImageFolder / CIFAR-10 / scikit-learn digits to Parquet shards.

A conversion is planned up front and deterministically: each split's inputs are listed, shuffled with
``seed`` (so every shard mixes classes, which the stream's bounded shuffle buffer relies on) and cut into
shards of about ``shard_bytes`` of source data. Shards are built in a process pool; each finished shard is
committed atomically together with a small record (``_convert/<split>-NNNNN.json``: checksum, skipped
inputs, fingerprint of its inputs and options). A re-run keeps every shard whose record matches its plan
and builds only the rest; the manifest is written last and the records are then removed.

Every file input is fully decoded once. Undecodable or truncated files are skipped and listed with the
reason. JPEG/PNG in RGB or grayscale are stored byte for byte; anything else (CMYK or palette images,
other formats, a PNG with alpha) is re-encoded as RGB - JPEG for lossy sources, PNG for lossless ones -
and listed as ``normalized``. ``resize_short_side`` re-encodes larger images the same way after a resize.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from typing import Any

import fsspec
import numpy as np
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image, UnidentifiedImageError

from pipeline.data.shards import (
    DEFAULT_ROW_GROUP_ROWS,
    DEFAULT_SHARD_BYTES,
    MANIFEST,
    SCHEMA_VERSION,
    Manifest,
    ShardInfo,
    SplitInfo,
    resolve,
    shard_path,
    write_atomic,
    write_manifest,
    write_shard,
)
from pipeline.data.sources import Source
from pipeline.errors import UserError

KEEP = {"JPEG", "MPO", "PNG"}  # formats stored as they are (when RGB or grayscale)
LOSSY = {"JPEG", "MPO", "WEBP"}  # re-encoded as JPEG; everything else as PNG
WORK = "_convert"


@dataclass(frozen=True)
class Options:
    """Conversion settings. ``workers`` processes build shards (memory:// output is built in-process)."""

    shard_bytes: int = DEFAULT_SHARD_BYTES
    row_group_rows: int = DEFAULT_ROW_GROUP_ROWS
    workers: int = os.cpu_count() or 1
    resize_short_side: int | None = None
    jpeg_quality: int = 90
    seed: int = 0
    progress: bool = True


@dataclass
class _Task:
    """One shard to build: its inputs (file paths or pixels), where to commit it, and the plan fingerprint."""

    split: str
    index: int
    keys: list[str]
    labels: list[int]
    paths: list[str] | None
    pixels: np.ndarray | None
    src_fs: fsspec.AbstractFileSystem | None
    out_fs: fsspec.AbstractFileSystem
    root: str
    options: Options
    nbytes: int = 0
    fingerprint: str = ""

    @property
    def record(self) -> str:
        return f"{self.root}/{WORK}/{self.split}-{self.index:05d}.json"


# ---- one image ---------------------------------------------------------------------------------------------
def prepare_image(data: bytes, resize_short_side: int | None = None, quality: int = 90) -> tuple[bytes, str | None]:
    """Check that ``data`` decodes completely; return the bytes to store and, if re-encoded, why."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        fmt, mode, size = img.format or "?", img.mode, img.size
        resize = resize_short_side is not None and min(size) > resize_short_side
        if fmt in KEEP and mode in ("RGB", "L") and not resize:
            return data, None
        out = img.convert("RGB")
    if resize:
        scale = resize_short_side / min(size)
        out = out.resize((max(1, round(size[0] * scale)), max(1, round(size[1] * scale))), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    target = "JPEG" if fmt in LOSSY else "PNG"
    out.save(buf, target, **({"quality": quality} if target == "JPEG" else {}))
    return buf.getvalue(), f"{fmt} {mode} {size[0]}x{size[1]} stored as RGB {target} {out.size[0]}x{out.size[1]}"


def encode_png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


# ---- one shard (runs in a worker process) ------------------------------------------------------------------
def _build_shard(task: _Task) -> dict[str, Any]:
    rows: list[tuple[str, int, bytes]] = []
    skipped, normalized = [], []
    for i, (key, label) in enumerate(zip(task.keys, task.labels)):
        if task.pixels is not None:
            rows.append((key, label, encode_png(task.pixels[i])))
            continue
        path = task.paths[i]
        try:
            raw = task.src_fs.cat_file(path)
        except OSError as e:
            raise UserError(f"cannot read {path}: {e}") from e
        try:
            data, note = prepare_image(raw, task.options.resize_short_side, task.options.jpeg_quality)
        except UnidentifiedImageError:
            skipped.append({"source": key, "reason": "not an image format Pillow recognises"})
            continue
        except Exception as e:  # any other decoder failure also means: skip this file and say why
            skipped.append({"source": key, "reason": f"{type(e).__name__}: {e}"})
            continue
        if note:
            normalized.append({"source": key, "reason": note})
        rows.append((key, label, data))
    shard = None
    if rows:
        keys, labels, images = zip(*rows)
        relpath = shard_path(task.split, task.index)
        shard = asdict(write_shard(task.out_fs, task.root, relpath, keys, labels, images, task.options.row_group_rows))
    record = {
        "fingerprint": task.fingerprint,
        "shard": shard,
        "labels": [label for _, label, _ in rows],
        "skipped": skipped,
        "normalized": normalized,
    }
    write_atomic(task.out_fs, task.record, json.dumps(record).encode())
    return record


# ---- planning, resume, manifest ----------------------------------------------------------------------------
def _plan(source: Source, fs: fsspec.AbstractFileSystem, root: str, opts: Options) -> list[_Task]:
    tasks = []
    for s, (split, inp) in enumerate(source.splits.items()):
        order = np.random.default_rng([opts.seed, s]).permutation(len(inp.keys))
        start = np.cumsum(inp.sizes[order]) - inp.sizes[order]
        _, shard_of = np.unique(start // opts.shard_bytes, return_inverse=True)
        for index, members in enumerate(np.split(order, np.flatnonzero(np.diff(shard_of)) + 1)):
            if not len(members):
                continue
            paths = [inp.paths[i] for i in members] if inp.paths is not None else None
            pixels = inp.pixels[members] if inp.pixels is not None else None
            keys, labels = [inp.keys[i] for i in members], inp.labels[members].tolist()
            nbytes = int(inp.sizes[members].sum())
            t = _Task(split, index, keys, labels, paths, pixels, source.fs, fs, root, opts, nbytes)
            settings = [opts.resize_short_side, opts.jpeg_quality, opts.row_group_rows]
            spec = [SCHEMA_VERSION, split, keys, labels, paths, inp.sizes[members].tolist(), settings]
            h = hashlib.sha256(json.dumps(spec).encode())
            if pixels is not None:
                h.update(np.ascontiguousarray(pixels).data)
            t.fingerprint = h.hexdigest()
            tasks.append(t)
    return tasks


def _finished(task: _Task) -> dict[str, Any] | None:
    """The task's record if its shard was committed from the same inputs and options, else None."""
    try:
        record = json.loads(task.out_fs.cat_file(task.record))
        shard = record["shard"]
        if record["fingerprint"] == task.fingerprint and (
            shard is None or task.out_fs.size(f"{task.root}/{shard['path']}") == shard["size"]
        ):
            return record
    except (OSError, ValueError, KeyError):
        pass
    return None


def convert(source: Source, out: str, opts: Options = Options()) -> Manifest:
    """Convert ``source`` into shards at ``out`` (any fsspec URI); resumes an interrupted run."""
    from tqdm import tqdm

    fs, root = resolve(out)
    tasks = _plan(source, fs, root, opts)
    plan = hashlib.sha256("".join(t.fingerprint for t in tasks).encode()).hexdigest()
    if fs.exists(f"{root}/{MANIFEST}"):
        existing = Manifest.from_json(fs.cat_file(f"{root}/{MANIFEST}").decode(), f"{out}/{MANIFEST}")
        if existing.source.get("plan_sha256") != plan:
            raise UserError(f"{out} already holds a dataset converted from other inputs or options: delete it first")
        return existing
    for folder in [root, *(f"{root}/{d}" for d in [*source.splits, WORK])]:  # temporaries of a crashed run
        for tmp in fs.glob(f"{folder}/*.tmp-*"):
            fs.rm(tmp)
    records = {(t.split, t.index): r for t in tasks if (r := _finished(t)) is not None}
    todo = [t for t in tasks if (t.split, t.index) not in records]
    total = sum(len(t.keys) for t in tasks)
    initial = total - sum(len(t.keys) for t in todo)
    with tqdm(total=total, initial=initial, unit="img", desc="convert", disable=not opts.progress) as bar:
        # memory:// is process-local; and below one shard of work, starting processes costs more than it saves
        in_process = isinstance(fs, MemoryFileSystem) or sum(t.nbytes for t in todo) < opts.shard_bytes
        for task, record in _run(todo, 1 if in_process else opts.workers):
            records[(task.split, task.index)] = record
            bar.update(len(task.keys))
    options = {k: v for k, v in asdict(opts).items() if k not in ("workers", "progress")}
    provenance = {**source.info, "options": options, "plan_sha256": plan}
    manifest = Manifest(classes=source.classes, splits={}, source=provenance, class_names=source.class_names)
    for t in tasks:
        r = records[(t.split, t.index)]
        info = manifest.splits.setdefault(t.split, SplitInfo([], [0] * len(source.classes)))
        info.shards += [ShardInfo(**r["shard"])] if r["shard"] else []
        info.skipped += r["skipped"]
        info.normalized += r["normalized"]
        for label in r["labels"]:
            info.class_counts[label] += 1
    write_manifest(fs, root, manifest)
    if fs.exists(f"{root}/{WORK}"):
        fs.rm(f"{root}/{WORK}", recursive=True)
    return manifest


def _run(tasks: list[_Task], workers: int) -> Iterator[tuple[_Task, dict[str, Any]]]:
    """Build shards in ``workers`` spawned processes (in-process for one), yielding each as it finishes."""
    if workers <= 1 or len(tasks) <= 1:
        yield from ((t, _build_shard(t)) for t in tasks)
        return
    with ProcessPoolExecutor(min(workers, len(tasks)), mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(_build_shard, t): t for t in tasks}
        try:
            for fut in as_completed(futures):
                yield futures[fut], fut.result()
        finally:
            pool.shutdown(cancel_futures=True)
