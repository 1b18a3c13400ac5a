"""Stage 5, `combiner`: the ensemble on the test set, in the form of the paper's Tables 3 and 4.

Table 3: test top-1 and conditional top-1 of the generalist and of generalist + specialists, for each
`combine.top_n` and for three simpler combiners of the same models. Conditional top-1 counts, for every
test example and every subset holding its true class, whether the prediction restricted to that subset
is right. Table 4: for each number k of active specialists whose subset holds the true class, the test
examples, the change in correct top-1 against the generalist, and that change relative to the
generalist's correct count.

With `combine.method=auto` the stage first chooses the combiner on the validation set (`choose_method`)
and records the choice in `eval.json` (`method`, `method_choice`).

The verdict: the ensemble's test top-1 against the generalist and the baselines stage's generalists
trained as long as the ensemble, with the paired standard error of each difference, so that nobody ships
an ensemble that does not pay.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from baselines import baseline_rows, baseline_title
from ensemble.config import Config
from ensemble.data import Images, image_batches, load_data
from ensemble.layout import RunDir
from ensemble.metrics import conditional_counts
from ensemble.rundir import load_tensors, write_json, write_text
from ensemble.train import resolve_device

from .api import Combiner, load_ensemble
from .plots import plot_table4
from .solver import Outputs, active_specialists

BLOCK_BYTES = 2**28  # the evaluation works on blocks of images whose (images × classes) float64 tensors take
#   256 MiB at most: 2,236 images at 15,000 classes, 335 at 100,000
LABELS = {"fixed_point": "KL combiner", "gradient": "KL combiner", "within_subset": "within-subset combiner"}


def run(run_dir: Path, cfg: Config) -> dict:
    """Run the ensemble on the test set, a block of images at a time (each specialist on the examples it is
    active for at the largest `combine.top_n`), combine for each setting, write `eval.json`,
    `tables.md` and `table4.png`."""
    paths = RunDir(run_dir)
    data = load_data(cfg.data)
    device = resolve_device(cfg.device)
    ensemble = load_ensemble(run_dir, cfg)
    combiner = Combiner(ensemble.generalist, ensemble.specialists, ensemble.subsets, top_n=max(cfg.combine.top_n),
                        device=device, input_shape=ensemble.input_shape, shared_blocks=ensemble.shared_blocks)
    classes, labels = combiner.subsets, data.y_test

    first = cfg.combine.top_n[0]
    method, choice = cfg.combine.method, None
    if method == "auto":
        method, choice = choose_method(combiner, first, data.x_val, data.y_val, data.num_classes)
        print(f"combine.method=auto: {method} (validation top-1 "
              + ", ".join(f"{m} {v:.4f}" for m, v in choice.items()) + ")", flush=True)

    label = LABELS[method]
    other = "fixed_point" if method == "within_subset" else "within_subset"
    systems = {"generalist": (lambda g, outputs: g, None)}
    for n in cfg.combine.top_n:
        systems[f"{label}, top_n={n}"] = (lambda g, outputs: combiner.combine(g, outputs, method), n)
    systems[f"average, top_n={first}"] = (lambda g, outputs: average_combine(g, outputs, classes), first)
    systems[f"lowest dustbin, top_n={first}"] = (lambda g, outputs: lowest_dustbin_combine(g, outputs, classes), first)
    systems[f"{LABELS[other]}, top_n={first}"] = (lambda g, outputs: combiner.combine(g, outputs, other), first)
    results = evaluate_systems(combiner, systems, data.x_test, labels, data.num_classes)

    general = results["generalist"]
    macs = {n: combiner.multiply_adds([0.0] * len(classes) if n is None else general.active[n].double().mean(1).tolist())
            for _, n in systems.values()}
    table3 = [{"system": name, "test_top1": results[name].right.double().mean().item(),
               "active_specialists": 0.0 if n is None else general.active[n].sum(0).double().mean().item(),
               "multiply_adds": macs[n],
               "conditional_top1": results[name].hits / results[name].pairs if results[name].pairs else math.nan}
              for name, (_, n) in systems.items()]
    table4 = {name: table4_rows(general.right, results[name].right, general.active[n], labels, classes)
              for name, (_, n) in systems.items() if name.startswith(label)}
    headline = table3[1]
    rivals = {"generalist": (general.right, table3[0]["test_top1"])}
    for row in baseline_rows(run_dir):
        pred = load_tensors(paths.baseline(row["budget"]).predictions)["test_pred"]
        rivals[baseline_title(row)] = (pred == labels, row["test_top1"])
    verdict = compare(results[headline["system"]].right, rivals)
    deciding = decisive(verdict)
    imported = cfg.generalist.checkpoint
    summary = {
        "method": method, "generalist_top1": table3[0]["test_top1"], "ensemble_top1": headline["test_top1"],
        "relative_gain": headline["test_top1"] / table3[0]["test_top1"] - 1,
        "generalist_conditional_top1": table3[0]["conditional_top1"],
        "ensemble_conditional_top1": headline["conditional_top1"], "top_n": first,
        "num_specialists": len(classes), "ensemble_multiply_adds": headline["multiply_adds"],
        "generalist_multiply_adds": table3[0]["multiply_adds"], "verdict": deciding["call"], "verdict_rival": deciding["rival"],
        "verdict_difference": deciding["difference"], "generalist_imported": imported,
    }
    write_json(paths.evaluation, {**summary, "device": str(device), "method_choice": choice, "table3": table3,
                                   "table4": table4, "comparisons": verdict})
    text = tables_markdown(table3, table4, len(classes)) + "\n" + verdict_markdown(verdict, imported)
    write_text(paths.tables, text)
    plot_table4(paths.stage("combiner") / "table4.png", table4)
    print(text, flush=True)
    return summary


@dataclass
class Result:
    """What the tables need of one system on a labelled set, gathered block by block: whether
    its top-1 is right per example, its conditional top-1 counts, and the active specialists (M, N) at
    each top_n the systems use."""

    right: torch.Tensor
    hits: int
    pairs: int
    active: dict[int, torch.Tensor]


System = Callable[[torch.Tensor, Outputs], torch.Tensor]


def evaluate_systems(combiner: Combiner, systems: dict[str, tuple[System, int | None]], x: Images,
                     labels: torch.Tensor, num_classes: int) -> dict[str, Result]:
    """Each system's `Result` on images `x`: the ensemble runs once per block of images (BLOCK_BYTES: the
    specialists at the combiner's top_n, the largest), and each system combines the specialists active
    at its own top_n. Nothing of size examples × classes is kept: q of 30,000 test images over 15,000
    classes would take 1.8 GB in float32 per system."""
    right = {name: [] for name in systems}
    counts = {name: [0, 0] for name in systems}
    active = {n: [] for _, n in systems.values() if n is not None}
    start = 0
    for xb in image_batches(x, max(1, BLOCK_BYTES // (8 * num_classes))):
        p_general, outputs = combiner.outputs(xb, dtype=torch.float64)  # the KL combiner among the systems
        y = labels[start:start + len(xb)].to(p_general.device)
        masks = {n: active_specialists(p_general, combiner.subsets, n) for n in active}
        for n, mask in masks.items():
            active[n].append(mask.cpu())
        for name, (system, n) in systems.items():
            q = system(p_general, outputs if n is None else only_active(outputs, masks[n]))
            right[name].append((q.argmax(dim=1) == y).cpu())
            hits, pairs = conditional_counts(q, y, combiner.subsets)
            counts[name][0] += hits
            counts[name][1] += pairs
        start += len(xb)
    stacked = {n: torch.cat(masks, dim=1) for n, masks in active.items()}
    return {name: Result(torch.cat(right[name]), *counts[name], stacked) for name in systems}


def only_active(outputs: Outputs, active: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`outputs` (each specialist's rows and probabilities) kept where `active` (M, B) holds: the
    specialists of a smaller top_n, out of those run for a larger one."""
    kept = []
    for (rows, p), mask in zip(outputs, active):
        keep = mask[rows]
        kept.append((rows[keep], p[keep]))
    return kept


