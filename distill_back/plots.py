"""The distill_back stage's plot, drawn with matplotlib's Agg canvas (no pyplot, no display)."""
from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from ensemble.rundir import save_png


def plot_distill_back(path: Path, rows: list[dict], history: list[dict], generalist_val_top1: float) -> None:
    """Left: test top-1 of each system. Right: the student's validation top-1 by epoch, and the
    generalist's, where the student started from or has to beat."""
    fig = Figure(figsize=(11, 4))
    bars, curve = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    top1 = [r["test_top1"] for r in rows]
    bars.barh(range(len(rows)), top1)
    bars.set_yticks(range(len(rows)), [r["system"] for r in rows], fontsize=8)
    bars.invert_yaxis()
    bars.set_xlim(max(0.0, min(top1) - 0.05), min(1.0, max(top1) + 0.02))
    for i, v in enumerate(top1):
        bars.text(v, i, f" {v:.2%}", va="center", fontsize=8)
    bars.set_xlabel("test top-1")
    curve.plot([r["epoch"] for r in history], [r["val_top1"] for r in history], marker="o", label="student")
    curve.axhline(generalist_val_top1, color="grey", ls="--", label="generalist")
    curve.set_xlabel("student epoch")
    curve.set_ylabel("validation top-1")
    curve.legend(fontsize=8)
    save_png(fig, path)
