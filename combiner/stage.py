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
from pathlib import Path

import torch

from baselines import baseline_rows
from ensemble.config import Config
from ensemble.data import Images, load_data
from ensemble.layout import RunDir
from ensemble.metrics import conditional_top1
from ensemble.rundir import load_tensors, write_json, write_text
from ensemble.train import predict_logits_of, resolve_device
from specialists import load_specialists

from .plots import plot_table4
from .solver import active_specialists, combine

ROWS = 2048  # test examples combined at a time
LABELS = {"fixed_point": "KL combiner", "gradient": "KL combiner", "within_subset": "within-subset combiner"}


def run(run_dir: Path, cfg: Config) -> dict:
    """Run every specialist on the test set once, combine for each setting, write `eval.json`,
    `tables.md` and `table4.png`."""
    paths = RunDir(run_dir)
    data = load_data(cfg.data)
    loaded = load_specialists(run_dir, cfg)
    specialists, subsets = loaded.nets, loaded.subsets
    preds = load_tensors(paths.generalist.predictions)
    p_general, labels = preds["test_probs"].double(), preds["test_labels"]
    device = resolve_device(cfg.device)
    batch = cfg.specialists.train.eval_batch_size
    probs = [z.double().softmax(dim=1) for z in predict_logits_of(specialists, data.x_test, device=device,
                                                                  batch_size=batch)]
    classes = [torch.tensor(s) for s in subsets]

    first = cfg.combine.top_n[0]
    method, choice = cfg.combine.method, None
    if method == "auto":
        method, choice = choose_method(specialists, classes, first, preds["val_probs"].double(), preds["val_labels"],
                                       data.x_val, device, batch)
        print(f"combine.method=auto: {method} (validation top-1 "
              + ", ".join(f"{m} {v:.4f}" for m, v in choice.items()) + ")", flush=True)

    systems = {"generalist": (p_general, None)}
    label = LABELS[method]
    for n in cfg.combine.top_n:
        systems[f"{label}, top_n={n}"] = (_by_rows(
            lambda g, ps, n=n: combine(g, ps, classes, top_n=n, method=method), p_general, probs), n)
    systems[f"average, top_n={first}"] = (_by_rows(
        lambda g, ps: average_combine(g, ps, classes, first), p_general, probs), first)
    systems[f"lowest dustbin, top_n={first}"] = (_by_rows(
        lambda g, ps: lowest_dustbin_combine(g, ps, classes, first), p_general, probs), first)
    other = "fixed_point" if method == "within_subset" else "within_subset"
    systems[f"{LABELS[other]}, top_n={first}"] = (_by_rows(
        lambda g, ps: combine(g, ps, classes, top_n=first, method=other), p_general, probs), first)

    table3 = [{"system": name, "active_specialists": _mean_active(p_general, classes, n),
               "test_top1": _top1(q, labels), "conditional_top1": conditional_top1(q, labels, classes)}
              for name, (q, n) in systems.items()]
    table4 = {name: table4_rows(p_general, q, labels, classes, n)
              for name, (q, n) in systems.items() if name.startswith(label)}
    headline = table3[1]
    ensemble_right = systems[headline["system"]][0].argmax(dim=1) == labels
    rivals = {"generalist": (p_general.argmax(dim=1) == labels, table3[0]["test_top1"])}
    for row in baseline_rows(run_dir):
        pred = load_tensors(paths.baseline(row["budget"]).predictions)["test_pred"]
        rivals[f"{row['system']} ({row['epochs']} epochs)"] = (pred == labels, row["test_top1"])
    verdict = compare(ensemble_right, rivals)
    imported = cfg.generalist.checkpoint
    summary = {
        "method": method, "generalist_top1": table3[0]["test_top1"], "ensemble_top1": headline["test_top1"],
        "relative_gain": headline["test_top1"] / table3[0]["test_top1"] - 1,
        "generalist_conditional_top1": table3[0]["conditional_top1"],
        "ensemble_conditional_top1": headline["conditional_top1"], "top_n": first,
        "num_specialists": len(subsets), "verdict": verdict[-1]["call"], "verdict_rival": verdict[-1]["rival"],
        "verdict_difference": verdict[-1]["difference"], "generalist_imported": imported,
    }
    write_json(paths.evaluation, {**summary, "device": str(device), "method_choice": choice, "table3": table3,
                                   "table4": table4, "comparisons": verdict})
    text = tables_markdown(table3, table4, len(subsets)) + "\n" + verdict_markdown(verdict, imported)
    write_text(paths.tables, text)
    plot_table4(paths.stage("combiner") / "table4.png", table4)
    print(text, flush=True)
    return summary


