"""Class subsets from K-means on the class vectors: a partition with bounded sizes, or the paper's
fixed-size overlapping subsets.

A class vector is the class's column of the covariance matrix, scaled to unit length: classes the
generalist predicts together on the same inputs point the same way.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.decomposition import PCA

from .covariance import unit_rows

REFINE_ROUNDS = 20  # partition: at most this many (re-centre, re-assign) rounds after K-means


def class_vectors(matrix: np.ndarray, normalise: Literal["unit", "none"] = "unit",
                  pca_components: int | None = None, seed: int = 0) -> np.ndarray:
    """One row per class: its column of the symmetric C×C `matrix` (or its row of `covariance.embed`,
    the same geometry in fewer dimensions), scaled to unit length unless `normalise="none"`, then
    optionally projected on its first `pca_components` principal components.

    Unit length matters: a raw column's scale follows its class's variance, so K-means on raw columns
    puts the few high-variance classes in singletons and everything else in one giant cluster. PCA
    cuts K-means' cost at 15,000 classes (distances in C dimensions) to a few hundred dimensions."""
    vectors = unit_rows(matrix) if normalise == "unit" else matrix
    if pca_components is None:
        return vectors
    if not 1 <= pca_components <= min(matrix.shape):
        raise ValueError(f"cannot keep {pca_components} principal components of {len(matrix)} class vectors in "
                         f"{matrix.shape[1]} dimensions: choose between 1 and {min(matrix.shape)}")
    pca = PCA(n_components=pca_components, svd_solver="randomized", random_state=seed)
    return pca.fit_transform(vectors).astype(vectors.dtype, copy=False)


def fit_kmeans(vectors: np.ndarray, num_subsets: int, algorithm: Literal["full", "minibatch"] = "full",
               n_init: int = 10, batch_size: int = 1024, seed: int = 0) -> np.ndarray:
    """M centroids (M × dims) of the class vectors: scikit-learn's `KMeans` (Lloyd, `n_init` seeded starts)
    or its on-line `MiniBatchKMeans`, the variant the paper used."""
    num_classes = len(vectors)
    if not 1 <= num_subsets <= num_classes:
        raise ValueError(f"cannot make {num_subsets} subsets of {num_classes} classes: the number of subsets "
                         f"(M) must be between 1 and the number of classes")
    if algorithm == "full":
        km = KMeans(n_clusters=num_subsets, n_init=n_init, random_state=seed)
    else:
        km = MiniBatchKMeans(n_clusters=num_subsets, n_init=n_init, batch_size=batch_size, random_state=seed)
    return km.fit(vectors).cluster_centers_


def squared_distances(vectors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """C × M squared Euclidean distances ||v_c - μ_m||² = ||v_c||² - 2 v_c·μ_m + ||μ_m||²."""
    d = (vectors * vectors).sum(axis=1)[:, None] - 2 * vectors @ centroids.T + (centroids * centroids).sum(axis=1)
    return np.maximum(d, 0)


def membership(subsets: list[np.ndarray], num_classes: int) -> np.ndarray:
    """C × M booleans: [c ∈ S_m]."""
    holds = np.zeros((num_classes, len(subsets)), dtype=bool)
    for m, members in enumerate(subsets):
        holds[members, m] = True
    return holds


def partition(vectors: np.ndarray, centroids: np.ndarray, min_size: int, max_size: int
              ) -> tuple[list[np.ndarray], np.ndarray]:
    """Split the classes into M = len(centroids) disjoint subsets of min_size to max_size classes each.

    Starting from the K-means centroids, alternate a size-bounded assignment (`bounded_assignment`) and
    moving each centroid to the mean of its subset, until the assignment stops changing (at most
    `REFINE_ROUNDS` rounds). Where K-means' own clusters already fit the bounds this keeps them as they
    are. Returns the subsets (sorted class ids) and their centroids."""
    num_classes, num_subsets = len(vectors), len(centroids)
    if not 1 <= min_size <= max_size:
        raise ValueError(f"subset size bounds need 1 <= min_size <= max_size, got min_size={min_size}, "
                         f"max_size={max_size}")
    if min_size * num_subsets > num_classes or max_size * num_subsets < num_classes:
        raise ValueError(f"cannot split {num_classes} classes into {num_subsets} subsets of {min_size} to "
                         f"{max_size} classes: need min_size * M <= classes <= max_size * M "
                         f"({min_size * num_subsets} <= {num_classes} <= {max_size * num_subsets} is false)")
    labels = None
    for _ in range(REFINE_ROUNDS):
        new = bounded_assignment(squared_distances(vectors, centroids), min_size, max_size)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        centroids = np.stack([vectors[labels == m].mean(axis=0) for m in range(num_subsets)])
    return [np.flatnonzero(labels == m) for m in range(num_subsets)], centroids


def bounded_assignment(d: np.ndarray, min_size: int, max_size: int) -> np.ndarray:
    """A subset for each class (row of the C × M distances `d`), every subset holding min_size to max_size
    classes (the caller checks min_size * M <= C <= max_size * M).

    1. Classes nearest to a centroid choose first; each takes its nearest centroid with fewer than
       max_size classes (an overflowing cluster sheds its outermost classes to their next nearest).
    2. While a subset has fewer than min_size classes, the smallest one takes the class whose move costs
       least, d[c, small] - d[c, current], among subsets with more than min_size classes (one always
       exists, since C >= min_size * M). No subset goes above max_size or below min_size again."""
    num_classes, num_subsets = d.shape
    labels = np.empty(num_classes, dtype=np.int64)
    sizes = np.zeros(num_subsets, dtype=np.int64)
    preferences = np.argsort(d, axis=1, kind="stable")
    for c in np.argsort(d.min(axis=1), kind="stable"):
        m = preferences[c][sizes[preferences[c]] < max_size][0]
        labels[c] = m
        sizes[m] += 1
    rows = np.arange(num_classes)
    while sizes.min() < min_size:
        small = int(np.argmin(sizes))
        cost = d[:, small] - d[rows, labels]
        cost[sizes[labels] <= min_size] = np.inf
        c = int(np.argmin(cost))
        sizes[labels[c]] -= 1
        labels[c] = small
        sizes[small] += 1
    return labels


def overlapping(vectors: np.ndarray, centroids: np.ndarray, size: int, silent: np.ndarray | None = None
                ) -> list[np.ndarray]:
    """The paper's fixed-size subsets: subset m holds the `size` classes nearest to centroid m. Subsets may
    share classes, and a class near no centroid is in none (the generalist alone answers for it).
    `silent` (C,) marks the classes that never vary (zero vectors): they come last for every subset.
    A zero vector lies nearer to every centroid than most unit vectors do, so without this each such
    class joined every subset, and an image the generalist gave one of them activated every specialist."""
    num_classes = len(vectors)
    if not 1 <= size <= num_classes:
        raise ValueError(f"cannot make subsets of {size} classes out of {num_classes}: the subset size must "
                         f"be between 1 and the number of classes")
    distances = squared_distances(vectors, centroids)
    if silent is not None:
        distances[silent] = np.inf
    nearest = np.argsort(distances, axis=0, kind="stable")[:size]
    return [np.sort(nearest[:, m]) for m in range(len(centroids))]
