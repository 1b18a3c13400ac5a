"""The whole pipeline on each shipped config, as `ensemble run` runs it, with the same-compute baseline.

    python bench/full_pipeline.py [--configs default emnist omniglot] [key=value ...]

Each config runs from scratch in bench/runs/full/NAME with `distill_back.same_compute_baseline=true`
(and any extra overrides). Per config: test top-1 of the generalist, the ensemble (KL combiner,
top_n=1), the student and the generalist trained for as many epochs as the whole pipeline spent; the
share of the ensemble's gain the student keeps; wall minutes per stage (from the manifest) and of
the pipeline without the baseline, which `ensemble run` does not train by default. Results go to
bench/results/full_pipeline.{json,md}; each run's own table is in its distill_back/report.md.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from common import write_results
from ensemble.config import load_config
from ensemble.pipeline import STAGES, run_pipeline
from ensemble.rundir import Manifest, read_json

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["default", "emnist", "omniglot"])
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args()
    os.chdir(ROOT)  # the configs name their data relative to the repository root
    rows = []
    for name in args.configs:
        cfg = load_config(ROOT / "configs" / f"{name}.yaml", [
            f"runs_dir={ROOT / 'bench' / 'runs'}", f"name=full/{name}", "distill_back.same_compute_baseline=true",
            *args.overrides])
        shutil.rmtree(cfg.run_dir, ignore_errors=True)
        run_pipeline(cfg)
        rows.append(_row(name, cfg.run_dir))
        print(f"{name}: done", file=sys.stderr, flush=True)
    write_results("full_pipeline", rows)


def _row(name: str, run_dir: Path) -> dict:
    manifest = Manifest(run_dir)
    report = read_json(run_dir / "distill_back" / "report.json")
    systems = {r["system"]: r for r in report["systems"]}
    baseline = report["systems"][3]
    minutes = {s.name: manifest.get(s.name)["seconds"] / 60 for s in STAGES}
    return {
        "config": name,
        "generalist": systems["generalist"]["test_top1"],
        "ensemble": systems["ensemble"]["test_top1"],
        "student": systems["student"]["test_top1"],
        "same_compute": baseline["test_top1"],
        "same_compute_epochs": baseline["train_epochs"],
        "gain_kept": report["gain_kept"],
        "student_nll": systems["student"]["test_nll"],
        "generalist_nll": systems["generalist"]["test_nll"],
        "ensemble_nll": systems["ensemble"]["test_nll"],
        "ensemble_ex_s": systems["ensemble"]["examples_per_s"],
        "student_ex_s": systems["student"]["examples_per_s"],
        **{f"{stage}_min": round(m, 2) for stage, m in minutes.items()},
        "pipeline_min_without_baseline": round(sum(minutes.values()) - report["baseline_train_seconds"] / 60, 2),
    }


if __name__ == "__main__":
    main()
