"""Train/eval transforms without torchvision: shapes, normalisation, crop geometry, determinism, odd modes."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest_data import encode, pixels
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.data.transforms import EvalTransform, TrainTransform, decode, on_device

IDENTITY = {"mean": (0.0, 0.0, 0.0), "std": (1 / 255,) * 3}  # output = pixel values, easy to check


@settings(max_examples=100, deadline=None, derandomize=True)
@given(w=st.integers(1, 700), h=st.integers(1, 700), seed=st.integers(0, 2**32 - 1))
def test_crop_box_stays_inside_and_within_scale(w, h, seed):
    x0, y0, x1, y1 = TrainTransform(size=32).crop_box(w, h, np.random.default_rng(seed))
    assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    cw, ch = x1 - x0, y1 - y0
    if 3 / 4 <= w / h <= 4 / 3:  # (extreme shapes fall back to a thin centre crop, as in torchvision)
        assert (cw + 1) * (ch + 1) >= 0.08 * w * h, "area below the scale range (beyond rounding)"
    if (cw, ch) != (w, h):  # a random or clamped crop keeps the aspect within ratio (up to rounding)
        assert (cw - 0.5) / (ch + 0.5) <= 4 / 3 and (cw + 0.5) / (ch - 0.5) >= 3 / 4


@pytest.mark.parametrize("size", [16, 32, 224])
def test_train_transform_shape_dtype_and_determinism(size):
    img = encode(pixels(64, 48, 1))
    t = TrainTransform(size=size)
    a = t(decode(img), np.random.default_rng(5))
    assert a.shape == (3, size, size) and a.dtype == torch.float32 and a.is_contiguous()
    assert torch.equal(a, t(decode(img), np.random.default_rng(5)))
    assert not torch.equal(a, t(decode(img), np.random.default_rng(6)))


def test_flip_mirrors_and_full_crop_is_a_resize():
    arr = pixels(20, 20, 2)
    whole = TrainTransform(size=20, scale=(1.0, 1.0), ratio=(1.0, 1.0), **IDENTITY)
    chw = torch.from_numpy(arr.transpose(2, 0, 1).astype(np.float32))
    outs = [whole(Image.fromarray(arr), np.random.default_rng(s)) for s in range(20)]
    flipped = [torch.allclose(o, chw.flip(2), atol=1e-3) for o in outs]
    assert all(f or torch.allclose(o, chw, atol=1e-3) for f, o in zip(flipped, outs))
    assert 0 < sum(flipped) < 20, "flip should happen for some seeds and not others"


def test_eval_transform_centre_crop():
    arr = np.zeros((40, 60, 3), np.uint8)
    arr[:, 10:50] = 200  # the centre 40x40 square of a 60x40 image
    out = EvalTransform(size=20, crop_fraction=1.0, **IDENTITY)(Image.fromarray(arr))
    assert out.shape == (3, 20, 20)  # border pixels blend with their outside neighbours, as resize-then-crop does
    assert torch.allclose(out[:, :, 1:-1], torch.full((3, 20, 18), 200.0), atol=1e-3) and out.min() > 150
    norm = EvalTransform(size=8)(Image.fromarray(np.full((10, 10, 3), 255, np.uint8)))
    assert torch.allclose(norm[0], torch.full((8, 8), (1 - 0.485) / 0.229), atol=1e-4)


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK", "P", "RGBA", "I;16"])
def test_any_mode_becomes_rgb(mode):
    buf = io.BytesIO()
    fmt = "JPEG" if mode in ("RGB", "L", "CMYK") else "PNG"
    Image.fromarray(pixels(30, 20, 3)).convert("RGB" if mode == "I;16" else mode).convert(mode).save(buf, fmt)
    for t in (TrainTransform(size=16), EvalTransform(size=16)):
        assert t(decode(buf.getvalue()), np.random.default_rng(0)).shape == (3, 16, 16)


def test_jpeg_draft_downscale_matches_full_decode():
    """Large crops of big JPEGs decode at reduced DCT scale; the result must stay close to a full decode."""
    data = encode(pixels(800, 600, 4), quality=95)
    t = EvalTransform(size=64, **IDENTITY)
    fast = t(decode(data))
    full = Image.open(io.BytesIO(data)).convert("RGB")
    slow = t(full)
    assert decode(data).size == (800, 600)
    assert (fast - slow).abs().mean() < 2.0


def test_uint8_batches_normalised_on_device_equal_the_float_transform_bitwise():
    """The stages ship uint8 and normalise on the device; the numbers must be the float transform's exactly."""
    imgs = [encode(pixels(60, 40, seed), quality=90) for seed in range(4)]
    float_t, raw_t = TrainTransform(size=24), TrainTransform(size=24, normalize=False)
    expected = torch.stack([float_t(decode(b), np.random.default_rng(i)) for i, b in enumerate(imgs)])
    raw = torch.stack([raw_t(decode(b), np.random.default_rng(i)) for i, b in enumerate(imgs)])
    assert raw.dtype == torch.uint8
    labels = torch.arange(4)
    [(x, y)] = on_device([(raw, labels)], torch.device("cpu"), float_t.mean, float_t.std)
    assert x.dtype == torch.float32 and torch.equal(x, expected) and torch.equal(y, labels)
