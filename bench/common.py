"""What every benchmark shares: the machine it ran on, and writing its JSON and markdown table."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, TypeVar

import torch

from ensemble.config import Config, load_config
from ensemble.layout import RunDir
from ensemble.rundir import Manifest

RESULTS = Path(__file__).parent / "results"
T = TypeVar("T")
# The benchmarks read EMNIST and Omniglot from the npz copies in ../shared/data/ (its README), which the
# shipped configs download through torchvision instead; relative to the repository root.
SHARED_NPZ = {"emnist": "../shared/data/emnist_byclass.npz", "omniglot": "../shared/data/omniglot28.npz"}
# A generalist trained to its plateau: until its validation top-1 stalls a third time, its best epoch kept.
CONVERGED = ["generalist.train.epochs=auto", "generalist.train.schedule=plateau"]


def bench_config(path: Path | None, overrides: list[str]) -> Config:
    """The config at `path` (None: the defaults) with `overrides`, as the benchmarks run it: EMNIST and
    Omniglot from SHARED_NPZ where the config would download them. Run from the repository root."""
    cfg = load_config(path, overrides)
    npz = SHARED_NPZ.get(cfg.data.source) if cfg.data.path is None else None
    if npz is None:
        return cfg
    return load_config(path, ["data.source=npz", f"data.path={npz}", "data.download=false", *overrides])


class Timing(NamedTuple):
    wall: float  # seconds
    cpu: float  # CPU seconds of this process, user + system, all threads


def timed(fn: Callable[[], T]) -> tuple[T, Timing]:
    """fn()'s result and how long it took."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, Timing(time.perf_counter() - wall, time.process_time() - cpu)


def finished_run(source: str, runs: str = "full") -> Path:
    """bench/runs/RUNS/SOURCE, a run whose evaluation finished (bench/full_pipeline.py's, by default);
    else exit saying which command makes it."""
    path = Path(__file__).parent / "runs" / runs / source
    if not RunDir(path).evaluation.is_file():
        maker = (f"python bench/full_pipeline.py --configs {source.split('/')[0]}" if runs == "full"
                 else f"the bench command that writes bench/runs/{runs}")
        sys.exit(f"{path} has no finished evaluation: run `{maker}`")
    return path


def stage_hash(run_dir: Path, stage: str) -> str:
    """A hash of what a run's stage wrote (its recorded output hashes): equal for runs that share it."""
    outputs = Manifest(run_dir).get(stage)["outputs"]
    return hashlib.sha256(json.dumps(outputs, sort_keys=True).encode()).hexdigest()[:16]


def merge_rows(rows: list[dict], path: Path, meta: dict, key: str, order: list[str]) -> list[dict]:
    """`rows` and, for the `key`s they lack, the rows of the earlier results at `path` if they were
    measured under the same `meta` (source run, settings); in the order of `order`. Lets a bench rerun
    some rows and keep the others."""
    earlier = json.loads(path.read_text()) if path.is_file() else {}
    done = {r[key] for r in rows}
    if all(earlier.get(k) == v for k, v in meta.items()):
        rows = rows + [r for r in earlier.get("rows", []) if r[key] not in done and r[key] in order]
    return sorted(rows, key=lambda r: order.index(r[key]))


def combiner_top1(evaluation: dict) -> dict[str, float]:
    """Test top-1 per combiner ("KL combiner", "within-subset combiner", ...) at the run's first top_n,
    from a combiner stage's eval.json."""
    return {r["system"].split(",")[0]: r["test_top1"] for r in evaluation["table3"]
            if r["system"].endswith(f"top_n={evaluation['top_n']}")}


def machine() -> dict:
    """CPU model, cores, memory, GPU, torch version: enough to tell whose numbers these are."""
    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem, 1),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "python": platform.python_version()}


def write_results(name: str, rows: list[dict], meta: dict | None = None) -> str:
    """Write bench/results/<name>.json and <name>.md; return the markdown table (also printed)."""
    RESULTS.mkdir(exist_ok=True)
    record = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
              **(meta or {}), "rows": rows}
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in rows]
    m = record["machine"]
    table = "\n".join(lines) + f"\n\n`{record['command']}` on {m['cpu']}, {m['cores']} cores, torch {m['torch']}\n"
    (RESULTS / f"{name}.md").write_text(table)
    print(table)
    return table


def first_cut(name: str, history: Path, plateau: bool) -> dict:
    """Under `schedule: plateau`, where a training first divided its learning rate by ten (the first epoch at
    the lower rate), which its validation set's noise decides; and its best validation top-1 (in %)."""
    rows = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
    cut = next((i + 1 for i in range(1, len(rows)) if rows[i]["lr"] < rows[i - 1]["lr"] / 2), None) if plateau else None
    return {f"{name}_first_cut": cut, f"{name}_best_val": round(100 * max(r["val_top1"] for r in rows), 1)}


def mean_std(values: list[float], digits: int) -> str:
    """The mean ± sample standard deviation of `values` (0 for one), at `digits` decimals; "" for none."""
    if not values:
        return ""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {std:.{digits}f}"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def tree_pss_kib(root: int) -> int:
    """The summed PSS, in KiB, of process `root` and all its descendants."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError):
            continue  # gone meanwhile
        children.setdefault(ppid, []).append(int(proc.name))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        total += next(int(line.split()[1]) for line in rollup.splitlines() if line.startswith("Pss:"))
    return total


class Sampler:
    """`tree_pss_kib(root)` every `interval` seconds in a thread; `stop` gives the highest."""

    def __init__(self, root: int, interval: float):
        self.root, self.interval = root, interval
        self.peak = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, tree_pss_kib(self.root))
            self.done.wait(self.interval)

    def stop(self) -> int:
        self.done.set()
        self.thread.join()
        return max(self.peak, tree_pss_kib(self.root))


def write_image_folder(root: Path, classes: int, train: int, test: int, sides: tuple[int, ...] = (96,),
                       formats: tuple[str, ...] = ("jpg",)) -> None:
    """An image folder root/{train,test}/c<k>/<i>.<format> of `train` and `test` images (image i of class
    i mod `classes`): noise around a colour per class, each image `sides[i % len(sides)]` pixels square,
    saved as `formats[i % len(formats)]`."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    tints = rng.integers(40, 216, (classes, 3))
    for split, n in (("train", train), ("test", test)):
        for i in range(n):
            c, side = i % classes, sides[i % len(sides)]
            folder = root / split / f"c{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = np.clip(tints[c] + rng.normal(0, 40, (side, side, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.{formats[i % len(formats)]}", quality=90)
