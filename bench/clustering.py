"""Cluster the benchmark generalists' held-out predictions, and 15,000 simulated classes.

    python bench/clustering.py [--runs glyphs omniglot emnist] [--scale-classes 15000]

Run from the repository root, after bench/generalists.py has made bench/runs/<name>:

1. each run: the cluster stage with the config stored in bench/runs/<name>/config.yaml, as a partition
   and as overlapping subsets, and where the data has ground-truth groups and the config another number
   of subsets, a partition into as many subsets as groups (automatic size bounds): how well the subsets
   recover them. The stage
   runs in a scratch copy (bench/runs/cluster-bench/), leaving the run directories as they are.
2. 15,000 simulated classes in 60 planted groups of 250 (`cluster.simulate`), one held-out example per
   class: the paper's 61 overlapping subsets of 300 classes and a 61-subset partition, with full
   K-means, MiniBatchKMeans and PCA to 128 dimensions before K-means.
3. 2,000 simulated classes in 40 groups with weak confusions (group logit 0.7 and 1.0), K-means' own
   partition (no size bounds): what PCA before K-means does to the adjusted Rand index, and what the
   columns' unit normalisation does.

For overlapping subsets, ARI and NMI compare only the classes some subset holds (`covered`), each
assigned to the subset with the nearest centroid among those holding it.

`seconds` is the wall time from the predictions to the subsets (the stage rows: the whole stage, data
loading and plots included; the simulated rows: covariance, class vectors, K-means, subsets);
`peak_mb` the peak of memory allocated through Python and numpy during it (tracemalloc).
Results: bench/results/cluster.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
import tracemalloc
from pathlib import Path

import numpy as np
from common import write_results

import cluster
from cluster.simulate import planted_predictions
from ensemble.config import ClusterConfig, load_config
from ensemble.layout import RunDir

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "bench" / "runs"
SCRATCH = RUNS / "cluster-bench"
SCALE_N_INIT = 3  # K-means restarts at 15,000 classes (each full-K-means start takes about a minute there)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", default=["glyphs", "omniglot", "emnist"])
    p.add_argument("--scale-classes", type=int, default=15000)
    args = p.parse_args()
    tracemalloc.start()
    rows, missing = [], []
    for name in args.runs:
        if RunDir(RUNS / name).generalist.prediction_folder.is_dir():
            rows += stage_rows(name)
        else:
            missing.append(name)
            print(f"bench/runs/{name} has no generalist predictions: run bench/generalists.py first; skipped")
    rows += scale_rows(args.scale_classes, group_size=250, num_subsets=61, subset_size=300)
    rows += pca_rows(2000, group_size=50)
    write_results("cluster", rows, {"missing_runs": missing, "scale_n_init": SCALE_N_INIT,
                                    "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)})


def stage_rows(name: str) -> list[dict]:
    """The cluster stage on run `name`'s predictions, with its stored config and the variants above."""
    rows, report = [], {}
    for shape in ("partition", "overlapping"):
        row, report = stage_row(name, shape, [f"cluster.shape={shape}"])
        rows.append(row)
    groups = report.get("groups", {}).get("num_groups")
    if groups and groups != report["num_subsets"] and groups < report["num_classes"]:
        rows.append(stage_row(name, f"partition, M = {groups} groups",
                              ["cluster.shape=partition", f"cluster.num_subsets={groups}",
                               "cluster.min_size=null", "cluster.max_size=null"])[0])
    return rows


def stage_row(name: str, label: str, overrides: list[str]) -> tuple[dict, dict]:
    """One run of the stage on a scratch copy of run `name`'s predictions: the table row and report.json."""
    cfg = load_config(RUNS / name / "config.yaml", overrides)
    scratch = SCRATCH / f"{name}-{label.replace(' ', '').replace(',', '-')}"
    shutil.rmtree(scratch, ignore_errors=True)
    RunDir(scratch).generalist.folder.mkdir(parents=True)  # copytree makes the predictions folder
    shutil.copytree(RunDir(RUNS / name).generalist.prediction_folder, RunDir(scratch).generalist.prediction_folder)
    seconds, peak, _ = _timed(lambda: cluster.run(scratch, cfg))
    report = json.loads(RunDir(scratch).cluster_report.read_text())
    return _row(f"{name}: {label}", cfg.cluster, report, seconds, peak), report


