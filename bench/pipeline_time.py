"""How long `ensemble run` takes with the built-in default config, as a user runs it.

    python bench/pipeline_time.py [key=value ...]

Runs `ensemble run runs_dir=bench/runs name=time/default [key=value ...]` from scratch in a
subprocess (Ray's start-up included) and reports its wall time, each stage's from the manifest, and
the final table's test top-1. Results: bench/results/pipeline_time.{json,md}.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from common import timed, write_results

from ensemble.pipeline import STAGES
from ensemble.rundir import Manifest

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args()
    run_dir = ROOT / "bench" / "runs" / "time" / "default"
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [sys.executable, "-m", "ensemble", "run", f"runs_dir={run_dir.parent.parent}", "name=time/default",
               *args.overrides]
    _, timing = timed(lambda: subprocess.run(command, cwd=ROOT, check=True))
    manifest = Manifest(run_dir)
    summary = manifest.get("distill_back")["summary"]
    write_results("pipeline_time", [{
        "command": "ensemble run " + " ".join(args.overrides),
        "wall_min": round(timing.wall / 60, 2),
        **{f"{s.name}_min": round(manifest.get(s.name)["seconds"] / 60, 2) for s in STAGES},
        "generalist": summary["generalist_top1"],
        "ensemble": summary["ensemble_top1"],
        "student": summary["student_top1"],
    }])


if __name__ == "__main__":
    main()
