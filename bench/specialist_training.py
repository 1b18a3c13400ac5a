"""The specialists stage's wall time with the `ray` backend (a local Ray cluster the run starts, one task
per CPU) against `inline` (one after another in this process, torch using every core), in one run, and
Ray's overhead: start-up, putting the generalist and the data in the object store, and the wait from
submitting the tasks to the first one starting (worker start-up, fetching the inputs).

    python bench/specialist_training.py [--config configs/omniglot.yaml] [key=value ...]

Both runs start from copies of the same run directory (generalist and cluster done, made first if
missing, under bench/runs/<name>) and train the same specialists.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from common import bench_config, write_results

from ensemble.layout import RunDir
from ensemble.pipeline import run_pipeline
from ensemble.rundir import read_json

RUNS = Path(__file__).parent / "runs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = bench_config(args.config, [*args.overrides, f"runs_dir={RUNS}"])
    for stage in ("generalist", "cluster"):
        run_pipeline(cfg, only=stage)

    rows = []
    for backend in ("inline", "ray"):
        name = f"specialists-bench/{cfg.name}-{backend}"
        copy = RUNS / name
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(cfg.run_dir, copy, ignore=shutil.ignore_patterns("specialists"))
        run_cfg = bench_config(args.config, [*args.overrides, f"runs_dir={RUNS}", f"name={name}",
                                            f"launch.backend={backend}"])
        t0 = time.perf_counter()
        summary = run_pipeline(run_cfg, only="specialists")["specialists"]
        wall = time.perf_counter() - t0
        report = read_json(RunDir(copy).specialists_report)
        launch = report["launch"]
        overhead = launch["startup_seconds"] + launch["transfer_seconds"] + launch.get("first_task_latency", 0.0)
        rows.append({
            "backend": backend, "specialists": summary["num_specialists"], "stage_seconds": round(wall, 1),
            "sum_train_seconds": summary["train_seconds"],
            "ray_startup_s": round(launch["startup_seconds"], 2), "transfer_s": round(launch["transfer_seconds"], 3),
            "first_task_latency_s": round(launch.get("first_task_latency", 0.0), 2),
            "overhead_share": round(overhead / wall, 3),
            "conditional_top1": round(summary["conditional_top1"], 4),
        })
    inline = rows[0]["stage_seconds"]
    for row in rows:
        row["speed_vs_inline"] = round(inline / row["stage_seconds"], 2)
    write_results(f"specialist_training_{cfg.name}", rows, {"config": str(args.config), "overrides": args.overrides})


if __name__ == "__main__":
    main()
