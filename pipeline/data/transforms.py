"""Train/eval image transforms in Pillow + torch (no torchvision: its CPU build is unusable here, docs/stack.md §1).

A transform is ``transform(img, rng) -> float32 CHW tensor``, normalised with ``mean``/``std``; with
``normalize=False`` it returns uint8 CHW instead (batches 4x smaller across processes and to the GPU) and
the consumer normalises on the device (``on_device``), as the pipeline's stages do. ``img`` is the opened,
not yet decoded PIL image, so the crop can be chosen from the header size and the JPEG decoder can
downscale in the DCT domain (``draft``) before any pixel is decoded. Randomness comes only from ``rng``,
which the stream seeds per batch, so augmentations repeat exactly for the same (seed, epoch) and after a
resume.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
Box = tuple[float, float, float, float]
Transform = Callable[[Image.Image, np.random.Generator], torch.Tensor]


def decode(data: bytes) -> Image.Image:
    """Open encoded bytes lazily (format detected from content, so a PNG named .JPEG opens fine)."""
    return Image.open(io.BytesIO(data))


def _crop_resize(img: Image.Image, box: Box, size: int) -> Image.Image:
    """Decode ``box`` (source pixel coordinates) of ``img`` into an RGB ``size`` x ``size`` image."""
    w, h = img.size
    shrink = min(box[2] - box[0], box[3] - box[1]) / size
    if img.format == "JPEG" and shrink >= 2:
        img.draft(img.mode, (math.ceil(w / shrink), math.ceil(h / shrink)))
        sx, sy = img.size[0] / w, img.size[1] / h
        box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    return img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR, box=box)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 CHW / NCHW -> float32 ``(x - 255 mean) / (255 std)`` on ``x``'s device (float x: in place)."""
    m = torch.tensor(mean, device=x.device).view(-1, 1, 1) * 255
    s = torch.tensor(std, device=x.device).view(-1, 1, 1) * 255
    return x.float().sub_(m).div_(s)


def on_device(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    mean: Sequence[float],
    std: Sequence[float],
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """uint8 image batches (``normalize=False`` transforms) -> normalised float32 on ``device``, labels there too.

    Loader workers ship 4x fewer bytes through shared memory and to the GPU, and the arithmetic runs on the
    device: on CPU a float batch costs its workers ~25 % of their decode rate in fresh pages alone
    (docs/benchmarks/loader.md).
    """
    for x, y in batches:
        yield normalize(x.to(device, non_blocking=True), mean, std), y.to(device, non_blocking=True)


def _finish(img: Image.Image, t: TrainTransform | EvalTransform) -> torch.Tensor:
    """RGB image -> uint8 CHW (made contiguous in uint8 first: 3x faster), normalised unless ``t.normalize`` is off."""
    chw = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()
    return normalize(chw, t.mean, t.std) if t.normalize else chw


@dataclass(frozen=True)
class TrainTransform:
    """Random-resized crop (area ``scale``, aspect ``ratio``, as in Inception/torchvision), flip, normalise."""

    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    normalize: bool = True

    def crop_box(self, w: int, h: int, rng: np.random.Generator) -> Box:
        """10 tries at a random area/aspect that fits, else the largest centred crop within ``ratio``."""
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            area = w * h * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                return x, y, x + cw, y + ch
        aspect = min(max(w / h, self.ratio[0]), self.ratio[1])
        cw, ch = min(w, round(h * aspect)), min(h, round(w / aspect))
        return (w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        out = _crop_resize(img, self.crop_box(*img.size, rng), self.size)
        if self.flip and rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return _finish(out, self)


@dataclass(frozen=True)
class EvalTransform:
    """Resize the shorter side to ``size / crop_fraction`` and take the centre ``size`` crop, in one resample.

    ``crop_fraction=0.875`` is the ImageNet convention (256 -> 224); use 1.0 for tiny images such as digits.
    """

    size: int = 224
    crop_fraction: float = 0.875
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    normalize: bool = True

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        w, h = img.size
        side = min(w, h) * self.crop_fraction
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
        return _finish(_crop_resize(img, box, self.size), self)