AUTO = ("fixed_point", "within_subset")  # combine.method=auto chooses between these; a tie goes to the paper's


def choose_method(specialists: list, classes: list[torch.Tensor], top_n: int, p_general: torch.Tensor,
                  labels: torch.Tensor, x_val: Images, device: torch.device, batch: int) -> tuple[str, dict]:
    """`combine.method=auto`: of the KL and the within-subset combiners, the one with the higher top-1 on
    the validation set (`p_general`, `labels`: the generalist's there), and each one's validation top-1."""
    probs = [z.double().softmax(dim=1) for z in predict_logits_of(specialists, x_val, device=device, batch_size=batch)]
    top1 = {m: _top1(_by_rows(lambda g, ps, m=m: combine(g, ps, classes, top_n=top_n, method=m), p_general, probs),
                     labels) for m in AUTO}
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


def verdict_markdown(rows: list[dict], imported: str | None = None) -> str:
    """The comparison table and one sentence on the last row: the longest-trained baseline (equal compute);
    with the path of an `imported` generalist, a sentence on what its rivals are."""
    lines = ["Verdict: the ensemble against single networks on the same test images", "",
             "| rival | rival test top-1 | ensemble − rival | paired s.e. | ensemble right, rival wrong | "
             "ensemble wrong, rival right | ensemble |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['rival']} | {r['rival_top1']:.2%} | {r['difference']:+.2%} | {r['standard_error']:.2%} | "
              f"{r['won']} | {r['lost']} | {r['call']} |" for r in rows]
    last = rows[-1]
    if len(rows) == 1:
        advice = ("No baselines were trained (baselines.budgets is empty), so this cannot tell the specialists' "
                  "gain from more training.")
    elif last["call"] == "beats":
        advice = f"The ensemble pays: it beats the {last['rival']} by {last['difference']:+.2%} top-1."
    else:
        advice = (f"The ensemble does not pay: it {last['call']} the {last['rival']} "
                  f"({last['difference']:+.2%} top-1), a single network at the generalist's inference cost. "
                  f"Ship that network instead, or see the levers in BENCHMARKS.md.")
    if imported:
        advice += (f"\n\nThe generalist was imported from {imported}: its own training compute is unknown, so "
                   "its rivals are it trained on for the specialists' compute (specialists, or more training?).")
    return "\n".join(lines + ["", advice]) + "\n"


def table4_rows(p_general: torch.Tensor, q: torch.Tensor, labels: torch.Tensor, subsets: list[torch.Tensor],
                top_n: int) -> list[dict]:
    """By the number of active specialists covering the true class: examples, Δ correct, relative Δ."""
    active = active_specialists(p_general, subsets, top_n)  # (M, B)
    covers = torch.stack([torch.isin(labels, s) for s in subsets])  # (M, B)
    k = (active & covers).sum(dim=0)
    before = p_general.argmax(dim=1) == labels
    after = q.argmax(dim=1) == labels
    rows = []
    for value in range(int(k.max()) + 1 if len(k) else 0):
        rows_k = k == value
        if rows_k.any():
            delta = int(after[rows_k].sum()) - int(before[rows_k].sum())
            base = int(before[rows_k].sum())
            rows.append({"covering_specialists": value, "test_examples": int(rows_k.sum()), "delta_correct": delta,
                         "relative_change": delta / base if base else None})
    return rows


