"""Peak memory of Ray tasks that hold the same in-memory data set on one node, with the launcher's
sharing of a dataclass's tensors (`ensemble.launch.to_shared`: numpy arrays that the tasks read in
place from the node's object store) off and on.

    python bench/shared_memory.py [--mib 400] [--tasks 2] [--hold 5] [--interval 0.2]

For each setting, on a local Ray cluster of its own (started as `ensemble run` starts one, a CPU per
core): a dataclass like `ensemble.data.Data` holding --mib MiB of uint8 28×28 images as a torch tensor
and their int64 labels goes to `run_tasks` as a shared input, with --tasks toy tasks of one CPU each.
Each task reads every image (their sum, checked against the driver's), waits until all tasks have, and
holds the data --hold seconds more: the tasks hold it at the same time.

Memory is the sum of PSS (proportional set size: a page that n processes map counts 1/n in each, so
shared pages count once in the sum) from /proc/<pid>/smaps_rollup over the driver and every process it
started (the GCS, the raylet with the object store, the workers, the actors), sampled every --interval
seconds. Three rounds of the same tasks per setting: on one image (starting the workers, not
measured), on one image again (`base_peak_mib`: the processes a round has, the checkpoint store actor
among them, with no data to speak of) and on all of them (`peak_mib`). `added_mib` = peak - base: the
object store's copy of the images, plus one copy per task when the sharing is off. Results:
bench/results/shared_memory.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import ray
import torch
from common import Sampler, write_results

from ensemble import launch
from ensemble.config import LaunchConfig
from ensemble.launch import ray_session, run_tasks

IMAGE = (1, 28, 28)
T = TypeVar("T")


@dataclass(frozen=True)
class Images:
    """Like `ensemble.data.Data`: tensors, and a field that is not one."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    class_names: list[str]


@dataclass(frozen=True)
class Task:
    name: str


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=400, help="MiB of uint8 images")
    p.add_argument("--tasks", type=int, default=2, help="tasks holding the data at the same time")
    p.add_argument("--hold", type=float, default=5.0, help="seconds each task holds the data once all have read it")
    p.add_argument("--interval", type=float, default=0.2, help="seconds between memory samples")
    args = p.parse_args()
    if os.environ.get("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS"):
        raise SystemExit("unset RAY_ENABLE_ZERO_COPY_TORCH_TENSORS: with it Ray shares tensors itself")
    count = args.mib * 2**20 // (IMAGE[0] * IMAGE[1] * IMAGE[2])
    images = Images(torch.randint(0, 256, (count, *IMAGE), dtype=torch.uint8), torch.arange(count) % 10,
                    [str(c) for c in range(10)])
    rows = [measure(images, sharing, args.tasks, args.hold, args.interval) for sharing in (False, True)]
    write_results("shared_memory", rows, {"mib": args.mib, "images": count, "tasks": args.tasks,
                                          "hold_seconds": args.hold, "interval_seconds": args.interval})


def measure(images: Images, sharing: bool, tasks: int, hold: float, interval: float) -> dict:
    """Peak memory of the driver's process tree while `tasks` tasks hold `images`, and while they hold one
    image of it."""
    share = launch.to_shared
    launch.to_shared = share if sharing else (lambda value: value)  # off: the tensors travel as tensors
    try:
        with ray_session(LaunchConfig(backend="ray")):  # a new local cluster for each setting
            one = Images(images.x_train[:1].clone(), images.y_train[:1].clone(), images.class_names)
            meeting = Meeting.remote()
            hold_all(one, meeting, tasks, 0.0)  # workers started, torch imported: not part of what is measured
            base, _, _ = peak_while(lambda: hold_all(one, meeting, tasks, hold), interval)
            peak, sums, seconds = peak_while(lambda: hold_all(images, meeting, tasks, hold), interval)
    finally:
        launch.to_shared = share
    expected = checksum(images.x_train)
    if set(sums.values()) != {expected}:
        raise SystemExit(f"the tasks read other images: {sums}, expected {expected}")
    row = {"sharing": "on" if sharing else "off", "tasks": tasks, "data_mib": round(images.x_train.nbytes / 2**20),
           "base_peak_mib": round(base / 1024), "peak_mib": round(peak / 1024),
           "added_mib": round((peak - base) / 1024), "seconds": round(seconds, 1)}
    print(row, flush=True)
    return row


def peak_while(run: Callable[[], T], interval: float) -> tuple[int, T, float]:
    """The highest `tree_pss_kib` of this process sampled every `interval` s while `run()` runs, its
    result, and its seconds."""
    sampler = Sampler(os.getpid(), interval)
    sampler.start()
    t0 = time.perf_counter()
    try:
        result = run()
    finally:
        peak = sampler.stop()
    return peak, result, time.perf_counter() - t0


def checksum(x: torch.Tensor) -> int:
    """The sum of a uint8 tensor's values, read in chunks: a sum of the whole would first widen it to
    int64 in a temporary eight times its size."""
    return sum(int(chunk.sum()) for chunk in x.reshape(-1).split(2**20))


def hold_all(images: Images, meeting, tasks: int, hold: float) -> dict[str, int]:
    """`tasks` tasks of one CPU through `run_tasks`, each holding `images`: each one's checksum of them."""
    sums = {}
    ray.get(meeting.reset.remote())
    with tempfile.TemporaryDirectory() as checkpoints:
        run_tasks(hold_images, [Task(f"t{i}") for i in range(tasks)], (images, meeting, tasks, hold),
                  LaunchConfig(backend="ray", num_cpus=1, num_gpus=0),
                  lambda job, total: sums.update({job.name: total}), checkpoints=Path(checkpoints),
                  device=torch.device("cpu"))
    return sums


@ray.remote(num_cpus=0)
class Meeting:
    """Where the tasks say they have read the images, so that they hold them at the same time."""

    def __init__(self):
        self.arrived = 0

    def reset(self) -> None:
        self.arrived = 0

    def arrive(self) -> None:
        self.arrived += 1

    def count(self) -> int:
        return self.arrived


def hold_images(job: Task, checkpoint, store, device, images: Images, meeting, tasks: int, hold: float) -> int:
    """Read every image, wait for the other tasks to have read theirs (a minute at most), hold `hold` s."""
    total = checksum(images.x_train)
    ray.get(meeting.arrive.remote())
    deadline = time.monotonic() + 60
    while ray.get(meeting.count.remote()) < tasks and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(hold)
    return total


if __name__ == "__main__":
    main()
