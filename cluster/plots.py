"""PNG plots of the cluster stage, drawn with matplotlib's Agg canvas (no pyplot, no display)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from ensemble.rundir import save_png


def plot_matrix(path: Path, matrix: np.ndarray, assignment: np.ndarray, title: str) -> None:
    """The C×C matrix with the classes reordered by subset (`assignment`, as from `single_assignment`;
    classes in no subset last) and each subset's block outlined. The colour scale is clipped at the
    99.9th percentile of the off-diagonal magnitudes, so a kept diagonal does not wash out the rest."""
    num_classes = len(matrix)
    key = np.where(assignment < 0, assignment.max() + 1, assignment)
    order = np.argsort(key, kind="stable")
    off_diagonal = np.abs(matrix[~np.eye(num_classes, dtype=bool)])
    vmax = float(np.percentile(off_diagonal, 99.9)) or 1.0
    fig = Figure(figsize=(7.5, 6.5))
    ax = fig.subplots()
    image = ax.imshow(matrix[np.ix_(order, order)], cmap="RdBu_r", vmin=-vmax, vmax=vmax)
    fig.colorbar(image, ax=ax, shrink=0.8)
    start = 0
    for m in range(int(assignment.max()) + 1):
        size = int((assignment == m).sum())
        ax.add_patch(Rectangle((start - 0.5, start - 0.5), size, size, fill=False, edgecolor="black", linewidth=0.8))
        start += size
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("class (ordered by subset)")
    ax.set_ylabel("class (ordered by subset)")
    save_png(fig, path, dpi=120)


def plot_coverage(path: Path, counts: np.ndarray, sizes: list[int]) -> None:
    """Left: how many classes are held by 0, 1, 2, ... subsets. Right: the subsets' sizes, largest first."""
    fig = Figure(figsize=(10, 4))
    left, right = fig.subplots(1, 2)
    histogram = np.bincount(counts)
    left.bar(np.arange(len(histogram)), histogram, color="tab:blue")
    left.set_xticks(np.arange(len(histogram)))
    left.set_xlabel("subsets holding the class")
    left.set_ylabel("classes")
    left.set_title(f"coverage: {int((counts == 0).sum())} of {len(counts)} classes in no subset", fontsize=10)
    right.bar(np.arange(len(sizes)), sorted(sizes, reverse=True), color="tab:orange")
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_xlabel("subset (largest first)")
    right.set_ylabel("classes")
    right.set_title(f"{len(sizes)} subsets, sizes {min(sizes)} to {max(sizes)}", fontsize=10)
    save_png(fig, path, dpi=120)

