"""What keeping only the generalist's top-k predictions costs the clustering: the cluster stage's
subsets from top-k held-out predictions against those from dense ones, on finished runs.

    python bench/sparsity.py RUN_DIR [RUN_DIR ...] [--ks 4 8 16 32 64 128] [--seeds 3]
    python bench/sparsity.py --students TOP_K_RUN DENSE_RUN [...]

For each run (its generalist stage done, its config as it ran): the generalist's held-out probabilities
are computed again, dense, then kept as `generalist.top_k` would keep them for each k (`sparsify`), and
the cluster stage's steps run on each (`cluster.covariance_matrix` on the sparse rows, or `embed` above
4,096 classes, K-means, the subsets, `subset_report`), with the K-means seed 0, 1, ... --seeds - 1: the
spread over seeds is the noise a difference between k has to beat. Per row: k (dense: every class), the
confusion capture (always measured on the dense predictions, so that every k is judged on the same
confusions), its mean and standard deviation over seeds, the ARI against the planted groups where the
data has them, and the bytes the held-out predictions take. Results: bench/results/sparsity.{json,md}.

With --students: pairs of finished runs that differ only in `distill_back.top_k` (the same upstream
stages); per pair, each student's test top-1 and the difference with its paired standard error, as the
combiner stage's verdict computes it (`combiner.stage.compare`). Results: bench/results/<name>.{json,md}.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from common import write_results

import cluster
from cluster.stage import embedding_dims, resolve
from combiner.stage import compare
from ensemble.config import run_config
from ensemble.data import load_data
from ensemble.layout import RunDir
from ensemble.nets import load_net
from ensemble.predictions import sparsify
from ensemble.train import predict_logits, resolve_device


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--ks", nargs="+", type=int, default=[4, 8, 16, 32, 64, 128])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--name", default="sparsity")
    p.add_argument("--students", action="store_true", help="compare the students of pairs of runs")
    args = p.parse_args()
    if args.students:
        write_results(args.name, [students(a, b) for a, b in zip(args.runs[::2], args.runs[1::2])])
        return
    rows = []
    for run in args.runs:
        cfg = run_config(run)
        data = load_data(cfg.data)
        net = load_net(cfg.generalist.net, data.input_shape, data.num_classes, RunDir(run).generalist.weights,
                       "the generalist's weights")
        logits = predict_logits(net, data.x_val, device=resolve_device(cfg.device),
                                batch_size=cfg.generalist.train.eval_batch_size)
        labels = data.y_val.numpy()
        dense = sparsify(logits, data.y_val, None).csr(data.num_classes)
        groups = None if data.class_groups is None else data.class_groups.numpy()
        c = resolve(cfg.cluster, data.num_classes)
        for k in [None, *(k for k in args.ks if 2 * k < data.num_classes)]:
            x = dense if k is None else sparsify(logits, data.y_val, k).csr(data.num_classes)
            dims = embedding_dims(c, data.num_classes)
            matrix = (cluster.covariance_matrix(x, c.statistic, c.diagonal) if dims is None else
                      cluster.embed(cluster.covariance_operator(x, c.statistic, c.diagonal), data.num_classes, dims,
                                    cfg.seed)[0])
            captures, aris = [], []
            for seed in range(args.seeds):
                subsets, vectors, centroids = cluster.find_subsets(matrix, c, seed)
                report = cluster.subset_report(subsets, cluster.single_assignment(vectors, centroids, subsets), dense,
                                               labels, groups, c.shape == "partition", 1, seed)
                captures.append(report["confusion_capture"])
                if groups is not None:
                    aris.append(report["groups"]["ari"])
            rows.append({"run": str(run), "classes": data.num_classes, "k": "dense" if k is None else k,
                         "capture": round(captures[0], 4), "capture_mean": round(float(np.mean(captures)), 4),
                         "capture_std": round(float(np.std(captures)), 4),
                         "ari": round(aris[0], 4) if aris else None,
                         "val_mb": round(len(labels) * (12 + 8 * (data.num_classes if k is None else k)) / 2**20, 1)})
            print(rows[-1], flush=True)
    write_results(args.name, rows, {"seeds": args.seeds})


def students(top_k_run: Path, dense_run: Path) -> dict:
    """The two runs' students on the test set: top-1 of each, the difference and its paired s.e."""
    cfg = run_config(top_k_run)
    data = load_data(cfg.data)
    right = {}
    for run in (top_k_run, dense_run):
        net = load_net(cfg.distill_back.net or cfg.generalist.net, data.input_shape, data.num_classes,
                       RunDir(run).student.weights, "the student's weights")
        right[run] = predict_logits(net, data.x_test, device=resolve_device(cfg.device)).argmax(dim=1) == data.y_test
    (row,) = compare(right[top_k_run], {"dense": (right[dense_run], right[dense_run].double().mean().item())})
    return {"top_k_run": str(top_k_run), "k": run_config(top_k_run).distill_back.top_k,
            "dense_run": str(dense_run), "top_k_top1": round(right[top_k_run].double().mean().item(), 4),
            "dense_top1": round(row["rival_top1"], 4), "difference": round(row["difference"], 4),
            "paired_se": round(row["standard_error"], 4), "call": row["call"]}


if __name__ == "__main__":
    main()
