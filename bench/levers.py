"""What each lever does to the ensemble, on one finished run of bench/full_pipeline.py, one lever at a time.

    python bench/levers.py [--source default/s0] [--base key=value ...] [--levers reference full_softmax ...] [--fresh]

The reference is the source run's config with the `--base` overrides; each lever adds its own to it.
Each lever copies bench/runs/full/SOURCE (without its baselines, combine and distill_back folders) into
bench/runs/levers/SOURCE/LEVER and runs the cluster, specialists and combiner stages with the lever's
overrides; a stage the lever does not touch is done already and skipped, so every lever starts from the
same generalist. The baselines are not retrained (`baselines.budgets=[]`): compare each row with the
source run's generalists trained as long as the ensemble (in the JSON's `source_rivals`), minding the
row's own specialist compute. Per lever: test top-1 of the ensemble with the KL combiner and with the
within-subset combiner (the first `combine.top_n`), each one's change against the reference, the
specialists' conditional top-1 gain, their training in passes over the training set and in compute
(generalist epochs, as the baselines stage counts it: weighted by multiply-adds, with their forward
passes besides training), and the specialists stage's wall minutes. A rerun resumes: finished levers are read back, not trained again.
Results go to bench/results/levers_SOURCE.{json,md} ("/" in SOURCE
becomes "_"); the rows of levers not named in `--levers` are kept from the file's earlier results for the
same source and base.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from common import RESULTS, combiner_top1, finished_run, merge_rows, stage_hash, write_results

from baselines import epoch_examples, training_compute, training_examples
from ensemble.config import Config, load_config
from ensemble.data import load_data
from ensemble.layout import RunDir
from ensemble.pipeline import run_pipeline
from ensemble.rundir import Manifest, read_json

ROOT = Path(__file__).resolve().parents[1]

LEVERS = {  # name: overrides of the source run's config
    "reference": [],
    "full_softmax": ["specialists.head=full"],
    "overlapping": ["cluster.shape=overlapping"],
    "frozen_trunk": ["specialists.freeze_trunk=true"],
    "epochs_x2": ["specialists.train.epochs={2e}"],
    "epochs_half": ["specialists.train.epochs={e/2}"],
    "affine_augment": ["specialists.train.augment=affine"],
    "no_correction": ["specialists.dustbin_correction=none"],
    "correction_on_validation": ["specialists.dustbin_correction=validation"],
    "skip_largest": ["specialists.skip_largest=1"],
    "wider_x2": ["specialists.width={2w}"],
    "own_head": ["specialists.head_hidden={8w}"],
    "shared_trunk": ["specialists.freeze_trunk=true", "specialists.head_hidden={8w}"],
    "overlapping_epochs_x2": ["cluster.shape=overlapping", "specialists.train.epochs={2e}"],
    "no_selection": ["specialists.select_on_validation=false"],
    "auto_combiner": ["combine.method=auto"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="default/s0", help="a run in bench/runs/full (bench/full_pipeline.py made it)")
    p.add_argument("--base", nargs="*", default=[], metavar="key=value", help="the reference's overrides")
    p.add_argument("--levers", nargs="+", default=list(LEVERS), choices=list(LEVERS))
    p.add_argument("--fresh", action="store_true", help="redo the levers whose runs exist (else they resume)")
    args = p.parse_args()
    os.chdir(ROOT)  # the configs name their data relative to the repository root
    source = finished_run(args.source)
    base = load_config(source / "config.yaml", args.base)
    sizes = {"2e": 2 * base.specialists.train.epochs, "e/2": max(1, base.specialists.train.epochs // 2),
             "2w": 2 * base.generalist.net.width, "8w": 8 * base.generalist.net.width}
    rows = []
    for lever in args.levers:
        overrides = [o.format(**sizes) for o in LEVERS[lever]]
        run_dir = ROOT / "bench" / "runs" / "levers" / args.source / lever
        if args.fresh or (run_dir.exists() and stage_hash(run_dir, "generalist") != stage_hash(source, "generalist")):
            shutil.rmtree(run_dir, ignore_errors=True)  # (a lever of another source's generalist is redone)
        if not run_dir.exists():  # else the pipeline skips the stages that are done
            shutil.copytree(source, run_dir, ignore=lambda folder, names: ["baselines", "combiner", "distill_back"]
                            if folder == str(source) else [])
        cfg = load_config(source / "config.yaml", [f"runs_dir={run_dir.parent}", f"name={lever}",
                                                   "baselines.budgets=[]", *args.base, *overrides])
        for stage in ("cluster", "specialists", "baselines", "combiner"):
            run_pipeline(cfg, only=stage)
        rows.append(_row(lever, overrides, cfg))
        print(f"{lever}: done", file=sys.stderr, flush=True)
    name = f"levers_{args.source.replace('/', '_')}"
    meta = {"source": str(source.relative_to(ROOT)), "generalist": stage_hash(source, "generalist"), "base": args.base}
    rows = merge_rows(rows, RESULTS / f"{name}.json", meta, "lever", list(LEVERS))
    reference = next((r for r in rows if r["lever"] == "reference"), None)
    for row in rows:
        for key in ("kl", "within_subset"):
            row[f"{key}_vs_reference"] = None if reference is None else row[key] - reference[key]
    evaluation = read_json(RunDir(source).evaluation)
    baselines = {r["rival"]: r["rival_top1"] for r in evaluation["comparisons"]}
    write_results(name, rows, {**meta, "source_rivals": baselines})


def _row(lever: str, overrides: list[str], cfg: Config) -> dict:
    run_dir = cfg.run_dir
    evaluation = read_json(RunDir(run_dir).evaluation)
    table3 = combiner_top1(evaluation)
    specialists = Manifest(run_dir).get("specialists")
    data = load_data(cfg.data)
    _, special = training_examples(run_dir)
    return {
        "lever": lever,
        "overrides": " ".join(o.removeprefix("specialists.") for o in overrides),
        "generalist": evaluation["generalist_top1"],
        "kl": table3["KL combiner"],
        "within_subset": table3["within-subset combiner"],
        "conditional_gain": specialists["summary"]["conditional_gain"],
        "specialists": evaluation["num_specialists"],
        "specialist_epochs": round(sum(special) / len(data.x_train), 2),
        "specialist_compute": round(sum(training_compute(run_dir, cfg, data)[1]) / epoch_examples(cfg, data), 2),
        "specialists_min": round(specialists["seconds"] / 60, 2),
    }


if __name__ == "__main__":
    main()
