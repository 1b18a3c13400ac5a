"""Do specialists pay at equal inference cost? Branch points and branch sizes against the three rivals.

    python bench/branches.py [--config default] [--seeds 0] [--variants whole b1 b1_h64 ...] [--students]
                             [--join NAME] [--runs FOLDER] [--name branches_default] [key=value ...]

Per seed, one converged generalist (`generalist.train.epochs=auto`, `schedule=plateau`: trained until its
validation top-1 stalls three times, its best epoch kept) and its clustering, in
bench/runs/branches/CONFIG/sSEED/base (`--runs FOLDER` for CONFIG: overrides that change the generalist
need a folder of their own); per variant (VARIANTS: `specialists.branch_at` and
`specialists.head_hidden`), a copy of it in .../VARIANT that runs the specialists, the baselines (equal
training compute, equal wall clock, equal inference cost) and the combiner. A rerun resumes and skips
what is done. `--students` also runs distill_back with the student at the ensemble's inference cost
(`distill_back.net=inference`, started as the generalist widened).

Per run: test top-1 of the generalist, the ensemble and the three rivals; the ensemble's test
multiply-adds per example (the shared blocks once, the active branches) and the equal-inference-cost
net's; the training compute in generalist epochs; the ensemble minus the generalist and each rival with
its paired standard error and the call; where the generalist and that net first divided their learning rate,
and their best validation top-1. Results go to bench/results/NAME.{json,md}, and with several
seeds the mean ± standard deviation of each variant to NAME_summary.{json,md}. `--join NAME` adds the
rows of an earlier result, bench/results/NAME.json (seeds run on another day, with the same config and
overrides), to the summary.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from common import CONVERGED, RESULTS, bench_config, first_cut, mean_std, write_results

from ensemble.config import Config
from ensemble.layout import RunDir
from ensemble.pipeline import run_pipeline
from ensemble.rundir import read_json

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "whole": [],  # whole-network specialists (branch_at 0)
    "b1": ["specialists.branch_at=1"],  # share the first block (for a one-layer MLP: its features; own head)
    "b1_h64": ["specialists.branch_at=1", "specialists.head_hidden=64"],
    "b1_h256": ["specialists.branch_at=1", "specialists.head_hidden=256"],
    "b2": ["specialists.branch_at=2"],
    "b3": ["specialists.branch_at=3"],
    "b3_h64": ["specialists.branch_at=3", "specialists.head_hidden=64"],
}
RIVALS = {"compute": "equal-compute", "wall_clock": "equal-wall-clock", "inference": "equal-inference-cost"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="default")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--variants", nargs="+", default=["whole", "b1", "b1_h64"], choices=sorted(VARIANTS))
    p.add_argument("--students", action="store_true", help="also distil each ensemble into the inference-cost net")
    p.add_argument("--join", action="append", default=[], metavar="NAME",
                   help="an earlier result (bench/results/NAME.json) whose rows join the summary; repeatable")
    p.add_argument("--runs", help="the runs' folder under bench/runs/branches (default: CONFIG)")
    p.add_argument("--name", help="the results' file name (default: branches_CONFIG)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args()
    joined = [row for name in args.join for row in _earlier_rows(name, args.config, [*CONVERGED, *args.overrides])]
    os.chdir(ROOT)  # the configs name their data relative to the repository root
    rows = []
    for seed in args.seeds:
        folder = f"branches/{args.runs or args.config}/s{seed}"
        base = _config(args.config, f"{folder}/base", seed, [*CONVERGED, *args.overrides])
        for stage in ("generalist", "cluster"):
            run_pipeline(base, only=stage)
        for variant in args.variants:
            cfg = _config(args.config, f"{folder}/{variant}", seed,
                          [*CONVERGED, *args.overrides, *VARIANTS[variant],
                           *(["distill_back.net=inference", "distill_back.control=false"] if args.students else [])])
            if not cfg.run_dir.exists():
                shutil.copytree(base.run_dir, cfg.run_dir)
            for stage in ("specialists", "baselines", "combiner", *(["distill_back"] if args.students else [])):
                run_pipeline(cfg, only=stage)
            rows.append(run_row(args.config, seed, variant, cfg))
            print(f"{args.config} seed {seed} {variant}: done", file=sys.stderr, flush=True)
    name = args.name or f"branches_{args.config}"
    write_results(name, rows, {"overrides": [*CONVERGED, *args.overrides]})
    ran = {(r["seed"], r["variant"]) for r in rows}
    every = [*(r for r in joined if (r["seed"], r["variant"]) not in ran), *rows]
    if len({r["seed"] for r in every}) > 1:
        write_results(f"{name}_summary", [summary_row(v, [r for r in every if r["variant"] == v])
                                          for v in dict.fromkeys(r["variant"] for r in every)])


def _earlier_rows(name: str, config: str, overrides: list[str]) -> list[dict]:
    """The rows of bench/results/NAME.json, which must be this script's results on `config` with `overrides`."""
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        sys.exit(f"--join {name}: no file {path}")
    record = read_json(path)
    rows = record["rows"]
    if not rows or any(r.get("config") != config or "variant" not in r for r in rows):
        sys.exit(f"--join {name}: {path} holds no results of bench/branches.py --config {config}")
    if record.get("overrides") != overrides:
        sys.exit(f"--join {name}: its runs had the overrides {record.get('overrides')}, these have {overrides}")
    return rows


