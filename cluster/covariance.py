"""The C×C covariance (or correlation) of the generalist's held-out predictions, one column per class.

Two classes the generalist tends to predict together on the same inputs have a large positive
covariance; the columns of this matrix are what K-means clusters. The predictions are an (N, C) array,
or a sparse matrix of each example's top-k probabilities (`ensemble.predictions`): then the matrix is
accumulated from the sparse rows, X'X - N·μμ' (N·k² work, not N·C²), and at large C it is never formed:
`embed` gives its columns' geometry in a few hundred dimensions from products with the sparse X alone.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
from scipy import sparse

Matrix = np.ndarray | sparse.csr_matrix  # examples × classes


def check_predictions(x: Matrix, num_classes: int, name: str = "predictions") -> Matrix:
    """`x` as a float array or sparse matrix of shape (examples, num_classes), or a ValueError naming
    what is wrong."""
    if not sparse.issparse(x):
        x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (examples × classes), got shape {x.shape}")
    if x.shape[1] != num_classes:
        raise ValueError(f"{name} has {x.shape[1]} columns but the data set has {num_classes} classes")
    if x.shape[0] < 2:
        raise ValueError(f"{name} holds {x.shape[0]} examples: a covariance needs at least 2")
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    values = x.data if sparse.issparse(x) else x
    bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
    if bad:
        raise ValueError(f"{name} holds {bad} NaN or infinite values: the generalist's outputs are broken")
    return x


def centred_logits(logits: np.ndarray) -> np.ndarray:
    """Logits minus each example's mean logit. Softmax ignores a constant added to an example's logits,
    so that offset is arbitrary; left in, its variation would correlate every pair of columns."""
    return logits - logits.mean(axis=1, keepdims=True)


def covariance_matrix(x: Matrix, statistic: Literal["covariance", "correlation"] = "covariance",
                      diagonal: Literal["keep", "zero"] = "keep") -> np.ndarray:
    """The C×C covariance (as `np.cov(x, rowvar=False)`) or correlation (as `np.corrcoef`) of the columns
    of `x` (examples × classes), with its diagonal kept or zeroed: in `x`'s float dtype for an array
    (float32 halves the 15,000-class matrix to 900 MB), from its centred columns; in float64 for a
    sparse matrix, from its raw moments (centring would make it dense).

    A class whose column never varies beyond float rounding carries no information: its row and column
    are zero (where `np.corrcoef` would give NaN). Raises ValueError if nothing varies, or if the matrix
    is zero once the diagonal is dropped (no two classes vary together)."""
    if sparse.issparse(x):
        x = x.astype(np.float64)
        n, mean = x.shape[0], np.asarray(x.mean(axis=0)).ravel()
        cov = (x.T @ x).toarray()
        cov -= n * np.outer(mean, mean)
        cov /= n - 1
    else:
        centred = x - x.mean(axis=0)
        cov = centred.T @ centred
        cov /= len(x) - 1
    var = np.diag(cov).copy()
    varies = var > _rounding(x)
    if not varies.any():
        raise ValueError(NOTHING_VARIES)
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


NOTHING_VARIES = ("the covariance of the generalist's predictions is all zero: it predicts the same for every "
                  "held-out input, so there are no confusions to cluster")


def _rounding(x: Matrix) -> np.ndarray:
    """Per class, a variance that float rounding alone can produce: centring an array rounds column c by
    about eps·max|x_c|; raw moments, Σx² - N·μ², lose about eps·Σx²."""
    if sparse.issparse(x):
        return 16 * np.finfo(np.float64).eps * np.asarray(x.multiply(x).sum(axis=0)).ravel() / (x.shape[0] - 1)
    scale = np.maximum(x.max(axis=0), -x.min(axis=0))
    return (16 * np.finfo(x.dtype).eps * scale) ** 2


def covariance_operator(x: Matrix, statistic: Literal["covariance", "correlation"] = "covariance",
                        diagonal: Literal["keep", "zero"] = "keep") -> Callable[[np.ndarray], np.ndarray]:
    """V (C, r) ↦ A V for A the matrix `covariance_matrix(x, statistic, diagonal)` would make, never
    forming it: A V = D [(X'(X D V) - N μ (μ' D V)) / (N - 1)] D with D the columns' scale (0 for a class
    that does not vary, 1/std for the correlation), less diag(A)·V for a zeroed diagonal. Two products
    with the sparse X: O(N·k·r + C·r). In float64, from raw moments."""
    x = x.astype(np.float64) if sparse.issparse(x) else np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    mean = np.asarray(x.mean(axis=0)).ravel()
    var = (np.asarray((x.multiply(x) if sparse.issparse(x) else x * x).sum(axis=0)).ravel() - n * mean**2) / (n - 1)
    varies = var > _rounding(x)
    if not varies.any():
        raise ValueError(NOTHING_VARIES)
    scale = np.where(varies, 1.0 / np.sqrt(np.where(varies, var, 1)) if statistic == "correlation" else 1.0, 0.0)

    def apply(v: np.ndarray) -> np.ndarray:
        w = v * scale[:, None]
        out = np.asarray(x.T @ np.asarray(x @ w)) - n * np.outer(mean, mean @ w)
        out /= n - 1
        if diagonal == "zero":
            out -= var[:, None] * w
        return out * scale[:, None]

    return apply


def embed(apply: Callable[[np.ndarray], np.ndarray], num_classes: int, dims: int, seed: int,
          power_iterations: int = 6, oversample: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """The columns of the symmetric C×C matrix A, known through `apply` (V ↦ A V), in `dims` dimensions:
    rows of U·Λ for A ≈ U Λ U' its `dims` eigenpairs of largest |λ|, by the randomized range finder with
    power iterations (Halko, Martinsson & Tropp 2011, algorithms 4.4 and 5.3). Distances between these
    rows are those between A's columns, exactly when dims = C: K-means on them is K-means on the
    columns. Returns the (C, dims) rows and the eigenvalues."""
    if not 1 <= dims <= num_classes:
        raise ValueError(f"cannot embed {num_classes} classes in {dims} dimensions: cluster.embedding must be "
                         f"between 1 and {num_classes}")
    width = min(num_classes, dims + oversample)
    basis = np.random.default_rng(seed).standard_normal((num_classes, width))
    for _ in range(power_iterations + 1):
        basis = np.linalg.qr(apply(basis))[0]
    small = basis.T @ apply(basis)
    values, vectors = np.linalg.eigh((small + small.T) / 2)
    keep = np.argsort(-np.abs(values), kind="stable")[:dims]
    if not np.any(values[keep]):
        raise ValueError("the matrix of the generalist's predictions is zero: no two classes vary together, so "
                         "there are no confusions to cluster")
    return (basis @ vectors[:, keep]) * values[keep], values[keep]


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    """Each row scaled to unit Euclidean length; zero rows, and rows shorter than ZERO_ROW of the
    longest, are zero. For the symmetric covariance, row c is column c: this normalises the columns
    without a transposed copy; for `embed`'s rows, whose lengths are the columns' lengths, likewise (a
    class that never varies has a zero column, and an embedded row of rounding noise)."""
    norms = np.sqrt(np.einsum("ij,ij->i", matrix, matrix))
    zero = _silent(norms)
    return np.where(zero[:, None], 0, matrix / np.where(zero, 1, norms)[:, None])


def silent_rows(matrix: np.ndarray) -> np.ndarray:
    """(C,) True for the classes `unit_rows` zeroes: those that never vary in the predictions, which
    nothing is confused with."""
    return _silent(np.sqrt(np.einsum("ij,ij->i", matrix, matrix)))


def _silent(norms: np.ndarray) -> np.ndarray:
    return norms <= ZERO_ROW * norms.max(initial=0)


ZERO_ROW = 1e-10
