"""A generator of any number of classes with a planted hierarchy of confusable groups.

Each class's prototype is a sum of smooth random patterns, one per level: a super-group pattern
shared by `group_size` groups, a group pattern shared by `group_size` classes, and the class's own
smaller pattern. Classes of one group differ only by their own pattern, so a classifier confuses them
with each other far more than with anything else: the groups are the ground truth for clustering.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .source import Source

LEVEL_SCALES = (1.0, 0.7, 0.45)  # amplitude of the super-group, group and class patterns
CHUNK = 512  # classes generated at a time, to bound memory at 20,000+ classes


def synthetic(num_classes: int = 400, train_per_class: int = 100, test_per_class: int = 20,
              group_size: int = 10, image_size: int = 28, seed: int = 0, noise: float = 0.35) -> Source:
    """`num_classes` classes in groups of `group_size`, as uint8 (N, image_size, image_size) images whose
    pixels carry independent Gaussian noise of standard deviation `noise` (before the squashing)."""
    if num_classes < 2 or group_size < 1 or train_per_class < 1 or test_per_class < 1 or image_size < 4 or noise < 0:
        raise ValueError("synthetic data needs num_classes >= 2, group_size >= 1, train/test_per_class >= 1, "
                         "image_size >= 4 and noise >= 0")
    gen = torch.Generator().manual_seed(seed)
    groups = np.arange(num_classes) // group_size
    supers = groups // group_size
    patterns = [
        _smooth(int(ids.max()) + 1, image_size, gen) * scale
        for ids, scale in zip((supers, groups, np.arange(num_classes)), LEVEL_SCALES)
    ]
    prototypes = patterns[0][supers] + patterns[1][groups] + patterns[2]
    x_train = _samples(prototypes, train_per_class, noise, gen)
    x_test = _samples(prototypes, test_per_class, noise, gen)
    n_groups = int(groups.max()) + 1
    return Source(
        x_train=x_train,
        y_train=np.repeat(np.arange(num_classes), train_per_class),
        x_test=x_test,
        y_test=np.repeat(np.arange(num_classes), test_per_class),
        class_names=[f"c{c:05d}" for c in range(num_classes)],
        class_groups=groups.astype(np.int64),
        group_names=[f"g{g:05d}" for g in range(n_groups)],
    )


def _smooth(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """n smooth random patterns (n, size, size): 7x7 Gaussian noise upsampled bilinearly."""
    coarse = torch.randn(n, 1, 7, 7, generator=gen)
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def _samples(prototypes: torch.Tensor, per_class: int, noise: float, gen: torch.Generator) -> np.ndarray:
    """per_class noisy draws of each prototype, class-major, squashed to uint8 by a sigmoid."""
    out = []
    for start in range(0, len(prototypes), CHUNK):
        p = prototypes[start:start + CHUNK].repeat_interleave(per_class, dim=0)
        x = torch.sigmoid(2.0 * (p + noise * torch.randn(p.shape, generator=gen)))
        out.append((x * 255).round().to(torch.uint8).numpy())
    return np.concatenate(out)