AUTO = ("fixed_point", "within_subset")  # combine.method=auto chooses between these; a tie goes to the paper's


def choose_method(combiner: Combiner, top_n: int, x_val: Images, labels: torch.Tensor,
                  num_classes: int) -> tuple[str, dict]:
    """`combine.method=auto`: of the KL and the within-subset combiners, the one with the higher top-1 on
    the validation set, and each one's validation top-1."""
    systems = {m: (lambda g, outputs, m=m: combiner.combine(g, outputs, m), top_n) for m in AUTO}
    results = evaluate_systems(combiner, systems, x_val, labels, num_classes)
    top1 = {m: results[m].right.double().mean().item() for m in AUTO}
    return max(AUTO, key=top1.get), top1


def compare(right: torch.Tensor, rivals: dict[str, tuple[torch.Tensor, float]]) -> list[dict]:
    """The ensemble (per-example correctness `right`) against each rival (its correctness, its top-1) on
    the same test examples: the difference in top-1, its paired standard error
    sqrt(won + lost - (won - lost)^2 / n) / n, and the call, beyond two standard errors either way."""
    rows = []
    for name, (rival_right, rival_top1) in rivals.items():
        n = len(right)
        won, lost = int((right & ~rival_right).sum()), int((~right & rival_right).sum())
        difference = (won - lost) / n
        error = math.sqrt(max(won + lost - (won - lost) ** 2 / n, 0.0)) / n
        call = "beats" if difference > 2 * error else "loses to" if difference < -2 * error else "is level with"
        rows.append({"rival": name, "rival_top1": rival_top1, "difference": difference, "standard_error": error,
                     "won": won, "lost": lost, "call": call})
    return rows


