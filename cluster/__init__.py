"""Stage 2: K-means on the covariance of the generalist's held-out predictions gives the class subsets
the specialists will own."""
from .covariance import centred_logits, check_predictions, covariance_matrix, unit_rows
from .report import (confusion_capture, coverage, group_agreement, random_capture, single_assignment,
                     soft_confusion, subset_report, together)
from .stage import resolve, run
from .subsets import (bounded_assignment, class_vectors, fit_kmeans, membership, overlapping, partition,
                      squared_distances)

__all__ = [
    "run", "resolve",
    "check_predictions", "centred_logits", "covariance_matrix", "unit_rows",
    "class_vectors", "fit_kmeans", "partition", "bounded_assignment", "overlapping", "squared_distances",
    "membership",
    "soft_confusion", "together", "confusion_capture", "random_capture", "coverage", "single_assignment",
    "group_agreement", "subset_report",
]
