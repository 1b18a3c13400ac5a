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
