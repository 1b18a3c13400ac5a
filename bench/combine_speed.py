"""The combiner's two solvers at the paper's scale: EM fixed point against gradient descent on logits.

    python bench/combine_speed.py [--classes 15000 --specialists 61 --subset-size 300 --batch 1024
                                   --dtypes float64 float32 --top-n 1 none --gradient-budget 300]

Run from the repository root. Synthetic inputs (`synthetic_batch`): each example has a true class whose
generalist logit is raised by 12; the generalist's logits are 2·N(0, 1) plus that peak, a specialist's
are the generalist's on its subset plus 0.5·N(0, 1) noise (and +1 on the true class), its dustbin logit
the log of the generalist's mass outside the subset plus noise. Subsets: random, overlapping.

For each solver dtype and top_n (1: the paper's; none: every specialist active), every time both as
wall seconds (`_s`) and as the process's CPU seconds, user + system (`_cpu`): on a shared machine
the CPU time is the steadier of the two, and page faults count in it.

- `read_ex_s`: the bandwidth bound, examples/s at which the machine merely reads the inputs once
  (p_general.sum() and every specialist tensor's .sum()); `fp_of_bound`: fixed_point's rate as a
  fraction of it.
- `fp_s`, `fp_ex_s`: one `combine(..., method="fixed_point")` with its defaults; `fp_setup_s`: the
  same call with max_iter=0 (checks, gathers, layout): what is not iterations.
- `fp_gap`: fixed_point's objective against a float64 fixed point run to tol 1e-12, worst example.
- `grad_iters`, `grad_s`: gradient with max_iter = 25, 50, 100, ... (tol=0, so it runs them all)
  until its objective is within 1e-6 relative of fixed_point's on every example with an active
  specialist (`reached`), or until doubling the iterations no longer halves the gap twice running
  (stalled: in float32 the objective's rounding exceeds 1e-6 of a small objective, so only float64
  rows can settle a 1e-6 race), or until --gradient-budget wall seconds are spent: the last run
  then takes as many iterations as the rest of the budget allows at the rate measured so far.
  The time is that last run's; `grad_gap`: the worst example's relative gap it reached.
  `speedup` = grad_cpu / fp_cpu. When reached, the run before it (half the iterations) had not got
  there, so the time to reach the target lies between that run's and the last: `speedup_low` is
  that earlier run's CPU time / fp_cpu. When not reached, speedup_low = speedup, a lower bound.
- `fp_peak_mb`, `grad_peak_mb`: the process's peak resident memory during the call, above its
  resident memory before it (Linux VmHWM, reset through /proc/self/clear_refs): the working memory
  the call touched that was not already resident (at small sizes the allocator reuses resident
  memory and this reads low). The inputs' bytes are in the JSON's meta.
- Times are the best of --repeats calls (fewer once the calls have taken 20 s).

Objectives are evaluated in float64 whatever dtype the solvers run in. Results:
bench/results/combine_speed.{json,md}.
"""
from __future__ import annotations

import argparse
import gc
import re
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from common import Timing, timed, write_results

from combiner import combine, objective

