"""Input layouts the converter reads: ImageNet ILSVRC-2012, ImageFolder trees, CIFAR-10 python batches, digits
(Fashion-MNIST's idx files: ``pipeline.data.idx``; ``dcpnas data convert`` picks one by format name).

Each function lists its inputs (no image is decoded here) and checks the layout, raising a UserError that
names the path at fault: a missing folder, an empty class folder, a val label file that does not match the
images. Paths may be any fsspec URI.
"""

from __future__ import annotations

import csv
import io
import pickle
import posixpath
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np

from pipeline.data.shards import resolve
from pipeline.errors import UserError

GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class Inputs:
    """One split's examples before sharding: files (``paths`` in ``fs``) or in-memory ``pixels`` (N, H, W, 3),
    or (N, H, W) for grayscale."""

    keys: list[str]
    labels: np.ndarray
    sizes: np.ndarray
    paths: list[str] | None = None
    pixels: np.ndarray | None = None


@dataclass
class Source:
    """What to convert: class names, inputs per split, the filesystem holding the files, and a description."""

    classes: list[str]
    splits: dict[str, Inputs]
    fs: fsspec.AbstractFileSystem | None = None
    info: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)  # human-readable, by class id; [] when unknown


def _subdirs(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    return sorted(
        posixpath.basename(e["name"].rstrip("/")) for e in fs.ls(path, detail=True) if e["type"] == "directory"
    )


def _require_dir(fs: fsspec.AbstractFileSystem, path: str, what: str) -> None:
    if not fs.isdir(path):
        raise UserError(f"{what} {path} not found")


def _images(fs: fsspec.AbstractFileSystem, path: str, maxdepth: int | None = None) -> list[tuple[str, int]]:
    """Image files under ``path`` by extension (case-insensitive), sorted, with their sizes."""
    found = fs.find(path, maxdepth=maxdepth, detail=True)
    return sorted((p, int(i["size"])) for p, i in found.items() if p.lower().endswith(IMAGE_EXTENSIONS))


def _inputs(split_dir: str, files: list[tuple[str, int]], labels: list[int]) -> Inputs:
    """Keys are paths relative to the split folder (unique, and readable in skip lists)."""
    keys = [p[len(split_dir) + 1 :] for p, _ in files]
    sizes = np.array([s for _, s in files], np.int64)
    return Inputs(keys, np.array(labels, np.int64), sizes, paths=[p for p, _ in files])


def _folder_split(fs: fsspec.AbstractFileSystem, split_dir: str, classes: list[str]) -> Inputs:
    """A ``<class>/**/<image>`` tree; class ids follow ``classes`` (a class may be absent, never empty)."""
    unknown = sorted(set(_subdirs(fs, split_dir)) - set(classes))
    if unknown:
        raise UserError(f"{split_dir} has class folders that the training classes lack: {unknown[:5]}")
    files, labels = [], []
    for label, name in enumerate(classes):
        if fs.isdir(f"{split_dir}/{name}"):
            found = _images(fs, f"{split_dir}/{name}")
            if not found:
                raise UserError(f"class folder {split_dir}/{name} has no images ({' '.join(IMAGE_EXTENSIONS)})")
            files += found
            labels += [label] * len(found)
    return _inputs(split_dir, files, labels)


def imagefolder(src: str) -> Source:
    """``src/<class>/...`` as split "train", or ``src/{train,val,test}/<class>/...`` as those splits."""
    fs, root = resolve(src)
    _require_dir(fs, root, "ImageFolder root")
    named = [s for s in ("train", "val", "test") if fs.isdir(f"{root}/{s}")]
    dirs = {s: f"{root}/{s}" for s in named} if named else {"train": root}
    classes = _subdirs(fs, next(iter(dirs.values())))
    if not classes:
        raise UserError(f"no class folders in {next(iter(dirs.values()))}")
    return Source(
        classes, {s: _folder_split(fs, d, classes) for s, d in dirs.items()}, fs, {"format": "imagefolder", "src": src}
    )


def read_val_labels(uri: str) -> dict[str, str]:
    """Image name (no extension) -> wnid, from ``LOC_val_solution.csv`` or the ILSVRC-2012 devkit.

    The devkit form is the ground-truth list (one ILSVRC2012_ID per val image, in file-number order) plus
    ``meta.mat`` beside it for the ID -> wnid map; ``uri`` may be the devkit folder or the list itself.
    """
    fs, path = resolve(uri)
    try:
        if path.endswith(".csv"):
            rows = csv.DictReader(io.StringIO(fs.cat_file(path).decode()))
            return {r["ImageId"]: r["PredictionString"].split()[0] for r in rows}
        if fs.isdir(path):
            path = next((p for p in (f"{path}/data/{GROUND_TRUTH}", f"{path}/{GROUND_TRUTH}") if fs.exists(p)), path)
        from scipy.io import loadmat

        synsets = loadmat(io.BytesIO(fs.cat_file(f"{posixpath.dirname(path)}/meta.mat")), squeeze_me=True)["synsets"]
        wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
        ids = fs.cat_file(path).decode().split()
        return {f"ILSVRC2012_val_{i:08d}": wnid[int(x)] for i, x in enumerate(ids, 1)}
    except (OSError, KeyError, ValueError, IndexError) as e:
        raise UserError(f"cannot read ImageNet val labels from {uri}: {type(e).__name__}: {e}") from e


def _flat_val(fs: fsspec.AbstractFileSystem, val: str, classes: list[str], labels_uri: str) -> Inputs:
    files = _images(fs, val, maxdepth=1)
    wnids = read_val_labels(labels_uri)
    stems = {posixpath.splitext(posixpath.basename(p))[0] for p, _ in files}
    unlabeled, missing = sorted(stems - wnids.keys()), sorted(wnids.keys() - stems)
    unknown = sorted(set(wnids.values()) - set(classes))
    if unlabeled or missing or unknown or not files:
        raise UserError(
            f"val labels {labels_uri} do not match the images in {val}: {len(stems)} images, "
            f"{len(unlabeled)} without a label {unlabeled[:3]}, {len(missing)} labels without an image "
            f"{missing[:3]}, {len(unknown)} classes not in train/ {unknown[:3]}"
        )
    index = {c: i for i, c in enumerate(classes)}
    return _inputs(val, files, [index[wnids[posixpath.splitext(posixpath.basename(p))[0]]] for p, _ in files])


SYNSET_MAPPING = "LOC_synset_mapping.txt"  # Kaggle's ILSVRC: "n01440764 tench, Tinca tinca" per line


def synset_names(fs: fsspec.AbstractFileSystem, root: str, classes: list[str]) -> list[str]:
    """The words of each wnid in ``classes``, from ``root/LOC_synset_mapping.txt`` or the devkit's ``meta.mat``
    (``[]`` when neither is there; a wnid neither names gets ``""``)."""
    mapping, meta = f"{root}/{SYNSET_MAPPING}", f"{root}/ILSVRC2012_devkit_t12/data/meta.mat"
    try:
        if fs.exists(mapping):
            lines = fs.cat_file(mapping).decode().splitlines()
            words = dict(line.strip().partition(" ")[::2] for line in lines if line.strip())
        elif fs.exists(meta):
            from scipy.io import loadmat

            synsets = loadmat(io.BytesIO(fs.cat_file(meta)), squeeze_me=True)["synsets"]
            words = {str(s["WNID"]): str(s["words"]) for s in synsets}
        else:
            return []
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"cannot read ImageNet class names under {root}: {type(e).__name__}: {e}") from e
    return [words.get(c, "") for c in classes]


