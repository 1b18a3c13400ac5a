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
from ensemble.rundir import load_tensors, save_tensors, write_json

from .covariance import centred_logits, check_predictions, covariance_matrix
from .plots import plot_coverage, plot_matrix
from .report import coverage, single_assignment, subset_report
from .subsets import class_vectors, fit_kmeans, overlapping, partition


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


def find_subsets(matrix: np.ndarray, c: ClusterConfig, seed: int
                 ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """K-means on the columns of `matrix` and the subsets config `c` (sizes resolved) asks for; also
    returns the class vectors K-means ran on and the subsets' centroids."""
    vectors = class_vectors(matrix, c.normalise, c.pca_components, seed)
    centroids = fit_kmeans(vectors, c.num_subsets, c.kmeans, c.n_init, c.batch_size, seed)
    if c.shape == "partition":
        subsets, centroids = partition(vectors, centroids, c.min_size, c.max_size)
    else:
        subsets = overlapping(vectors, centroids, c.subset_size)
    return subsets, vectors, centroids


def run(run_dir: Path, cfg: Config) -> dict:
    """Read the generalist's held-out predictions; write `subsets.json` (each subset's class ids and
    names, the classes in no subset, the settings), `covariance.safetensors` (the C×C matrix K-means
    ran on, before column normalisation), `report.json` (see `subset_report`) and two plots."""
    paths = RunDir(run_dir)
    data = load_data(cfg.data)
    num_classes = data.num_classes
    c = resolve(cfg.cluster, num_classes)
    preds = load_tensors(paths.generalist.predictions)
    probs = check_predictions(preds["val_probs"].numpy(), num_classes, "val_probs")
    labels = preds["val_labels"].numpy()
    if labels.shape != (len(probs),) or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"val_labels must hold {len(probs)} class ids in [0, {num_classes - 1}] (one per row of "
                         f"val_probs), got shape {tuple(labels.shape)}")
    x = probs if c.inputs == "probs" else centred_logits(
        check_predictions(preds["val_logits"].numpy(), num_classes, "val_logits"))

    matrix = covariance_matrix(x, c.statistic, c.diagonal)
    subsets, vectors, centroids = find_subsets(matrix, c, cfg.seed)
    assignment = single_assignment(vectors, centroids, subsets)
    groups = None if data.class_groups is None else data.class_groups.numpy()
    report = subset_report(subsets, assignment, probs, labels, groups, disjoint=c.shape == "partition",
                           random_draws=c.random_draws, seed=cfg.seed)

    settings = {**to_dict(c), "seed": cfg.seed}
    counts = coverage(subsets, num_classes)
    save_tensors(paths.cluster_covariance, {"matrix": torch.from_numpy(matrix)})
    write_json(paths.cluster_subsets, {
        "shape": c.shape,
        "num_classes": num_classes,
        "subsets": [{"id": m, "classes": s.tolist(), "names": [data.class_names[i] for i in s]}
                    for m, s in enumerate(subsets)],
        "uncovered": [int(i) for i in (counts == 0).nonzero()[0]],  # left to the generalist alone
        "settings": settings,
    })
    write_json(paths.cluster_report, {**report, "settings": settings})
    plot_matrix(paths.stage("cluster") / "covariance.png", matrix, assignment,
                f"{c.statistic} of held-out {c.inputs} (diagonal {c.diagonal}), {len(subsets)} {c.shape} subsets")
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


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
