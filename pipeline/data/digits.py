"""The 8x8 handwritten digits bundled with scikit-learn: real images that need no download."""

from __future__ import annotations

import numpy as np


def load_digits_rgb() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as uint8 RGB images (N, 8, 8, 3) and int64 labels (N,)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    gray = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1), d.target.astype(np.int64)