def imagenet(src: str, val_labels: str | None = None) -> Source:
    """ILSVRC-2012: ``train/<wnid>/*.JPEG``; ``val/`` foldered by wnid, or flat with a label file. Class ids
    are the sorted wnids; their names come from ``LOC_synset_mapping.txt`` or the devkit when present.

    For a flat val/ the labels come from ``val_labels`` or, if not given, ``src/LOC_val_solution.csv`` or
    the devkit at ``src/ILSVRC2012_devkit_t12``.
    """
    fs, root = resolve(src)
    _require_dir(fs, f"{root}/train", "ImageNet train folder")
    classes = _subdirs(fs, f"{root}/train")
    if not classes:
        raise UserError(f"no class folders in {root}/train")
    splits = {"train": _folder_split(fs, f"{root}/train", classes)}
    val = f"{root}/val"
    if fs.isdir(val) and _subdirs(fs, val):
        splits["val"] = _folder_split(fs, val, classes)
    elif fs.isdir(val):
        candidates = [f"{root}/LOC_val_solution.csv", f"{root}/ILSVRC2012_devkit_t12"]
        val_labels = val_labels or next((fs.unstrip_protocol(c) for c in candidates if fs.exists(c)), None)
        if val_labels is None:
            raise UserError(
                f"{val} is flat and no label file was found: pass --val-labels "
                "(LOC_val_solution.csv or the ILSVRC2012_devkit_t12 folder)"
            )
        splits["val"] = _flat_val(fs, val, classes, val_labels)
    info = {"format": "imagenet", "src": src, "val_labels": val_labels}
    return Source(classes, splits, fs, info, synset_names(fs, root, classes))


