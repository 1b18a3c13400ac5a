"""Simulated generalist outputs with planted groups of confusable classes, for tests and scale benchmarks
(15,000 classes without training a network)."""
from __future__ import annotations

import numpy as np

CHUNK = 2048  # rows simulated at a time, to bound the float32 temporaries


def planted_predictions(num_classes: int, group_size: int, per_class: int, true_logit: float = 4.0,
                        group_logit: float = 2.5, noise: float = 1.0, seed: int = 0
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Held-out probabilities (float32, per_class examples of each class × num_classes), their labels and
    the planted groups (class c is in group c // group_size).

    An example of class y gets logits z_c = true_logit·[c = y] + group_logit·[group(c) = group(y)] + noise·ε_c,
    ε_c ~ N(0, 1), and probabilities softmax(z): the generalist confuses classes within a group."""
    rng = np.random.default_rng(seed)
    groups = np.arange(num_classes) // group_size
    labels = np.repeat(np.arange(num_classes), per_class)
    probs = np.empty((len(labels), num_classes), dtype=np.float32)
    for start in range(0, len(labels), CHUNK):
        y = labels[start:start + CHUNK]
        z = rng.standard_normal((len(y), num_classes), dtype=np.float32)
        z *= noise
        z += group_logit * (groups[None, :] == groups[y][:, None])
        z[np.arange(len(y)), y] += true_logit
        z -= z.max(axis=1, keepdims=True)
        np.exp(z, out=z)
        z /= z.sum(axis=1, keepdims=True)
        probs[start:start + len(y)] = z
    return probs, labels, groups