def scale_rows(num_classes: int, group_size: int, num_subsets: int, subset_size: int) -> list[dict]:
    """Paper-sized clustering of simulated predictions: one covariance, several K-means variants."""
    probs, labels, groups = planted_predictions(num_classes, group_size, 1, true_logit=3.0, group_logit=5.0,
                                                seed=0)
    print(f"simulated {num_classes} classes: held-out top-1 {np.mean(probs.argmax(1) == labels):.3f}", flush=True)
    cov_seconds, cov_peak, matrix = _timed(lambda: cluster.covariance_matrix(probs, "correlation", "keep"))
    rows = []
    for shape, kmeans, pca in [("overlapping", "full", None), ("overlapping", "minibatch", None),
                               ("overlapping", "full", 128), ("partition", "minibatch", None),
                               ("partition", "full", 128)]:
        c = cluster.resolve(ClusterConfig(shape=shape, num_subsets=num_subsets, subset_size=subset_size,
                                          kmeans=kmeans, pca_components=pca, n_init=SCALE_N_INIT,
                                          random_draws=3), num_classes)
        seconds, peak, (subsets, vectors, centroids) = _timed(lambda: cluster.find_subsets(matrix, c, seed=0))
        report = cluster.subset_report(subsets, cluster.single_assignment(vectors, centroids, subsets), probs,
                                       labels, groups, shape == "partition", c.random_draws, 0)
        rows.append(_row(f"simulated {num_classes}", c, report, cov_seconds + seconds, max(cov_peak, peak)))
        print(rows[-1], flush=True)
    return rows


def pca_rows(num_classes: int, group_size: int) -> list[dict]:
    """Adjusted Rand index of K-means' own partition (no size bounds, so every class is compared) against
    the planted groups, with and without PCA, at two strengths of the within-group confusion; and,
    without PCA, on the covariance with and without the columns' unit normalisation."""
    rows = []
    for group_logit, variants in [(0.7, [("correlation", "unit", p) for p in (None, 256, 64, 16)]),
                                  (1.0, [("correlation", "unit", p) for p in (None, 256, 64, 16)]
                                   + [("covariance", "unit", None), ("covariance", "none", None)])]:
        probs, labels, groups = planted_predictions(num_classes, group_size, 2, true_logit=3.0,
                                                    group_logit=group_logit, seed=1)
        for statistic, normalise, pca in variants:
            c = ClusterConfig(shape="partition", num_subsets=num_classes // group_size, min_size=1,
                              max_size=num_classes, statistic=statistic, normalise=normalise, pca_components=pca,
                              random_draws=3)
            seconds, peak, (subsets, vectors, centroids) = _timed(
                lambda: cluster.find_subsets(cluster.covariance_matrix(probs, statistic), c, seed=0))
            report = cluster.subset_report(subsets, cluster.single_assignment(vectors, centroids, subsets), probs,
                                           labels, groups, True, c.random_draws, 0)
            rows.append(_row(f"simulated {num_classes}, group logit {group_logit}: {statistic}, columns {normalise}",
                             c, report, seconds, peak))
            print(rows[-1], flush=True)
    return rows


def _row(case: str, c: ClusterConfig, report: dict, seconds: float, peak_mb: float) -> dict:
    g = report.get("groups", {})
    return {"case": case, "classes": report["num_classes"], "shape": c.shape, "kmeans": c.kmeans,
            "pca": c.pca_components, "M": report["num_subsets"],
            "sizes": f"{report['size_min']}/{report['size_median']:g}/{report['size_max']}",
            "covered": report["classes_covered"], "capture": report["confusion_capture"],
            "random": report["random_capture"], "ari": g.get("ari"), "nmi": g.get("nmi"),
            "group_pairs": g.get("group_pairs_together"),
            "groups_capture": g.get("capture_of_groups"), "seconds": round(seconds, 1), "peak_mb": round(peak_mb)}


def _timed(fn):
    """(seconds, peak MB allocated through Python and numpy while `fn` ran, its result)."""
    tracemalloc.reset_peak()
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, tracemalloc.get_traced_memory()[1] / 2**20, result


if __name__ == "__main__":
    main()
