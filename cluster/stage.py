"""Stage 2: the class subsets the specialists will own, from K-means on the columns of the covariance of
the generalist's held-out predictions."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch

from ensemble.config import ClusterConfig, Config, to_dict
from ensemble.data import load_data
from ensemble.layout import RunDir
from ensemble.predictions import dense_logits, prediction_matrix
from ensemble.rundir import save_tensors, write_json

from .covariance import (Matrix, centred_logits, check_predictions, covariance_matrix, covariance_operator, embed,
                         silent_rows)
from .plots import plot_coverage, plot_matrix
from .report import coverage, single_assignment, subset_report
from .subsets import class_vectors, fit_kmeans, overlapping, partition

EMBED_ABOVE, EMBED_DIMS = 4096, 256  # above this many classes, the covariance's columns in this many dimensions


def resolve(c: ClusterConfig, num_classes: int) -> ClusterConfig:
    """`c` with its automatic (None) sizes filled in for `num_classes` classes: M = round(√C) subsets;
    partition sizes from a quarter to three times the mean size C/M; overlapping subsets of 1.5 C/M
    classes (so together they hold 1.5 C class slots, as the paper's 61 × 300 held 1.2 × 15,000)."""
    m = c.num_subsets if c.num_subsets is not None else max(1, round(math.sqrt(num_classes)))
    mean = num_classes / m
    return dataclasses.replace(
        c, num_subsets=m,
        min_size=c.min_size if c.min_size is not None else math.ceil(mean / 4),
        max_size=c.max_size if c.max_size is not None else math.ceil(3 * mean),
        subset_size=c.subset_size if c.subset_size is not None else min(num_classes, math.ceil(1.5 * mean)),
    )


def check(cfg: Config) -> None:
    """The stage's settings, checked before the pipeline starts any stage."""
    c = cfg.cluster
    if c.min_size is not None and c.max_size is not None and c.min_size > c.max_size:
        raise ValueError(f"cluster.min_size {c.min_size} is above cluster.max_size {c.max_size}")
    if c.inputs == "logits" and cfg.generalist.top_k is not None:
        raise ValueError("cluster.inputs=logits needs the generalist's logits, which only dense predictions keep: "
                         "set generalist.top_k=null")


def find_subsets(matrix: np.ndarray, c: ClusterConfig, seed: int
                 ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """K-means on the class vectors of `matrix` (the C×C matrix, or its columns embedded by `embed`) and
    the subsets config `c` (sizes resolved) asks for; also returns the class vectors K-means ran on and
    the subsets' centroids."""
    vectors = class_vectors(matrix, c.normalise, c.pca_components, seed)
    centroids = fit_kmeans(vectors, c.num_subsets, c.kmeans, c.n_init, c.batch_size, seed)
    if c.shape == "partition":
        subsets, centroids = partition(vectors, centroids, c.min_size, c.max_size)
    else:
        subsets = overlapping(vectors, centroids, c.subset_size, silent_rows(matrix))
    return subsets, vectors, centroids


def embedding_dims(c: ClusterConfig, num_classes: int) -> int | None:
    """The dimensions the covariance's columns are embedded in (`cluster.embedding`; by default
    EMBED_DIMS above EMBED_ABOVE classes), or None: the C×C matrix itself."""
    if c.embedding is not None:
        return min(c.embedding, num_classes)
    return EMBED_DIMS if num_classes > EMBED_ABOVE else None


def run(run_dir: Path, cfg: Config) -> dict:
    """Read the generalist's held-out predictions; write `subsets.json` (each subset's class ids and
    names, the classes in no subset, the settings), the matrix K-means ran on (`covariance.safetensors`,
    the C×C matrix before column normalisation, or `embedding.safetensors`, its columns embedded),
    `report.json` (see `subset_report`) and two plots."""
    paths = RunDir(run_dir)
    data = load_data(cfg.data)
    num_classes = data.num_classes
    c = resolve(cfg.cluster, num_classes)
    folder = paths.generalist.prediction_folder
    probs, labels = prediction_matrix(folder, "val", num_classes)
    probs = check_predictions(probs, num_classes, "the generalist's validation predictions")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"the generalist's validation labels must be class ids in [0, {num_classes - 1}]")
    x = probs if c.inputs == "probs" else centred_logits(
        check_predictions(dense_logits(folder, "val"), num_classes, "the generalist's validation logits"))

    dims = embedding_dims(c, num_classes)
    if dims is None:
        matrix = covariance_matrix(x, c.statistic, c.diagonal)
        save_tensors(paths.cluster_covariance, {"matrix": torch.from_numpy(matrix)})
        described = f"{c.statistic} of held-out {c.inputs} (diagonal {c.diagonal})"
    else:
        matrix, eigenvalues = embed(covariance_operator(x, c.statistic, c.diagonal), num_classes, dims, cfg.seed)
        save_tensors(paths.cluster_embedding, {"columns": torch.from_numpy(matrix),
                                                "eigenvalues": torch.from_numpy(eigenvalues)})
        described = f"{c.statistic} of held-out {c.inputs} (diagonal {c.diagonal}) in {dims} dimensions"
    subsets, vectors, centroids = find_subsets(matrix, c, cfg.seed)
    assignment = single_assignment(vectors, centroids, subsets)
    groups = None if data.class_groups is None else data.class_groups.numpy()
    report = subset_report(subsets, assignment, probs, labels, groups, disjoint=c.shape == "partition",
                           random_draws=c.random_draws, seed=cfg.seed)

    settings = {**to_dict(c), "seed": cfg.seed, "embedding_dims": dims}
    counts = coverage(subsets, num_classes)
    write_json(paths.cluster_subsets, {
        "shape": c.shape,
        "num_classes": num_classes,
        "subsets": [{"id": m, "classes": s.tolist(), "names": [data.class_names[i] for i in s]}
                    for m, s in enumerate(subsets)],
        "uncovered": [int(i) for i in (counts == 0).nonzero()[0]],  # left to the generalist alone
        "settings": settings,
    })
    write_json(paths.cluster_report, {**report, "settings": settings})
    shown, block = _plotted(x, matrix, assignment, c)
    plot_matrix(paths.stage("cluster") / "covariance.png", block, assignment[shown],
                f"{described}, {len(subsets)} {c.shape} subsets"
                + ("" if len(shown) == num_classes else f" ({len(shown):,} of {num_classes:,} classes)"))
    plot_coverage(paths.stage("cluster") / "coverage.png", counts, report["sizes"])

    summary = {k: report[k] for k in ("num_subsets", "size_min", "size_median", "size_max", "classes_covered",
                                      "confusion_capture", "random_capture")}
    summary["shape"] = c.shape
    if groups is not None:
        summary.update(ari=report["groups"]["ari"], nmi=report["groups"]["nmi"])
    print(f"cluster: {len(subsets)} {c.shape} subsets of {report['size_min']} to {report['size_max']} classes, "
          f"{report['classes_covered']}/{num_classes} classes covered; confusion capture "
          f"{_fmt(report['confusion_capture'])} (random {_fmt(report['random_capture'])})", flush=True)
    return summary


PLOTTED = 1000  # the covariance plot shows at most this many classes, the first subsets' in subset order


def _plotted(x: Matrix, matrix: np.ndarray, assignment: np.ndarray, c: ClusterConfig
             ) -> tuple[np.ndarray, np.ndarray]:
    """The classes the covariance plot shows and their block of the matrix: all of them from the C×C
    `matrix`; for an embedding, the first PLOTTED classes in subset order (classes in no subset last),
    their block computed from their columns of the predictions `x` alone."""
    num_classes = len(assignment)
    if matrix.shape == (num_classes, num_classes):
        return np.arange(num_classes), matrix
    key = np.where(assignment < 0, assignment.max() + 1, assignment)
    shown = np.sort(np.argsort(key, kind="stable")[:PLOTTED])
    return shown, covariance_matrix(x[:, shown], c.statistic, c.diagonal)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
