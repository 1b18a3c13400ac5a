"""The pipeline at the paper's shape (15,000 classes, 61 specialists of 300): wall time and peak memory
of each stage.

    python bench/scale.py [--config configs/scale15k.yaml] [key=value ...]

Runs `ensemble stage NAME --config FILE` for each stage in order, each in a fresh process, from
scratch in bench/runs/scale/NAME. Per stage: wall seconds, the peak resident memory of the stage's own
process (getrusage; the specialists' Ray workers are separate processes, their peak is not in it), and
the sizes of its outputs. Results: bench/results/scale.{json,md}.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from common import timed, write_results

from ensemble.config import load_config
from ensemble.pipeline import STAGES

ROOT = Path(__file__).resolve().parents[1]
STAGE = """
import resource, sys
from ensemble.cli import main
code = main(sys.argv[1:])
print(f"PEAK_RSS_KB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", flush=True)
sys.exit(code)
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "scale15k.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args()
    cfg = load_config(args.config, [f"runs_dir={ROOT / 'bench' / 'runs' / 'scale'}", *args.overrides])
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    rows = []
    for stage in STAGES:
        command = [sys.executable, "-c", STAGE, "stage", stage.name, "--config", str(args.config),
                   f"runs_dir={cfg.runs_dir}", *args.overrides]
        done, timing = timed(lambda: subprocess.run(command, cwd=ROOT, capture_output=True, text=True))
        sys.stderr.write(done.stderr[-5000:])
        if done.returncode != 0:
            sys.exit(f"stage {stage.name} failed:\n{done.stdout[-3000:]}")
        peak = next(int(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("PEAK_RSS_KB"))
        outputs = sum(f.stat().st_size for f in (cfg.run_dir / stage.name).rglob("*") if f.is_file())
        rows.append({"stage": stage.name, "wall_s": round(timing.wall, 1), "peak_rss_gb": round(peak / 2**20, 2),
                     "outputs_mb": round(outputs / 2**20, 1)})
        print(f"{stage.name}: {timing.wall:.0f} s, peak {peak / 2**20:.2f} GB", flush=True)
    write_results("scale", rows, {"config": str(args.config.relative_to(ROOT)), "overrides": args.overrides,
                                  "classes": cfg.data.num_classes})


if __name__ == "__main__":
    main()
