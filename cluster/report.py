"""How good the subsets are: sizes, coverage, confusion capture against random subsets, agreement with
ground-truth class groups."""
from __future__ import annotations

import numpy as np
from scipy import sparse
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from .subsets import membership, squared_distances


def soft_confusion(probs: np.ndarray | sparse.spmatrix, labels: np.ndarray, num_classes: int) -> sparse.csr_matrix:
    """The C×C soft confusion matrix P[y, c] = Σ_{i: y_i = y} p_c(x_i): the probability the generalist puts
    on class c, summed over the held-out examples of true class y; sparse, onehot(labels)ᵀ @ probs. From
    top-k predictions it holds the kept probabilities (at most N·k entries)."""
    n = len(labels)
    onehot_t = sparse.csr_matrix((np.ones(n), (labels, np.arange(n))), shape=(num_classes, n))
    return sparse.csr_matrix(onehot_t @ probs)


def together(subsets: list[np.ndarray], rows: np.ndarray, cols: np.ndarray, num_classes: int) -> np.ndarray:
    """For each pair (rows[i], cols[i]) of classes: whether they share at least one subset."""
    holds = sparse.csr_matrix(membership(subsets, num_classes), dtype=np.float32)
    return np.asarray(holds[rows].multiply(holds[cols]).sum(axis=1)).ravel() > 0


def confusion_capture(confusion: np.ndarray | sparse.spmatrix, subsets: list[np.ndarray]) -> float:
    """The share of the generalist's off-diagonal confusion mass that falls inside a subset:

        capture = Σ_{y≠c, T[y,c]} P[y, c] / Σ_{y≠c} P[y, c]

    with P the soft confusion matrix (`soft_confusion`) and T[y, c] true when y and c share at least
    one subset (`together`). A confusion between y and c can only be fixed by a specialist that holds
    both; 1 means every one can. NaN if the generalist puts no mass at all off the diagonal. The sum
    runs over P's stored entries: O(entries · subsets per class)."""
    entries = sparse.coo_matrix(confusion)
    off = entries.row != entries.col
    rows, cols, mass = entries.row[off], entries.col[off], entries.data[off].astype(np.float64)
    total = mass.sum()
    captured = mass[together(subsets, rows, cols, entries.shape[0])].sum()
    return float(captured / total) if total > 0 else float("nan")


def random_capture(confusion: np.ndarray, sizes: list[int], disjoint: bool, draws: int, seed: int
                   ) -> tuple[float, float]:
    """Mean and standard deviation of `confusion_capture` over `draws` seeded random subsets of the given
    sizes: a random partition (shuffle the classes, cut them into `sizes`) if `disjoint`, else each
    subset drawn uniformly without replacement, independently of the others."""
    if draws < 1:
        raise ValueError(f"cluster.random_draws must be at least 1, got {draws}")
    rng = np.random.default_rng(seed)
    num_classes = confusion.shape[0]
    values = []
    for _ in range(draws):
        if disjoint:
            subsets = np.split(rng.permutation(num_classes), np.cumsum(sizes)[:-1])
        else:
            subsets = [rng.choice(num_classes, size=s, replace=False) for s in sizes]
        values.append(confusion_capture(confusion, subsets))
    return float(np.mean(values)), float(np.std(values))


def coverage(subsets: list[np.ndarray], num_classes: int) -> np.ndarray:
    """For each class, how many subsets hold it (0: left to the generalist alone)."""
    return np.bincount(np.concatenate(subsets), minlength=num_classes)


def single_assignment(vectors: np.ndarray, centroids: np.ndarray, subsets: list[np.ndarray]) -> np.ndarray:
    """One subset per class, to compare overlapping subsets with ground-truth groups and to order plots:
    among the subsets holding the class, the one whose centroid is nearest; -1 for a class in none.
    For a partition this is each class's own subset."""
    holds = membership(subsets, len(vectors))
    d = np.where(holds, squared_distances(vectors, centroids), np.inf)
    return np.where(holds.any(axis=1), d.argmin(axis=1), -1)


def group_agreement(assignment: np.ndarray, groups: np.ndarray, subsets: list[np.ndarray]) -> dict:
    """Agreement with the ground-truth class groups, on the classes some subset holds: adjusted Rand index
    and normalised mutual information of `single_assignment` against the groups, and the share of
    same-group class pairs that share at least one subset (all classes counted: a pair with a class in
    no subset is not together), pair by pair within each group: O(Σ group sizes²), never C×C."""
    covered = assignment >= 0
    holds = membership(subsets, len(groups)).astype(np.float32)
    together_pairs = all_pairs = 0
    for g in np.unique(groups):
        members = holds[groups == g]
        shared = (members @ members.T) > 0
        together_pairs += int(shared.sum() - np.trace(shared))
        all_pairs += len(members) * (len(members) - 1)
    return {
        "classes_compared": int(covered.sum()),
        "ari": float(adjusted_rand_score(groups[covered], assignment[covered])),
        "nmi": float(normalized_mutual_info_score(groups[covered], assignment[covered])),
        "group_pairs_together": float(together_pairs / max(all_pairs, 1)),
    }


def subset_report(subsets: list[np.ndarray], assignment: np.ndarray, probs: np.ndarray, labels: np.ndarray,
                  groups: np.ndarray | None, disjoint: bool, random_draws: int, seed: int) -> dict:
    """What `report.json` holds about subsets of the classes of `probs` (held-out probabilities, with true
    `labels`; an array, or the sparse top-k rows): sizes; the coverage histogram (classes held by 0, 1, 2, ... subsets); the confusion capture
    next to that of random subsets of the same sizes (`random_capture`, disjoint for a partition); and,
    given ground-truth `groups`, the agreement with them (`group_agreement` of `assignment`, as from
    `single_assignment`) and the capture of the groups themselves taken as subsets, for reference."""
    num_classes = probs.shape[1]
    sizes = [len(s) for s in subsets]
    counts = coverage(subsets, num_classes)
    confusion = soft_confusion(probs, labels, num_classes)
    capture = confusion_capture(confusion, subsets)
    rand_mean, rand_std = random_capture(confusion, sizes, disjoint, random_draws, seed)
    report = {
        "num_classes": num_classes,
        "num_subsets": len(subsets),
        "sizes": sizes,
        "size_min": int(min(sizes)),
        "size_median": float(np.median(sizes)),
        "size_max": int(max(sizes)),
        "coverage_histogram": {str(k): int(n) for k, n in enumerate(np.bincount(counts))},
        "classes_covered": int((counts > 0).sum()),
        "confusion_capture": _number(capture),
        "random_capture": _number(rand_mean),
        "random_capture_std": _number(rand_std),
        "random_draws": random_draws,
    }
    if groups is not None:
        group_subsets = [np.flatnonzero(groups == g) for g in np.unique(groups)]
        report["groups"] = {
            "num_groups": len(group_subsets),
            **group_agreement(assignment, groups, subsets),
            "capture_of_groups": _number(confusion_capture(confusion, group_subsets)),  # the groups as subsets
        }
    return report


def _number(x: float) -> float | None:
    """JSON has no NaN: an undefined figure is null."""
    return None if np.isnan(x) else x