class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles: allow only what numpy arrays need, so a crafted file cannot run code."""

    ALLOWED = {
        (m, n)
        for m in ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric", "numpy._core.numeric")
        for n in ("_reconstruct", "_frombuffer")
    } | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


def cifar10(src: str) -> Source:
    """``cifar-10-batches-py`` (or its parent): data_batch_1..5 -> "train", test_batch -> "test"; stored as PNG."""
    fs, root = resolve(src)
    folder = root if fs.exists(f"{root}/batches.meta") else f"{root}/cifar-10-batches-py"

    def load(name: str) -> dict[bytes, object]:
        path = f"{folder}/{name}"
        try:
            return _ArrayUnpickler(io.BytesIO(fs.cat_file(path)), encoding="bytes").load()
        except FileNotFoundError as e:
            raise UserError(f"CIFAR-10 file {path} not found") from e
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
            raise UserError(f"{path} is not a CIFAR-10 python batch: {e}") from e

    classes = [n.decode() for n in load("batches.meta")[b"label_names"]]
    splits = {}
    for split, names in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        batches = [load(n) for n in names]
        try:
            pixels = np.concatenate([np.asarray(b[b"data"], np.uint8).reshape(-1, 3, 32, 32) for b in batches])
            labels = np.concatenate([np.asarray(b[b"labels"], np.int64) for b in batches])
        except (KeyError, ValueError) as e:
            raise UserError(f"unexpected CIFAR-10 batch layout in {folder}: {e!r}") from e
        keys = [f"{n}/{i:05d}" for n, b in zip(names, batches) for i in range(len(b[b"labels"]))]
        sizes = np.full(len(keys), 32 * 32 * 3)
        splits[split] = Inputs(keys, labels, sizes, pixels=pixels.transpose(0, 2, 3, 1))
    return Source(classes, splits, None, {"format": "cifar10", "src": src})


def digits() -> Source:
    """scikit-learn's 1797 8x8 digits (bundled, real images), a fixed class-balanced 80/20 train/test split."""
    from pipeline.data.digits import load_digits_rgb
    from pipeline.data.splits import balanced_split

    images, labels = load_digits_rgb()
    keys = [f"{i:04d}" for i in range(len(labels))]
    parts = balanced_split(keys, labels, {"train": 0.8, "test": 0.2}, seed=0).parts
    splits = {}
    for name, part in parts.items():
        idx = np.array([int(k) for k in part])
        splits[name] = Inputs(list(part), labels[idx], np.full(len(idx), 8 * 8 * 3), pixels=images[idx])
    return Source([str(i) for i in range(10)], splits, None, {"format": "digits"})
