"""The specialists stage's plot, drawn with matplotlib's Agg canvas (no pyplot, no display)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ensemble.rundir import save_png


def plot_specialists(path: Path, rows: list[dict]) -> None:
    """Left: each specialist's conditional top-1 against the generalist's on the same subset. Right: when
    each specialist trained, one line per worker process (the parallelism the launcher achieved)."""
    fig = Figure(figsize=(12, 4.5))
    acc, timeline = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    x = np.arange(len(rows))
    acc.bar(x - 0.2, [r["generalist_conditional_top1"] for r in rows], 0.4, label="generalist")
    acc.bar(x + 0.2, [r["conditional_top1"] for r in rows], 0.4, label="specialist")
    low = min(min(r["generalist_conditional_top1"], r["conditional_top1"]) for r in rows)
    acc.set_ylim(max(0.0, low - 0.05), 1.0)
    acc.set_xticks(x, [r["specialist"] + (" (start)" if r["kept"] == "start" else "") for r in rows],
                   rotation=90, fontsize=7)  # "(start)": training did not pay on validation; kept its start
    acc.set_ylabel("conditional top-1 on the subset's test examples")
    acc.legend(loc="upper center", bbox_to_anchor=(0.5, 1.1), ncol=2, fontsize=8)

    t0 = min(r["started"] for r in rows)
    workers = sorted({(r["host"], r["pid"]) for r in rows})
    lane = {w: i for i, w in enumerate(workers)}
    for r in rows:
        timeline.barh(lane[(r["host"], r["pid"])], r["finished"] - r["started"], left=r["started"] - t0,
                      height=0.6, edgecolor="black", linewidth=0.5)
    timeline.set_yticks(range(len(workers)), [f"{h} pid {p}" for h, p in workers], fontsize=7)
    timeline.set_xlabel("seconds since the first specialist started (last attempt of each)")
    timeline.set_title("training timeline per worker")
    save_png(fig, path)


def plot_table4(path: Path, table4: dict[str, list[dict]]) -> None:
    """The paper's Table 4 as bars: relative change in correct top-1 against the generalist, by the number
    of active specialists covering the true class, one bar group per combiner setting; the number of
    test examples is written over each bar."""
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    width = 0.8 / max(1, len(table4))
    for i, (name, rows) in enumerate(table4.items()):
        x = np.array([r["covering_specialists"] for r in rows]) + (i - (len(table4) - 1) / 2) * width
        y = [100 * (r["relative_change"] or 0) for r in rows]
        bars = ax.bar(x, y, width, label=name)
        for bar, r in zip(bars, rows):
            ax.annotate(str(r["test_examples"]), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(sorted({r["covering_specialists"] for rows in table4.values() for r in rows}))
    ax.set_xlabel("active specialists covering the true class (bar labels: test examples; no bar where "
                  "the generalist had none right)", fontsize=8)
    ax.set_ylabel("relative change in correct top-1 (%)")
    ax.set_title("Table 4: where the specialists change the generalist's answers")
    ax.legend(fontsize=8)
    save_png(fig, path)