def _config(config: str, name: str, seed: int, overrides: list[str]):
    return bench_config(ROOT / "configs" / f"{config}.yaml",
                        [f"runs_dir={ROOT / 'bench' / 'runs'}", f"name={name}", f"seed={seed}", *overrides])


def run_row(config: str, seed: int, variant: str, cfg: Config) -> dict:
    """One run's accuracies, costs and calls."""
    paths = RunDir(cfg.run_dir)
    plateau = cfg.generalist.train.schedule == "plateau"  # the rivals train with the generalist's recipe
    evaluation = read_json(paths.evaluation)
    baselines = read_json(paths.baselines_report)
    generalist = read_json(paths.generalist.metrics)
    rivals = {r["budget"]: r for r in baselines["baselines"]}
    calls = {c["rival"].split(" generalist")[0]: c for c in evaluation["comparisons"][1:]}
    row = {
        "config": config, "seed": seed, "variant": variant,
        "generalist_epochs": f"{generalist['kept_epoch']} of {generalist['epochs']}",
        "generalist": round(100 * evaluation["generalist_top1"], 2),
        "ensemble": round(100 * evaluation["ensemble_top1"], 2),
        **{budget: round(100 * rivals[budget]["test_top1"], 2) for budget in RIVALS if budget in rivals},
        "ensemble_macs": round(evaluation["ensemble_multiply_adds"]),
        "generalist_macs": round(evaluation["generalist_multiply_adds"]),
        "inference_macs": rivals["inference"]["multiply_adds"] if "inference" in rivals else None,
        "inference_net": (f"{rivals['inference']['net']['name']} w{rivals['inference']['net']['width']} "
                          f"d{rivals['inference']['net']['depth']}") if "inference" in rivals else None,
        "training_epochs": round(baselines["budget_epochs"]["compute"], 1),
        **first_cut("generalist", paths.generalist.history, plateau),
        **(first_cut("inference", paths.baseline("inference").history, plateau) if "inference" in rivals else {}),
        "vs_generalist": _call(evaluation["comparisons"][0]),
        **{f"vs_{budget}": _call(calls.get(title)) for budget, title in RIVALS.items()},
        "verdict": evaluation["verdict"],
    }
    if paths.distill_report.is_file():
        report = read_json(paths.distill_report)
        row["student_at_inference_cost"] = round(100 * report["student_top1"], 2)
    return row


def summary_row(variant: str, runs: list[dict]) -> dict:
    """Mean ± standard deviation over the seeds of each accuracy (in %) and of the ensemble minus the
    generalist and each rival; the calls, counted."""
    row = {"variant": variant, "seeds": len(runs)}
    for key in ("generalist", "ensemble", *RIVALS, "ensemble_macs", "inference_macs"):
        values = [r[key] for r in runs if r.get(key) is not None]
        row[key] = mean_std(values, 0 if key.endswith("macs") else 2)
    for budget in ("generalist", *RIVALS):  # rows of older results may lack the comparison with the generalist
        parts = [r[f"vs_{budget}"] for r in runs if r.get(f"vs_{budget}")]
        row[f"ensemble_minus_{budget}"] = mean_std([float(p.split(" ± ")[0]) for p in parts], 2) + (
            f" ({len(parts)} of {len(runs)} seeds)" if 0 < len(parts) < len(runs) else "")
        row[f"calls_vs_{budget}"] = ", ".join(f"{c}: {sum(c in p for p in parts)}"
                                              for c in dict.fromkeys(p.split("(")[1].rstrip(")") for p in parts))
    return row


def _call(row: dict | None) -> str:
    """The ensemble minus a rival, its paired standard error and the call, in points."""
    if row is None:
        return ""
    return f"{100 * row['difference']:+.2f} ± {100 * row['standard_error']:.2f} ({row['call']})"


if __name__ == "__main__":
    main()
