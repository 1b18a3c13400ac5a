"""What the ensemble costs at inference against its generalist: examples/s through the `Combiner` and
through the generalist alone, on the same test images, in one process.

    python bench/inference.py RUN_DIR [RUN_DIR ...] [--batch 2048 --threads 1 --repeats 5 --limit 20480]

Each RUN_DIR is a run whose specialists stage is done (its combiner as the run's config says). On the
first --limit test images (uint8) in batches of --batch, with --threads torch threads, three systems
are timed in turn, --repeats times each (median examples/s):

- `generalist`: the generalist's probabilities as the distill_back report serves and times them,
  `predict_logits(...).softmax(1)`;
- `bare`: the generalist's forward pass and float32 softmax alone, on images already in float;
- `ensemble`: `Combiner.predict_proba` (the generalist, the active specialists on their examples, the
  combiner in float64).

`ratio` = ensemble / generalist (the issue's measure: the report's), `ratio_bare` = ensemble / bare.
Also: the mean active specialists per example, the combiner's warnings (a solver stopped by max_iter),
and the multiply-adds per example of the generalist and of the ensemble (the generalist plus the
specialists active for each example, counted by `ensemble.cost`). Results:
bench/results/inference.{json,md}.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import torch
from common import write_results

from combiner import Combiner, active_specialists
from ensemble.config import run_config
from ensemble.cost import multiply_adds
from ensemble.data import load_data
from ensemble.train import predict_logits


def rates(combiner: Combiner, x: torch.Tensor, batch: int, repeats: int) -> tuple[dict[str, float], int]:
    """Median examples/s of each system, and the warnings the Combiner gave."""
    cpu = torch.device("cpu")
    floats = [x[i:i + batch].float() / 255 for i in range(0, len(x), batch)]

    def generalist() -> None:
        for i in range(0, len(x), batch):
            predict_logits(combiner.generalist, x[i:i + batch], device=cpu, batch_size=batch).softmax(dim=1)

    def bare() -> None:
        with torch.no_grad():
            for xb in floats:
                combiner.generalist(xb).softmax(dim=1)

    def ensemble() -> None:
        for i in range(0, len(x), batch):
            combiner.predict_proba(x[i:i + batch])

    systems = {"generalist": generalist, "bare": bare, "ensemble": ensemble}
    times = {name: [] for name in systems}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(repeats):
            for name, fn in systems.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: len(x) / statistics.median(t) for name, t in times.items()}, len(caught)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--limit", type=int, default=20480)
    p.add_argument("--name", default="inference")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for run in args.runs:
        cfg = run_config(run)
        x = load_data(cfg.data).x_test[:args.limit]
        combiner = Combiner.from_run(run)
        combiner.predict_proba(x[:args.batch])  # warm-up: first calls allocate
        rate, caught = rates(combiner, x, args.batch, args.repeats)
        with torch.no_grad():
            p_general = torch.cat([combiner.generalist(x[i:i + args.batch].float() / 255).double().softmax(1)
                                   for i in range(0, len(x), args.batch)])
        share = active_specialists(p_general, combiner.subsets, combiner.top_n).double().mean(dim=1)
        shape = tuple(x.shape[1:])
        base = multiply_adds(combiner.generalist, shape)
        macs = base + sum(s * multiply_adds(net, shape) for s, net in zip(share.tolist(), combiner.specialists))
        rows.append({"run": str(run), "classes": p_general.shape[1], "specialists": len(combiner.specialists),
                     "method": combiner.method, "top_n": combiner.top_n, "active": round(share.sum().item(), 2),
                     "generalist_ex_s": round(rate["generalist"]), "bare_ex_s": round(rate["bare"]),
                     "ensemble_ex_s": round(rate["ensemble"]), "ratio": round(rate["ensemble"] / rate["generalist"], 3),
                     "ratio_bare": round(rate["ensemble"] / rate["bare"], 3), "warnings": caught,
                     "generalist_macs": base, "ensemble_macs": round(macs)})
        print(rows[-1], flush=True)
    write_results(args.name, rows, {"batch": args.batch, "threads": args.threads, "repeats": args.repeats,
                                    "limit": args.limit})


if __name__ == "__main__":
    main()
