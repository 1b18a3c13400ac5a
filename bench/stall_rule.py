"""Does a smoothed stall rule take the luck out of the plateau schedule? The generalist under each rule.

    python bench/stall_rule.py [--config omniglot] [--seeds 0 1 2] --rule NAME=key=value,key=value [--rule ...]
                               [--runs FOLDER] [--name stall_rule_CONFIG] [key=value ...]

Per rule and seed, the config's generalist trained to its plateau (`generalist.train.epochs=auto`,
`schedule=plateau`, the overrides, then the rule's own: e.g. `mean5=generalist.train.smooth_epochs=5`) in
bench/runs/stall_rule/FOLDER/NAME/sSEED (FOLDER: CONFIG by default); a rerun resumes and skips what is done.
Per run: the epochs it ran and the one it kept, the first epoch at a tenth of the learning rate (what a
noisy validation top-1 moves), its best validation top-1 and its test top-1; per rule, the mean ± standard
deviation over the seeds. Results go to bench/results/NAME.{json,md} and NAME_summary.{json,md}.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from common import CONVERGED, bench_config, first_cut, mean_std, write_results

from ensemble.layout import RunDir
from ensemble.pipeline import run_pipeline
from ensemble.rundir import read_json

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="omniglot")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--rule", action="append", required=True, metavar="NAME=key=value,...",
                   help="a rule's name and its overrides, comma-separated (NAME=: the overrides only); repeatable")
    p.add_argument("--runs", help="the runs' folder under bench/runs/stall_rule (default: CONFIG)")
    p.add_argument("--name", help="the results' file name (default: stall_rule_CONFIG)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args()
    rules = {}
    for rule in args.rule:
        name, _, keys = rule.partition("=")
        rules[name] = [k for k in keys.split(",") if k]
    os.chdir(ROOT)  # the configs name their data relative to the repository root
    rows = []
    for name, keys in rules.items():
        for seed in args.seeds:
            cfg = bench_config(ROOT / "configs" / f"{args.config}.yaml", [
                f"runs_dir={ROOT / 'bench' / 'runs'}", f"name=stall_rule/{args.runs or args.config}/{name}/s{seed}",
                f"seed={seed}", *CONVERGED, *args.overrides, *keys])
            run_pipeline(cfg, only="generalist")
            paths = RunDir(cfg.run_dir)
            metrics = read_json(paths.generalist.metrics)
            cut = first_cut("generalist", paths.generalist.history, plateau=True)
            rows.append({"rule": name, "seed": seed, "epochs_run": metrics["epochs"],
                         "kept_epoch": metrics["kept_epoch"], "first_cut": cut["generalist_first_cut"],
                         "best_val": cut["generalist_best_val"], "test_top1": round(100 * metrics["test_top1"], 2)})
    out = args.name or f"stall_rule_{args.config}"
    write_results(out, rows)
    summary = []
    for name in rules:
        runs = [r for r in rows if r["rule"] == name]
        summary.append({"rule": name, "seeds": len(runs), **{
            key: mean_std([r[key] for r in runs if r[key] is not None], 2)
            for key in ("epochs_run", "first_cut", "best_val", "test_top1")}})
    write_results(f"{out}_summary", summary)


if __name__ == "__main__":
    main()
