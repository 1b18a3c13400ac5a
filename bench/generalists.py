"""Train the generalist of each shipped config from scratch and report test top-1/top-5/NLL and wall time.

    python bench/generalists.py [--configs glyphs omniglot emnist] [--widths 8 16 64] [--name generalists]

Each config (at each of `--widths`, if given: is its generalist short of capacity?) runs in a fresh run
directory under bench/runs/ (the whole `ensemble run`, data loading included in the wall time); results
go to bench/results/NAME.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

from common import bench_config, write_results
from ensemble.pipeline import run_pipeline

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["glyphs", "omniglot", "emnist"])
    p.add_argument("--widths", nargs="+", type=int, help="the generalist's net at these widths instead of the config's")
    p.add_argument("--name", default="generalists", help="the results' file name")
    args = p.parse_args()
    os.chdir(ROOT)  # the configs name their data relative to the repository root
    rows = []
    for name, width in [(n, w) for n in args.configs for w in (args.widths or [None])]:
        overrides = [f"runs_dir={ROOT / 'bench' / 'runs'}"]
        if width is not None:
            overrides += [f"generalist.net.width={width}", f"name={name}-w{width}"]
        cfg = bench_config(ROOT / "configs" / f"{name}.yaml", overrides)
        shutil.rmtree(cfg.run_dir, ignore_errors=True)
        t = time.perf_counter()
        m = run_pipeline(cfg, only="generalist")["generalist"]
        rows.append({"config": name, "data": cfg.data.source if cfg.data.source != "npz" else Path(cfg.data.path).name,
                     "classes": m["num_classes"], "net": f"{cfg.generalist.net.name} w{cfg.generalist.net.width}"
                     f" d{cfg.generalist.net.depth}", "params": m["parameters"], "epochs": m["epochs"],
                     "test_top1": round(m["test_top1"], 4), "test_top5": round(m["test_top5"], 4),
                     "test_nll": round(m["test_nll"], 4), "train_s": m["train_seconds"],
                     "wall_s": round(time.perf_counter() - t, 1)})
    write_results(args.name, rows)


if __name__ == "__main__":
    main()
