"""Train the generalist of each shipped config from scratch and report test top-1/top-5/NLL and wall time.

    python bench/generalists.py [--configs default omniglot emnist]

Each config runs in a fresh run directory under bench/runs/ (the whole `ensemble run`, data loading
included in the wall time); results go to bench/results/generalists.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from common import write_results
from ensemble.config import load_config
from ensemble.pipeline import run_pipeline

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["default", "omniglot", "emnist"])
    args = p.parse_args()
    os.chdir(ROOT)  # the configs name their data relative to the repository root
    rows = []
    for name in args.configs:
        cfg = load_config(ROOT / "configs" / f"{name}.yaml", [f"runs_dir={ROOT / 'bench' / 'runs'}"])
        shutil.rmtree(cfg.run_dir, ignore_errors=True)
        t = time.perf_counter()
        m = run_pipeline(cfg, only="generalist")["generalist"]
        rows.append({"config": name, "data": cfg.data.source if cfg.data.source != "npz" else Path(cfg.data.path).name,
                     "classes": m["num_classes"], "net": f"{cfg.generalist.net.name} w{cfg.generalist.net.width}"
                     f" d{cfg.generalist.net.depth}", "params": m["parameters"], "epochs": m["epochs"],
                     "test_top1": round(m["test_top1"], 4), "test_top5": round(m["test_top5"], 4),
                     "test_nll": round(m["test_nll"], 4), "train_s": m["train_seconds"],
                     "wall_s": round(time.perf_counter() - t, 1)})
    write_results("generalists", rows)


if __name__ == "__main__":
    main()
