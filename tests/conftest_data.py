"""Fixture builders for the data tests: images are generated with Pillow, nothing is downloaded."""

from __future__ import annotations

import io
import pickle
import uuid
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from pipeline.data.shards import ShardWriter


def pixels(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB image (compresses like a photo, distinct per seed)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    return np.array(small)


def encode(arr: np.ndarray, fmt: str = "JPEG", mode: str = "RGB", quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


def odd_images(seed: int = 0) -> dict[str, bytes]:
    """The awkward files real ImageNet contains, under .JPEG names, plus two that cannot be decoded."""
    good = encode(pixels(40, 30, seed))
    return {
        "cmyk.JPEG": encode(pixels(40, 30, seed + 1), mode="CMYK"),
        "gray.JPEG": encode(pixels(40, 30, seed + 2), mode="L"),
        "png.JPEG": encode(pixels(40, 30, seed + 3), fmt="PNG"),
        "truncated.JPEG": good[: len(good) // 2],
        "garbage.JPEG": b"this is not an image",
    }


def write_folder(root: Path, classes: list[str], per_class: int, seed: int = 0, prefix: str = "") -> list[str]:
    """``root/<class>/<prefix><class>_<i>.JPEG``; returns the keys (paths relative to root)."""
    keys = []
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rel = f"{name}/{prefix}{name}_{i}.JPEG"
            (root / rel).write_bytes(encode(pixels(48, 36, seed + 1000 * c + i)))
            keys.append(rel)
    return keys


def write_devkit(root: Path, wnids_by_id: list[str], val_wnids: list[str]) -> Path:
    """An ILSVRC2012_devkit_t12 with meta.mat (ILSVRC2012_ID -> WNID) and the val ground-truth list."""
    data = root / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    synsets = np.zeros(len(wnids_by_id), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O")])
    for i, wnid in enumerate(wnids_by_id):
        synsets[i] = (i + 1, wnid, f"class {wnid}")
    scipy.io.savemat(data / "meta.mat", {"synsets": synsets})
    ids = [wnids_by_id.index(w) + 1 for w in val_wnids]
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{i}\n" for i in ids))
    return data.parent


def write_flat_val(root: Path, val_wnids: list[str]) -> None:
    (root / "val").mkdir(parents=True)
    for i in range(len(val_wnids)):
        (root / "val" / f"ILSVRC2012_val_{i + 1:08d}.JPEG").write_bytes(encode(pixels(50, 40, 5000 + i)))


def write_loc_csv(path: Path, val_wnids: list[str]) -> None:
    rows = [f"ILSVRC2012_val_{i + 1:08d},{w} 1 2 30 40 {w} 3 4 20 20\n" for i, w in enumerate(val_wnids)]
    path.write_text("ImageId,PredictionString\n" + "".join(rows))


def write_cifar(root: Path, per_batch: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """A ``cifar-10-batches-py`` in the real layout (protocol-2 pickles, channel-major rows); returns train data."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"class{i}".encode() for i in range(10)]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))
    rng = np.random.default_rng(0)
    images, labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        lab = rng.integers(0, 10, per_batch).tolist()
        (folder / name).write_bytes(pickle.dumps({b"data": data, b"labels": lab}, protocol=2))
        if name != "test_batch":
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels += lab
    return np.concatenate(images), np.array(labels)


def synthetic_dataset(
    rows: int, classes: int = 3, shard_rows: int = 8, row_group_rows: int = 3, uri: str | None = None
) -> str:
    """A dataset of ``rows`` tiny fake rows (image = key bytes) in a fresh memory:// location; returns its URI."""
    uri = uri or f"memory://ds-{uuid.uuid4().hex}"
    with ShardWriter(
        uri, [f"c{i}" for i in range(classes)], shard_bytes=shard_rows * 6, row_group_rows=row_group_rows
    ) as w:
        for i in range(rows):
            w.add("train", f"k{i:05d}", i % classes, f"{i:06d}".encode())
    return uri


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    """An idx file (ubyte) of ``array``, as MNIST and Fashion-MNIST ship them; ``.gz`` appended if ``gz``."""
    import gzip

    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + np.ascontiguousarray(array, np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def write_fashion_mnist(root: Path, n_train: int = 12, n_test: int = 5, size: int = 28, gz: bool = True) -> dict:
    """Synthetic Fashion-MNIST idx files (random pixels, labels cycling over the 10 classes); returns the arrays."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte", images, gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels, gz)
        out[prefix] = (images, labels)
    return out
