"""What the student keeps under other distillation settings, on one finished run of bench/full_pipeline.py.

    python bench/distill_variants.py [--source default/s0] [--runs full] [--variants reference T4 ...]

Each variant copies bench/runs/RUNS/SOURCE without its distill_back folder into
bench/runs/distill/SOURCE/VARIANT and runs only the distill_back stage with the variant's overrides, so
every variant distils the same generalist and specialists. Per variant: test top-1 and NLL of the
student, the share of the ensemble's gain it keeps, its training examples in passes over the training
set, and its minutes; the reference and the
wide student also train the self-distilled control (the other variants skip it, to save time). Results go
to bench/results/distill_variants_SOURCE.{json,md} ("/" in SOURCE becomes "_"); the rows of variants not
named in `--variants` are kept from the file's earlier results for the same generalist and specialists.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from common import RESULTS, finished_run, merge_rows, stage_hash, write_results

from baselines import examples
from ensemble.config import load_config
from ensemble.data import load_data
from ensemble.layout import RunDir
from ensemble.pipeline import run_pipeline
from ensemble.rundir import read_json

ROOT = Path(__file__).resolve().parents[1]

INFERENCE_STUDENT = ["distill_back.net=inference", "distill_back.train.epochs=auto", "distill_back.train.schedule=plateau",
                     "distill_back.train.lr=2e-3", "distill_back.train.warmup_epochs=0.5"]
VARIANTS = {  # name: overrides of the source run's config
    "reference": [],
    "T1_alpha0.5": ["distill_back.temperature=1", "distill_back.alpha=0.5"],
    "T4": ["distill_back.temperature=4"],
    "soft_only": ["distill_back.alpha=1"],
    "scratch": ["distill_back.init=scratch", "distill_back.train.epochs=12", "distill_back.train.lr=2e-3",
                "distill_back.train.warmup_epochs=0.5"],
    "augmented_copy": ["distill_back.augmented_copies=1"],
    # the generalist's own net, trained as long as the generalist was (30 epochs) at a higher temperature
    "long_student": ["distill_back.train.epochs=30", "distill_back.temperature=4"],
    # for the default config (an MLP of 8 units): a student twice as wide, about the ensemble's inference cost
    "wide_student": ["distill_back.net={name: mlp, width: 16, depth: 1}", "distill_back.init=scratch",
                     "distill_back.train.epochs=30", "distill_back.train.lr=2e-3", "distill_back.train.warmup_epochs=0.5"],
    # issue 26: the equal-inference-cost net as the student, started as the generalist widened and trained
    # to convergence with the generalist's recipe, at three weights of the hard labels (alpha 0: none of the
    # ensemble), and at alpha 0.5 with two other temperatures
    **{f"inference_alpha{a}": [*INFERENCE_STUDENT, f"distill_back.alpha={a}"] for a in (0.9, 0.5, 0.0)},
    **{f"inference_T{t}_alpha0.5": [*INFERENCE_STUDENT, "distill_back.alpha=0.5", f"distill_back.temperature={t}"]
       for t in (1, 4)},
}
CONTROLLED = {"reference", "wide_student"}  # the variants that also train the self-distilled control


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="default/s0", help="a finished run in bench/runs/RUNS")
    p.add_argument("--runs", default="full", help="the folder of bench/runs the source is in (full: bench/full_pipeline.py's)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = p.parse_args()
    os.chdir(ROOT)  # the configs name their data relative to the repository root
    source = finished_run(args.source, args.runs)
    rows = []
    for variant in args.variants:
        run_dir = ROOT / "bench" / "runs" / "distill" / args.source / variant
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.copytree(source, run_dir, ignore=lambda folder, names: ["distill_back"] if folder == str(source) else [])
        cfg = load_config(source / "config.yaml", [
            f"runs_dir={run_dir.parent}", f"name={variant}", f"distill_back.control={variant in CONTROLLED}",
            *VARIANTS[variant]])
        summary = run_pipeline(cfg, only="distill_back")["distill_back"]
        rows.append(_row(variant, run_dir, summary, len(load_data(cfg.data).x_train)))
        print(f"{variant}: done", file=sys.stderr, flush=True)
    name = f"distill_variants_{args.source.replace('/', '_')}"
    meta = {"source": str(source.relative_to(ROOT)),
            **{stage: stage_hash(source, stage) for stage in ("generalist", "specialists")}}
    write_results(name, merge_rows(rows, RESULTS / f"{name}.json", meta, "variant", list(VARIANTS)), meta)


def _row(variant: str, run_dir: Path, summary: dict, n_train: int) -> dict:
    report = read_json(RunDir(run_dir).distill_report)
    systems = {r["system"]: r for r in report["systems"]}
    return {
        "variant": variant,
        "overrides": " ".join(o.removeprefix("distill_back.") for o in VARIANTS[variant]),
        "generalist": summary["generalist_top1"],
        "ensemble": summary["ensemble_top1"],
        "student": summary["student_top1"],
        "gain_kept": summary["gain_kept"],
        "student_nll": systems["student"]["test_nll"],
        "control": summary.get("control_top1"),
        "control_gain_kept": summary.get("control_gain_kept"),
        "student_epochs": round(examples(RunDir(run_dir).student.history) / n_train, 2),  # passes
        "student_train_min": round(summary["student_train_seconds"] / 60, 2),
    }


if __name__ == "__main__":
    main()
