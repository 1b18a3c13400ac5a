"""What keeping only the generalist's top-k predictions costs the clustering: the cluster stage's
subsets from top-k held-out predictions against those from dense ones, on finished runs.

    python bench/sparsity.py RUN_DIR [RUN_DIR ...] [--ks 4 8 16 32 64 128] [--seeds 3]

For each run (its generalist stage done, its config as it ran): the generalist's held-out probabilities
are computed again, dense, then kept as `generalist.top_k` would keep them for each k (`sparsify`), and
the cluster stage's steps run on each (`cluster.covariance_matrix` on the sparse rows, or `embed` above
4,096 classes, K-means, the subsets, `subset_report`), with the K-means seed 0, 1, ... --seeds - 1: the
spread over seeds is the noise a difference between k has to beat. Per row: k (dense: every class), the
confusion capture (always measured on the dense predictions, so that every k is judged on the same
confusions), its mean and standard deviation over seeds, the ARI against the planted groups where the
data has them, and the bytes the held-out predictions take. Results: bench/results/sparsity.{json,md}.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from common import write_results

import cluster
from cluster.stage import embedding_dims, resolve
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
    args = p.parse_args()
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


if __name__ == "__main__":
    main()
