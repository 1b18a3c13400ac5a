"""The whole pipeline on each shipped config and seed, as `ensemble run` runs it: every system of the
evaluation, as mean ± standard deviation over the seeds.

    python bench/full_pipeline.py [--configs default emnist omniglot] [--seeds 0 1 2] [--fresh] [--runs full]
                                  [--name full_pipeline] [key=value ...]

Each (config, seed) runs in bench/runs/RUNS/NAME/sSEED with `seed=SEED` (the data and its split stay
fixed: `data.seed`) and any extra overrides; a rerun resumes and skips the runs that are done (`--fresh`
starts them afresh). Per run: test top-1 of the generalist, the ensemble (the configured
`combine.method` at the first `combine.top_n`; and the KL and within-subset combiners there; the
generalist's epochs and the one it kept, which differ under `generalist.train.epochs=auto`), the
equal-compute and equal-wall-clock generalists (the baselines stage), the student
and the self-distilled control; the verdict of the evaluation stage; the share of the ensemble's gain
the student keeps; wall minutes per stage. Results go to bench/results/full_pipeline.{json,md} (the
summary over seeds) and full_pipeline_runs.{json,md} (every run).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from pathlib import Path

from common import bench_config, combiner_top1, write_results

from combiner import beats_generalist
from ensemble.layout import RunDir
from ensemble.pipeline import STAGES, run_pipeline
from ensemble.rundir import Manifest, read_json

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = ("generalist", "ensemble", "kl", "within_subset", "wall_clock", "compute", "student", "control")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["default", "emnist", "omniglot"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--fresh", action="store_true", help="delete the runs' folders first")
    p.add_argument("--name", default="full_pipeline", help="the results' file name")
    p.add_argument("--runs", default="full", help="the runs' folder under bench/runs (another for other overrides)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args()
    os.chdir(ROOT)  # the configs name their data relative to the repository root
    runs = []
    for name in args.configs:
        for seed in args.seeds:
            cfg = bench_config(ROOT / "configs" / f"{name}.yaml", [
                f"runs_dir={ROOT / 'bench' / 'runs'}", f"name={args.runs}/{name}/s{seed}", f"seed={seed}", *args.overrides])
            if args.fresh:
                shutil.rmtree(cfg.run_dir, ignore_errors=True)
            run_pipeline(cfg)
            runs.append(run_row(name, seed, cfg.run_dir))
            print(f"{name} seed {seed}: done", file=sys.stderr, flush=True)
    write_results(f"{args.name}_runs", runs)
    write_results(args.name, [summary_row(name, [r for r in runs if r["config"] == name]) for name in args.configs],
                  {"overrides": args.overrides})


def run_row(name: str, seed: int, run_dir: Path) -> dict:
    """One run's test top-1 per system, its verdict and its minutes per stage."""
    manifest = Manifest(run_dir)
    paths = RunDir(run_dir)
    report = read_json(paths.distill_report)
    evaluation = read_json(paths.evaluation)
    baselines = {r["budget"]: r for r in read_json(paths.baselines_report)["baselines"]}
    table3 = combiner_top1(evaluation)
    generalist = read_json(paths.generalist.metrics)
    return {
        "config": name, "seed": seed,
        "generalist_epochs": generalist["epochs"], "generalist_kept_epoch": generalist.get("kept_epoch"),
        "generalist": report["generalist_top1"], "ensemble": report["ensemble_top1"],
        "kl": table3["KL combiner"], "within_subset": table3["within-subset combiner"],
        **{budget: baselines[budget]["test_top1"] if budget in baselines else None
           for budget in ("wall_clock", "compute")},
        "student": report["student_top1"], "control": report.get("control_top1"),
        "wall_clock_epochs": baselines.get("wall_clock", {}).get("epochs"),
        "compute_epochs": baselines.get("compute", {}).get("epochs"),
        "verdict": evaluation["verdict"], "gain_kept": report["gain_kept"],
        "beats_generalist": beats_generalist(evaluation),
        **{f"{s.name}_min": round(manifest.get(s.name)["seconds"] / 60, 2) for s in STAGES},
    }


def summary_row(name: str, runs: list[dict]) -> dict:
    """Mean ± standard deviation over the seeds of each system's test top-1 (in %), the verdicts, and
    the student's kept share of the mean gain (only if every seed's ensemble beat its generalist beyond
    two paired standard errors)."""
    row = {"config": name, "seeds": len(runs)}
    for system in SYSTEMS:
        values = [100 * r[system] for r in runs if r[system] is not None]
        row[system] = _mean_std(values)
    mean = {s: statistics.fmean(r[s] for r in runs) for s in ("generalist", "ensemble", "student")}
    gain = mean["ensemble"] - mean["generalist"]
    row["relative_gain"] = f"{gain / mean['generalist']:+.2%}"
    row["student_keeps"] = (f"{(mean['student'] - mean['generalist']) / gain:.0%}" if all(r["beats_generalist"] for r in runs)
                            else "n/a (a gain within the noise)")
    row["verdicts"] = ", ".join(f"{v}: {sum(r['verdict'] == v for r in runs)}"
                                for v in dict.fromkeys(r["verdict"] for r in runs))
    row["pipeline_min"] = _mean_std([sum(v for k, v in r.items() if k.endswith("_min")) for r in runs], 1)
    return row


def _mean_std(values: list[float], digits: int = 2) -> str:
    if not values:
        return ""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {std:.{digits}f}"


if __name__ == "__main__":
    main()
