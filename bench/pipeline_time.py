"""How long `ensemble run` takes with the built-in default config, as a user runs it from a fresh clone.

    python bench/pipeline_time.py [key=value ...]

Runs `ensemble run runs_dir=bench/runs name=time/default [key=value ...]` from scratch in a
subprocess, with an empty data cache (so generating the data counts, as on a user's first run) and
Ray's start-up included, and reports its wall time, each stage's from the manifest, and the test top-1
of the generalist, the ensemble, the three baselines and the student. Results:
bench/results/pipeline_time.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
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
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "ENSEMBLE_CACHE": cache}
        _, timing = timed(lambda: subprocess.run(command, cwd=ROOT, check=True, env=env))
    manifest = Manifest(run_dir)
    summary = manifest.get("distill_back")["summary"]
    baselines = manifest.get("baselines")["summary"]
    write_results("pipeline_time", [{
        "command": "ensemble run " + " ".join(args.overrides),
        "wall_min": round(timing.wall / 60, 2),
        **{f"{s.name}_min": round(manifest.get(s.name)["seconds"] / 60, 2) for s in STAGES},
        "generalist": summary["generalist_top1"],
        "ensemble": summary["ensemble_top1"],
        "equal_wall_clock": baselines.get("wall_clock_top1"),
        "equal_compute": baselines.get("compute_top1"),
        "equal_inference": baselines.get("inference_top1"),
        "verdict": manifest.get("combiner")["summary"]["verdict"],
        "student": summary["student_top1"],
    }])


if __name__ == "__main__":
    main()
