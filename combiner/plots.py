"""The combiner stage's plot, drawn with matplotlib's Agg canvas (no pyplot, no display)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ensemble.rundir import save_png


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
