"""The raw form every data source returns, before the validation split and validation checks."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Source:
    """A data set as its source gives it: uint8 images, integer labels, class names, optional groups.

    Images are (N, H, W) for grayscale or (N, H, W, 3) for colour, white strokes on black for
    character sets. `class_groups[c]` is the ground-truth group id of class c (only used to judge
    clustering); `group_names[g]` names group g.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]
    class_groups: np.ndarray | None = None
    group_names: list[str] | None = None
