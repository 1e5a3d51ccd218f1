"""Fashion-MNIST (and any MNIST-layout set) from its idx files, gzipped or not.

The idx format is a big-endian header - two zero bytes, a type code (0x08: unsigned byte), the number of
dimensions, one uint32 per dimension - followed by the values. Images are ``idx3`` (N, rows, cols),
labels ``idx1`` (N,). Every inconsistency is a UserError naming the file.
"""

from __future__ import annotations

import gzip
import zlib

import numpy as np

from pipeline.data.shards import resolve
from pipeline.data.sources import Inputs, Source
from pipeline.errors import UserError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian/Ubuntu package dataset-fashion-mnist
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
UBYTE = 0x08


def parse_idx(data: bytes, ndim: int, name: str) -> np.ndarray:
    """The uint8 array in one idx file's bytes; ``name`` is what errors cite."""
    if len(data) < 4 + 4 * ndim:
        raise UserError(f"{name}: truncated idx header ({len(data)} bytes)")
    zero, kind, dims = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0 or kind != UBYTE or dims != ndim:
        magic = int.from_bytes(data[:4], "big")
        want = (UBYTE << 8) | ndim
        raise UserError(f"{name}: wrong magic number 0x{magic:08x} (an idx{ndim} ubyte file has 0x{want:08x})")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, 4))
    body = memoryview(data)[4 + 4 * ndim :]
    expected = int(np.prod(shape))
    if len(body) != expected:
        raise UserError(f"{name}: {len(body)} data bytes, but its header {shape} says {expected} (truncated file?)")
    return np.frombuffer(body, np.uint8).reshape(shape)


def read_idx(src: str, stem: str, ndim: int) -> np.ndarray:
    """``src/stem`` or ``src/stem.gz`` (the raw file wins if both exist)."""
    fs, root = resolve(src)
    path = next((p for p in (f"{root}/{stem}", f"{root}/{stem}.gz") if fs.exists(p)), None)
    if path is None:
        raise UserError(f"idx file {root}/{stem} (or {stem}.gz) not found")
    data = fs.cat_file(path)
    if path.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise UserError(f"{path}: not a complete gzip file ({e})") from None
    return parse_idx(data, ndim, path)


def fashion_mnist(src: str = FASHION_MNIST_DIR) -> Source:
    """``train-*`` (60k) -> "train", ``t10k-*`` (10k) -> "test"; grayscale 28x28, stored as PNG."""
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(src, f"{prefix}-images-idx3-ubyte", 3)
        labels = read_idx(src, f"{prefix}-labels-idx1-ubyte", 1).astype(np.int64)
        if len(images) != len(labels):
            raise UserError(
                f"{src}/{prefix}-labels-idx1-ubyte has {len(labels)} labels but "
                f"{prefix}-images-idx3-ubyte has {len(images)} images"
            )
        if len(labels) and labels.max() >= len(FASHION_MNIST_CLASSES):
            raise UserError(f"{src}/{prefix}-labels-idx1-ubyte: label {labels.max()} is not a Fashion-MNIST class")
        keys = [f"{prefix}/{i:05d}" for i in range(len(labels))]
        sizes = np.full(len(keys), images[0].size if len(images) else 0, np.int64)
        splits[split] = Inputs(keys, labels, sizes, pixels=images)
    return Source(list(FASHION_MNIST_CLASSES), splits, None, {"format": "fashion-mnist", "src": src})