def _by_rows(combiner, p_general: torch.Tensor, probs: list[torch.Tensor]) -> torch.Tensor:
    """combiner(p_general, probs) on ROWS test examples at a time, kept in float32: the combiners'
    working memory is a few (C × examples) tensors, and q of 30,000 examples over 15,000 classes is
    1.8 GB in float32."""
    return torch.cat([combiner(p_general[i:i + ROWS], [p[i:i + ROWS] for p in probs]).float()
                      for i in range(0, len(p_general), ROWS)])


def expand(p_general: torch.Tensor, p_specialist: torch.Tensor, subset: torch.Tensor) -> torch.Tensor:
    """A specialist's distribution over all classes: its own on the subset, its dustbin mass spread over
    the other classes in the generalist's proportions."""
    outside = p_general.clone()
    outside[:, subset] = 0
    outside /= outside.sum(dim=1, keepdim=True).clamp_min(torch.finfo(outside.dtype).tiny)
    full = outside * p_specialist[:, -1:]
    full[:, subset] = p_specialist[:, :-1]
    return full


def average_combine(p_general: torch.Tensor, probs: list[torch.Tensor], subsets: list[torch.Tensor],
                    top_n: int) -> torch.Tensor:
    """The mean of the generalist's distribution and the active specialists' expanded ones."""
    active = active_specialists(p_general, subsets, top_n).to(p_general.dtype)
    total = p_general.clone()
    for p, s, a in zip(probs, subsets, active):
        total += a[:, None] * expand(p_general, p, s)
    return total / (1 + active.sum(dim=0))[:, None]


def lowest_dustbin_combine(p_general: torch.Tensor, probs: list[torch.Tensor], subsets: list[torch.Tensor],
                           top_n: int) -> torch.Tensor:
    """The expanded distribution of the active specialist most sure the input is one of its classes
    (lowest dustbin probability); the generalist's where no specialist is active."""
    active = active_specialists(p_general, subsets, top_n)
    dustbin = torch.stack([p[:, -1] for p in probs]).masked_fill(~active, float("inf"))  # (M, B)
    best = dustbin.argmin(dim=0)
    q = p_general.clone()
    for m, (p, s) in enumerate(zip(probs, subsets)):
        rows = (best == m) & active[m]
        q[rows] = expand(p_general[rows], p[rows], s)
    return q


def tables_markdown(table3: list[dict], table4: dict[str, list[dict]], num_specialists: int) -> str:
    lines = [f"Table 3: test top-1 and conditional top-1 ({num_specialists} specialists)", "",
             "| system | active specialists per example | conditional top-1 | test top-1 |", "|---|---|---|---|"]
    lines += [f"| {r['system']} | {r['active_specialists']:.2f} | {r['conditional_top1']:.2%} | {r['test_top1']:.2%} |"
              for r in table3]
    for name, rows in table4.items():
        lines += ["", f"Table 4 ({name}): by the number of active specialists covering the true class", "",
                  "| covering specialists | test examples | Δ correct top-1 | relative change |", "|---|---|---|---|"]
        lines += [f"| {r['covering_specialists']} | {r['test_examples']} | {r['delta_correct']:+d} | "
                  f"{_percent(r['relative_change'])} |" for r in rows]
    return "\n".join(lines) + "\n"


def _percent(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.2%}"  # None: the generalist had no correct answer to compare with


def _top1(q: torch.Tensor, labels: torch.Tensor) -> float:
    return (q.argmax(dim=1) == labels).double().mean().item()


def _mean_active(p_general: torch.Tensor, subsets: list[torch.Tensor], top_n: int | None) -> float:
    if top_n is None:
        return 0.0
    return active_specialists(p_general, subsets, top_n).sum(dim=0).double().mean().item()