TARGET = 1e-6  # the gradient method must come this close (relative) to fixed_point's objective
BEST_OF_BUDGET = 20.0  # seconds: stop repeating a timed call once its runs have taken this long


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=15000)
    p.add_argument("--specialists", type=int, default=61)
    p.add_argument("--subset-size", type=int, default=300)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--dtypes", nargs="+", choices=["float64", "float32"], default=["float64", "float32"])
    p.add_argument("--top-n", nargs="+", default=["1", "none"], help="integers, or none for all active")
    p.add_argument("--gradient-budget", type=float, default=300.0, help="seconds of gradient runs per row")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    p_general, probs, subsets = synthetic_batch(args.batch, args.classes, args.specialists, args.subset_size)
    exact = (p_general, probs, subsets)
    top_ns = [None if t.lower() == "none" else int(t) for t in args.top_n]
    references = {top_n: objective(*exact, combine(*exact, top_n=top_n, tol=1e-12, max_iter=100_000), top_n=top_n)
                  for top_n in top_ns}
    rows = []
    for dtype in args.dtypes:
        inputs = (p_general.to(getattr(torch, dtype)), [q.to(getattr(torch, dtype)) for q in probs], subsets)
        for top_n in top_ns:
            print(f"{dtype}, top_n={top_n}", flush=True)
            rows.append({"dtype": dtype, **measure(inputs, exact, references[top_n], top_n,
                                                   args.gradient_budget, args.repeats)})
    write_results("combine_speed", rows, {
        "classes": args.classes, "specialists": args.specialists, "subset_size": args.subset_size,
        "batch": args.batch, "target_relative_gap": TARGET,
        "gradient_budget_s": args.gradient_budget, "repeats": args.repeats, "seed": args.seed,
        "input_mb": {dtype: (p_general.numel() + sum(q.numel() for q in probs)) * getattr(torch, dtype).itemsize
                     / 2**20 for dtype in args.dtypes},
        "memory": "peak resident memory during the call above resident memory before it (VmHWM after "
                  "resetting it through /proc/self/clear_refs)"})


