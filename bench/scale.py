"""The pipeline at scale (15,000 classes, 61 specialists of 300; or 100,000 classes, 316 of 475): wall
time, peak memory and output size of each stage, and the ensemble's inference against the generalist's.

    python bench/scale.py [--config configs/scale15k.yaml] [--resume] [key=value ...]

Runs `ensemble stage NAME --config FILE` for each stage in order, each in a fresh process, from
scratch in bench/runs/scale/NAME. Per stage: wall seconds, the peak resident memory of the stage's own
process (getrusage; the specialists' Ray workers are separate processes, each holding the training
images and one specialist: their peak is not in it), the size of its outputs, and the RuntimeWarnings it
printed (the combiner's solver stopped by max_iter). Then `bench/inference.py`'s measurement on the
finished run (the `Combiner` against the generalist, batches of 2,048, one thread). The results file
is written after every stage; `--resume` keeps the run directory and the rows of the stages measured
before, and goes on with the next. Results: bench/results/scale_<15k|100k|default>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from common import RESULTS, timed, write_results
from inference import rates

from combiner import Combiner
from ensemble.config import load_config
from ensemble.data import load_data
from ensemble.pipeline import STAGES

ROOT = Path(__file__).resolve().parents[1]
STAGE = """
import resource, sys
from ensemble.cli import main
code = main(sys.argv[1:])
print(f"PEAK_RSS_KB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", flush=True)
sys.exit(code)
"""


def active_per_example(combiner: Combiner, x: torch.Tensor) -> float:
    """The mean number of specialists active per example of `x`."""
    return sum(len(rows) for xb in x.split(2048) for rows, _ in combiner.outputs(xb)[1]) / len(x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "scale15k.yaml")
    p.add_argument("--inference-limit", type=int, default=20480, help="test images the inference is timed on")
    p.add_argument("--resume", action="store_true", help="go on from the stages an interrupted run measured")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args()
    cfg = load_config(args.config, [f"runs_dir={ROOT / 'bench' / 'runs' / 'scale'}", *args.overrides])
    name = f"scale_{cfg.name.removeprefix('scale')}"
    meta = {"config": str(args.config.resolve().relative_to(ROOT)), "overrides": args.overrides,
            "classes": cfg.data.num_classes}
    rows = []
    if args.resume:
        if not (RESULTS / f"{name}.json").is_file():
            sys.exit(f"--resume: no {RESULTS / name}.json to go on from: run without --resume")
        before = json.loads((RESULTS / f"{name}.json").read_text())
        rows, meta = before["rows"], {**meta, **({"note": before["note"]} if "note" in before else {})}
    else:
        shutil.rmtree(cfg.run_dir, ignore_errors=True)
    for stage in STAGES[len(rows):]:
        command = [sys.executable, "-c", STAGE, "stage", stage.name, "--config", str(args.config),
                   f"runs_dir={cfg.runs_dir}", *args.overrides]
        done, timing = timed(lambda: subprocess.run(command, cwd=ROOT, capture_output=True, text=True))
        sys.stderr.write(done.stderr[-5000:])
        if done.returncode != 0:
            sys.exit(f"stage {stage.name} failed:\n{done.stdout[-3000:]}")
        peak = next(int(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("PEAK_RSS_KB"))
        outputs = sum(f.stat().st_size for f in (cfg.run_dir / stage.name).rglob("*") if f.is_file())
        rows.append({"stage": stage.name, "wall_s": round(timing.wall, 1), "peak_rss_gb": round(peak / 2**20, 2),
                     "outputs_mb": round(outputs / 2**20, 1),
                     "warnings": (done.stdout + done.stderr).count("RuntimeWarning")})
        print(f"{stage.name}: {timing.wall:.0f} s, peak {peak / 2**20:.2f} GB, {outputs / 2**20:.0f} MB", flush=True)
        write_results(name, rows, {**meta, "finished": False})
    run_bytes = sum(f.stat().st_size for f in cfg.run_dir.rglob("*") if f.is_file())
    torch.set_num_threads(1)
    x = load_data(cfg.data).x_test[:args.inference_limit]
    combiner = Combiner.from_run(cfg.run_dir)
    combiner.predict_proba(x[:2048])
    rate, caught = rates(combiner, x, 2048, 3)
    inference = {f"{name}_ex_s": round(value) for name, value in rate.items()}
    inference["active"] = round(active_per_example(combiner, x), 3)
    inference.update(ratio=round(rate["ensemble"] / rate["generalist"], 3),
                     ratio_bare=round(rate["ensemble"] / rate["bare"], 3), inference_warnings=caught)
    print(inference, flush=True)
    write_results(name, rows, {
        **meta, "total_wall_s": round(sum(r["wall_s"] for r in rows), 1), "run_dir_mb": round(run_bytes / 2**20, 1),
        "peak_rss_gb": max(r["peak_rss_gb"] for r in rows), "inference": inference})


if __name__ == "__main__":
    main()
