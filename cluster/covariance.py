"""The C×C covariance (or correlation) of the generalist's held-out predictions, one column per class.

Two classes the generalist tends to predict together on the same inputs have a large positive
covariance; the columns of this matrix are what K-means clusters.
"""
from __future__ import annotations

from typing import Literal

import numpy as np


def check_predictions(x: np.ndarray, num_classes: int, name: str = "predictions") -> np.ndarray:
    """`x` as a float array of shape (examples, num_classes), or a ValueError naming what is wrong."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (examples × classes), got shape {x.shape}")
    if x.shape[1] != num_classes:
        raise ValueError(f"{name} has {x.shape[1]} columns but the data set has {num_classes} classes")
    if len(x) < 2:
        raise ValueError(f"{name} holds {len(x)} examples: a covariance needs at least 2")
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
    if bad:
        raise ValueError(f"{name} holds {bad} NaN or infinite values: the generalist's outputs are broken")
    return x


def centred_logits(logits: np.ndarray) -> np.ndarray:
    """Logits minus each example's mean logit. Softmax ignores a constant added to an example's logits,
    so that offset is arbitrary; left in, its variation would correlate every pair of columns."""
    return logits - logits.mean(axis=1, keepdims=True)


def covariance_matrix(x: np.ndarray, statistic: Literal["covariance", "correlation"] = "covariance",
                      diagonal: Literal["keep", "zero"] = "keep") -> np.ndarray:
    """The C×C covariance (as `np.cov(x, rowvar=False)`) or correlation (as `np.corrcoef`) of the columns
    of `x` (examples × classes), with its diagonal kept or zeroed, in `x`'s float dtype (float32 halves
    the 15,000-class matrix to 900 MB).

    A class whose column never varies beyond float rounding carries no information: its row and column
    are zero (where `np.corrcoef` would give NaN). Raises ValueError if nothing varies, or if the matrix
    is zero once the diagonal is dropped (no two classes vary together)."""
    centred = x - x.mean(axis=0)
    cov = centred.T @ centred
    cov /= len(x) - 1
    scale = np.maximum(x.max(axis=0), -x.min(axis=0))  # centring rounds column c by about eps * scale[c]
    rounding = (16 * np.finfo(x.dtype).eps * scale) ** 2  # a variance float rounding alone can produce
    var = np.diag(cov).copy()
    varies = var > rounding
    if not varies.any():
        raise ValueError("the covariance of the generalist's predictions is all zero: it predicts the same "
                         "for every held-out input, so there are no confusions to cluster")
    cov[~varies, :] = 0
    cov[:, ~varies] = 0
    if statistic == "correlation":
        std = np.sqrt(np.where(varies, var, 1))
        cov /= std[:, None]
        cov /= std[None, :]
    if diagonal == "zero":
        np.fill_diagonal(cov, 0)
    if not np.any(cov):
        raise ValueError(f"the {statistic} of the generalist's predictions is zero off the diagonal: "
                         "no two classes vary together, so there are no confusions to cluster")
    return cov


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    """Each row scaled to unit Euclidean length (zero rows stay zero). For the symmetric covariance,
    row c is column c: this normalises the columns without a transposed copy."""
    norms = np.sqrt(np.einsum("ij,ij->i", matrix, matrix))
    return matrix / np.where(norms > 0, norms, 1)[:, None]
