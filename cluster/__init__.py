"""Stage 2: K-means on the covariance of the generalist's held-out predictions gives the class subsets
the specialists will own.

1. `covariance_matrix`: the C×C covariance or correlation (`cluster.statistic`) of the held-out
   probabilities (the generalist's top-k per example: a sparse matrix) or per-example-centred logits
   (`cluster.inputs`, dense predictions only), diagonal kept or zeroed (`cluster.diagonal`). Above
   EMBED_ABOVE classes, or with `cluster.embedding` set, the matrix is never formed: `embed` gives its
   columns in a few hundred dimensions from products with the sparse predictions (`covariance_operator`).
2. `class_vectors`: each class's column scaled to unit length (`cluster.normalise`), optionally
   projected by PCA (`cluster.pca_components`); `fit_kmeans`: KMeans or MiniBatchKMeans (`cluster.kmeans`),
   seeded by the run's seed.
3. The subsets (`cluster.shape`):
   - `partition`: M disjoint subsets covering every class, each of `min_size` to `max_size` classes:
     the K-means clusters, re-assigned under those bounds (overflowing clusters shed their outermost
     classes to the next nearest centroid, subsets below min_size take the classes cheapest to move),
     re-centred until stable. Bounds that no partition can meet (min_size·M > C or max_size·M < C)
     are a ValueError.
   - `overlapping` (the paper's shape): subset m holds the `subset_size` classes nearest centroid m, so a
     class can be in several subsets or in none. A class in no subset (`uncovered` in subsets.json)
     has no specialist and is left to the generalist alone: with the paper's n = 1, an input whose top
     class is uncovered activates no specialist, and the combined distribution is the generalist's.
4. `subset_report`: sizes, coverage, confusion capture next to random subsets of the same sizes, and
   agreement with ground-truth class groups where the data set has them.

Sizes left null in the config are set from C (`resolve`): M = round(√C), partition sizes between a
quarter of and three times C/M, overlapping subsets of 1.5·C/M classes.
"""
from .covariance import (centred_logits, check_predictions, covariance_matrix, covariance_operator, embed,
                         silent_rows, unit_rows)
from .report import (confusion_capture, coverage, group_agreement, random_capture, single_assignment,
                     soft_confusion, subset_report, together)
from .stage import check, find_subsets, resolve, run
from .subsets import (bounded_assignment, class_vectors, fit_kmeans, membership, overlapping, partition,
                      squared_distances)

__all__ = [
    "run", "check", "resolve", "find_subsets",
    "check_predictions", "centred_logits", "covariance_matrix", "covariance_operator", "embed", "unit_rows",
    "silent_rows",
    "class_vectors", "fit_kmeans", "partition", "bounded_assignment", "overlapping", "squared_distances",
    "membership",
    "soft_confusion", "together", "confusion_capture", "random_capture", "coverage", "single_assignment",
    "group_agreement", "subset_report",
]
