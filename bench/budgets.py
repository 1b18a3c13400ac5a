"""The baselines' budgets of finished runs under today's count of training compute, beside the budgets
their baselines stage recorded when it ran.

    python bench/budgets.py [--runs default/s0 emnist/s0 ...]

Per run in bench/runs/full (bench/full_pipeline.py made them): the specialists' compute in generalist
epochs, split into their training steps and their forward passes besides (`training_compute` less the
steps, each weighted by multiply-adds), and the `compute` and `wall_clock` budgets, recorded and
recounted. A recount whose whole epochs differ from the recorded ones means that baseline would train
for another number of epochs today. Results go to bench/results/budgets.{json,md}.
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from common import finished_run, write_results

from baselines import budgets, epoch_examples, training_compute, training_examples
from combiner import load_ensemble
from ensemble.config import load_config
from ensemble.cost import multiply_adds
from ensemble.data import load_data
from ensemble.layout import RunDir
from ensemble.rundir import read_json

ROOT = Path(__file__).resolve().parents[1]
RUNS = [f"{name}/s{seed}" for name in ("default", "emnist", "omniglot") for seed in (0, 1, 2)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", default=RUNS, help="runs in bench/runs/full")
    args = p.parse_args()
    os.chdir(ROOT)  # the configs name their data relative to the repository root
    write_results("budgets", [_row(name) for name in args.runs])


def _row(name: str) -> dict:
    run = finished_run(name)
    cfg = load_config(run / "config.yaml", [])
    data = load_data(cfg.data)
    per_epoch = epoch_examples(cfg, data)
    general, special = training_compute(run, cfg, data)
    _, examples = training_examples(run)
    ensemble = load_ensemble(run, cfg)
    generalist, nets = ensemble.generalist, ensemble.specialists
    base = multiply_adds(generalist, data.input_shape)
    steps = sum(e * multiply_adds(net, data.input_shape) / base for e, net in zip(examples, nets)) / per_epoch
    now = budgets(general, special, per_epoch)
    recorded = read_json(RunDir(run).baselines_report)["budget_epochs"]
    row = {"run": name, "specialist_steps": round(steps, 2), "specialist_forward": round(sum(special) / per_epoch - steps, 2)}
    for budget in ("compute", "wall_clock"):
        row[f"{budget}_recorded"] = round(recorded[budget], 2)
        row[f"{budget}_today"] = round(now[budget], 2)
        row[f"{budget}_epochs_change"] = math.ceil(now[budget] - 1e-9) - math.ceil(recorded[budget] - 1e-9)
    return row


if __name__ == "__main__":
    main()