def beats_generalist(evaluation: dict) -> bool:
    """Whether a combiner stage's `eval.json` found the ensemble better than its generalist beyond two
    paired standard errors."""
    return next(c for c in evaluation["comparisons"] if c["rival"] == "generalist")["call"] == "beats"


def decisive(rows: list[dict]) -> dict:
    """The comparison that decides the verdict (`compare`'s rows, the generalist's first): among the
    baselines (the generalist where there are none), the one the ensemble does not beat with the lowest
    difference, or where it beats them all the one it beats by least. The ensemble pays only if it beats
    every one."""
    rivals = rows[1:] or rows
    unbeaten = [r for r in rivals if r["call"] != "beats"]
    return min(unbeaten or rivals, key=lambda r: r["difference"])


def verdict_markdown(rows: list[dict], imported: str | None = None) -> str:
    """The comparison table and one sentence on the `decisive` row; with the path of an `imported`
    generalist, a sentence on what its rivals are."""
    lines = ["Verdict: the ensemble against single networks on the same test images", "",
             "| rival | rival test top-1 | ensemble − rival | paired s.e. | ensemble right, rival wrong | "
             "ensemble wrong, rival right | ensemble |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['rival']} | {r['rival_top1']:.2%} | {r['difference']:+.2%} | {r['standard_error']:.2%} | "
              f"{r['won']} | {r['lost']} | {r['call']} |" for r in rows]
    last = decisive(rows)
    if len(rows) == 1:
        advice = ("No baselines were trained (baselines.budgets is empty), so this cannot tell the specialists' "
                  "gain from more training.")
    elif last["call"] == "beats":
        advice = (f"The ensemble pays: it beats all {len(rows) - 1} single networks beyond two paired standard "
                  f"errors, the closest, the {last['rival']}, by {last['difference']:+.2%} top-1.")
    else:
        advice = (f"The ensemble does not pay: it {last['call']} the {last['rival']} "
                  f"({last['difference']:+.2%} top-1), a single network. "
                  f"Ship that network instead, or see the levers in BENCHMARKS.md.")
    if imported:
        advice += (f"\n\nThe generalist was imported from {imported}: its own training compute is unknown, so "
                   "its rivals are it trained on for the specialists' compute (specialists, or more training?).")
    return "\n".join(lines + ["", advice]) + "\n"


