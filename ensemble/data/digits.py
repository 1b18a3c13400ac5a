"""scikit-learn's bundled 8x8 digits, with a stratified seeded test split (the set has none)."""
from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from .source import Source

TEST_FRACTION = 0.2


def digits(seed: int = 0) -> Source:
    """1,797 images of 8x8 pixels in 10 classes; pixel values 0..16 scaled to 0..255."""
    d = load_digits()
    x = np.round(d.images * (255 / 16)).astype(np.uint8)
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=TEST_FRACTION, stratify=y, random_state=seed)
    return Source(x_tr, y_tr, x_te, y_te, class_names=[str(c) for c in range(10)])