def synthetic_batch(batch: int, classes: int, specialists: int, size: int
                    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """float64 generalist and specialists' probabilities (dustbin last) as the module docstring says."""
    true = torch.randint(classes, (batch,))
    logits = 2 * torch.randn(batch, classes, dtype=torch.float64)
    logits[torch.arange(batch), true] += 12
    subsets = [torch.randperm(classes)[:size] for _ in range(specialists)]
    mass = logits.exp()
    total = mass.sum(1)
    probs = []
    for s in subsets:
        inside = logits[:, s] + 0.5 * torch.randn(batch, size, dtype=torch.float64)
        inside += (s[None, :] == true[:, None]).double()
        dustbin = torch.log(total - mass[:, s].sum(1)) + 0.5 * torch.randn(batch, dtype=torch.float64)
        probs.append(torch.softmax(torch.cat([inside, dustbin[:, None]], 1), 1))
    return torch.softmax(logits, 1), probs, subsets


def measure(inputs: tuple, exact: tuple, reference: torch.Tensor, top_n: int | None, budget: float,
            repeats: int) -> dict:
    """One row: the bandwidth bound, fixed_point and gradient on `inputs` (solver dtype), objectives
    on `exact` (float64), `reference` the float64 fixed point's objective."""
    p_general, probs, subsets = inputs
    batch = len(p_general)
    active = active_mask(p_general, subsets, top_n)
    read = best_time(lambda: [p_general.sum(), *(q.sum() for q in probs)], repeats + 7)
    fp = best_time(lambda: combine(*inputs, top_n=top_n), repeats)
    with warnings.catch_warnings(action="ignore", category=RuntimeWarning):  # max_iter=0 does not converge
        setup = best_time(lambda: combine(*inputs, top_n=top_n, max_iter=0), repeats)
    q_fp, fp_peak = peak_mb(lambda: combine(*inputs, top_n=top_n))
    f_fp = evaluate(exact, q_fp, top_n)
    grad = gradient_until_target(inputs, exact, top_n, f_fp, active, budget)
    print(f"  fixed_point {fp.wall:.2f} s ({fp.cpu:.2f} CPU s); gradient {grad['iters']} iterations "
          f"{grad['wall']:.1f} s ({grad['cpu']:.1f} CPU s), gap {grad['gap']:.2e}", flush=True)
    return {
        "top_n": "none" if top_n is None else top_n,
        "mean_active": round(active.sum(1).double().mean().item(), 2),
        "no_active": round((~active.any(1)).double().mean().item(), 3),
        "read_ex_s": batch / read.wall,
        "fp_setup_s": setup.wall,
        "fp_s": fp.wall,
        "fp_cpu": fp.cpu,
        "fp_ex_s": batch / fp.wall,
        "fp_of_bound": read.wall / fp.wall,
        "fp_gap": relative_gap(f_fp, reference, active),
        "grad_iters": grad["iters"],
        "grad_s": grad["wall"],
        "grad_cpu": grad["cpu"],
        "grad_ex_s": batch / grad["wall"],
        "grad_gap": grad["gap"],
        "reached": grad["gap"] <= TARGET,
        "speedup_low": grad["cpu_before"] / fp.cpu,
        "speedup": grad["cpu"] / fp.cpu,
        "fp_peak_mb": fp_peak,
        "grad_peak_mb": grad["peak_mb"],
    }


def gradient_until_target(inputs: tuple, exact: tuple, top_n: int | None, f_fp: torch.Tensor,
                          active: torch.Tensor, budget: float) -> dict:
    """Gradient runs of 25, 50, 100, ... iterations until one is within TARGET of fixed_point's
    objective on every active example, the gap stalls, or the budget is spent (see the module doc)."""
    iters, spent, gaps, before = 25, 0.0, [], None
    while True:
        (q, peak), timing = timed(partial(peak_mb, partial(combine, *inputs, top_n=top_n, method="gradient",
                                                             max_iter=iters, tol=0)))
        spent += timing.wall
        gaps.append(relative_gap(evaluate(exact, q, top_n), f_fp, active))
        print(f"  gradient {iters} iterations: {timing.wall:.1f} s ({timing.cpu:.1f} CPU s), "
              f"gap {gaps[-1]:.2e}", flush=True)
        stalled = len(gaps) >= 3 and gaps[-1] > gaps[-2] / 2 and gaps[-2] > gaps[-3] / 2
        affordable = int((budget - spent) / timing.wall * iters)  # iterations the rest of the budget buys
        if gaps[-1] <= TARGET or stalled or affordable <= iters:
            cpu_before = before.cpu if gaps[-1] <= TARGET and before else timing.cpu
            return {"iters": iters, "wall": timing.wall, "cpu": timing.cpu, "cpu_before": cpu_before,
                    "gap": gaps[-1], "peak_mb": peak}
        iters, before = min(2 * iters, affordable), timing


def active_mask(p_general: torch.Tensor, subsets: list[torch.Tensor], top_n: int | None) -> torch.Tensor:
    """(B, M) whether each specialist is active: its subset holds one of the top_n classes."""
    if top_n is None:
        return torch.ones(len(p_general), len(subsets), dtype=torch.bool)
    member = torch.zeros(p_general.shape[1], len(subsets), dtype=torch.bool)
    for m, s in enumerate(subsets):
        member[s, m] = True
    return member[p_general.topk(top_n, dim=1).indices].any(1)


def evaluate(exact: tuple, q: torch.Tensor, top_n: int | None) -> torch.Tensor:
    """The objective in float64 at q (renormalised: a float32 q sums to 1 only within rounding)."""
    q = q.double()
    return objective(*exact, q / q.sum(1, keepdim=True), top_n=top_n)


def relative_gap(f: torch.Tensor, reference: torch.Tensor, active: torch.Tensor) -> float:
    """max over examples with an active specialist of (f - reference)/reference; the others keep
    q = p^g and an objective of 0 (up to rounding) under either solver."""
    rows = active.any(1)
    return ((f[rows] - reference[rows]) / reference[rows]).max().item() if rows.any() else 0.0


def best_time(fn: Callable[[], object], repeats: int) -> Timing:
    """The shortest wall and CPU times of fn() over `repeats` calls, or over as many as fit in
    BEST_OF_BUDGET wall seconds (at least one)."""
    times: list[Timing] = []
    while len(times) < repeats and sum(t.wall for t in times) < BEST_OF_BUDGET:
        times.append(timed(fn)[1])
    return Timing(min(t.wall for t in times), min(t.cpu for t in times))


def peak_mb(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    """fn()'s result, and the MiB of resident memory it took at its peak above the resident memory
    before it."""
    gc.collect()
    status = Path("/proc/self/status")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    before = _status_kib(status.read_text(), "VmRSS")
    result = fn()
    return result, (_status_kib(status.read_text(), "VmHWM") - before) / 1024


def _status_kib(text: str, key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", text).group(1))


if __name__ == "__main__":
    main()