def table4_rows(before: torch.Tensor, after: torch.Tensor, active: torch.Tensor, labels: torch.Tensor,
                subsets: list[torch.Tensor]) -> list[dict]:
    """By the number of active specialists (`active`, (M, N)) covering the true class: examples,
    Δ correct against the generalist (right per example `before`, the ensemble `after`), relative Δ."""
    covers = torch.stack([torch.isin(labels, s.cpu()) for s in subsets])  # (M, N)
    k = (active & covers).sum(dim=0)
    rows = []
    for value in range(int(k.max()) + 1 if len(k) else 0):
        rows_k = k == value
        if rows_k.any():
            delta = int(after[rows_k].sum()) - int(before[rows_k].sum())
            base = int(before[rows_k].sum())
            rows.append({"covering_specialists": value, "test_examples": int(rows_k.sum()), "delta_correct": delta,
                         "relative_change": delta / base if base else None})
    return rows


def expand(p_general: torch.Tensor, p_specialist: torch.Tensor, subset: torch.Tensor) -> torch.Tensor:
    """A specialist's distribution over all classes: its own on the subset, its dustbin mass spread over
    the other classes in the generalist's proportions."""
    full = p_general.clone()
    full[:, subset] = 0
    full *= p_specialist[:, -1:] / full.sum(dim=1, keepdim=True).clamp_min(torch.finfo(full.dtype).tiny)
    full[:, subset] = p_specialist[:, :-1]
    return full


def average_combine(p_general: torch.Tensor, outputs: Outputs, subsets: list[torch.Tensor]) -> torch.Tensor:
    """The mean of the generalist's distribution and the active specialists' expanded ones."""
    total, count = p_general.clone(), torch.ones(len(p_general), dtype=p_general.dtype, device=p_general.device)
    for (rows, p), s in zip(outputs, subsets):
        total[rows] += expand(p_general[rows], p, s)
        count[rows] += 1
    return total.div_(count[:, None])


def lowest_dustbin_combine(p_general: torch.Tensor, outputs: Outputs, subsets: list[torch.Tensor]) -> torch.Tensor:
    """The expanded distribution of the active specialist most sure the input is one of its classes
    (lowest dustbin probability); the generalist's where no specialist is active."""
    dustbin = torch.full((len(outputs), len(p_general)), float("inf"), dtype=p_general.dtype, device=p_general.device)
    for m, (rows, p) in enumerate(outputs):
        dustbin[m, rows] = p[:, -1]
    best = dustbin.argmin(dim=0)
    q = p_general.clone()
    for m, ((rows, p), s) in enumerate(zip(outputs, subsets)):
        mine = best[rows] == m
        q[rows[mine]] = expand(p_general[rows[mine]], p[mine], s)
    return q


def tables_markdown(table3: list[dict], table4: dict[str, list[dict]], num_specialists: int) -> str:
    lines = [f"Table 3: test top-1 and conditional top-1 ({num_specialists} specialists)", "",
             "| system | active specialists per example | multiply-adds per example | conditional top-1 | test top-1 |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['system']} | {r['active_specialists']:.2f} | {r['multiply_adds']:,.0f} | {r['conditional_top1']:.2%} | "
              f"{r['test_top1']:.2%} |" for r in table3]
    for name, rows in table4.items():
        lines += ["", f"Table 4 ({name}): by the number of active specialists covering the true class", "",
                  "| covering specialists | test examples | Δ correct top-1 | relative change |", "|---|---|---|---|"]
        lines += [f"| {r['covering_specialists']} | {r['test_examples']} | {r['delta_correct']:+d} | "
                  f"{_percent(r['relative_change'])} |" for r in rows]
    return "\n".join(lines) + "\n"


def _percent(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.2%}"  # None: the generalist had no correct answer to compare with
