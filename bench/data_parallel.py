"""Data-parallel training on this machine: the default CNN on EMNIST, one process with 2 torch threads
against 2 Ray Train workers with 1 thread each, at the same global batch; and what the gradients'
all-reduce costs a step.

    python bench/data_parallel.py [--config configs/emnist.yaml] [--epochs 2] [--repeats 30]

Both train the config's generalist (the CNN, width 32; EMNIST from ../shared/data, see bench/common.py)
for --epochs epochs with its recipe: one process at batch_size B with `torch.set_num_threads(2)`, then
`generalist.train.workers=2` at B/2 per worker (`launch.num_cpus=1`: one thread each) through
`ensemble.parallel.fit_parallel`, as the pipeline runs it. images/s counts the training examples over
the epochs' own seconds (rank 0's clock: Ray's start-up is in `wall_seconds` only); `ratio` is each
row's images/s over the one process's, measured in the same run.

The synchronisation: on 2 Ray Train workers (gloo, 1 thread each), one all-reduce of a float32 buffer
the size of the CNN's gradients, --repeats times after 3 warm-up calls; the median is what
DistributedDataParallel pays a step at least (it all-reduces the same bytes, in buckets, overlapped
with the backward pass where it can). `sync_share` is that time over the 2-worker step time.
Results: bench/results/data_parallel.{json,md}.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import bench_config, write_results

from ensemble.config import LaunchConfig
from ensemble.cost import multiply_adds, parameters
from ensemble.data import load_data
from ensemble.launch import ray_session, set_up_process
from ensemble.nets import start_net
from ensemble.parallel import fit_parallel
from ensemble.train import fit

CPU = torch.device("cpu")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/emnist.yaml")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30, help="timed all-reduce calls")
    args = p.parse_args()

    cfg = bench_config(Path(args.config), [f"generalist.train.epochs={args.epochs}"])
    data = load_data(cfg.data)
    one = dataclasses.replace(cfg.generalist.train, workers=1)
    two = dataclasses.replace(one, batch_size=one.batch_size // 2, workers=2)
    launch = LaunchConfig(num_cpus=1)
    shape, classes = data.input_shape, data.num_classes

    def net():
        torch.manual_seed(cfg.seed)
        return start_net(cfg.generalist.net, shape, classes, data.x_train, "generalist.net")

    size, macs = parameters(net()), multiply_adds(net(), shape)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        set_up_process(threads=2)
        t0 = time.perf_counter()
        history = fit(net(), data.x_train, data.y_train, one, Path(tmp) / "one", seed=cfg.seed, device=CPU,
                      desc="1 process")
        rows.append(_row("1 process x 2 threads", 1, 2, one.batch_size, history, time.perf_counter() - t0))
        with ray_session(launch):
            t0 = time.perf_counter()
            history = fit_parallel(net(), data.x_train, data.y_train, two, Path(tmp) / "two", seed=cfg.seed,
                                   device=CPU, launch=launch, storage=str(Path(tmp) / "storage"),
                                   section="generalist.train", desc="2 workers")
            rows.append(_row("2 workers x 1 thread", 2, 1, two.batch_size * 2, history, time.perf_counter() - t0))
            sync_ms = _all_reduce_ms(size, args.repeats)
    base = rows[0]["images_per_s"]
    for row in rows:
        row["ratio"] = round(row["images_per_s"] / base, 3)
    step_ms = 1000 * rows[1]["global_batch"] / rows[1]["images_per_s"]
    rows[1].update(sync_ms=round(sync_ms, 3), step_ms=round(step_ms, 2), sync_share=round(sync_ms / step_ms, 4))
    write_results("data_parallel", rows, {
        "net": f"{cfg.generalist.net.name} width {cfg.generalist.net.width}", "parameters": size,
        "gradient_bytes": 4 * size, "multiply_adds_per_example": macs, "train_images": len(data.x_train),
        "epochs": args.epochs})


def _row(setup: str, workers: int, threads: int, global_batch: int, history: list[dict], wall: float) -> dict:
    seconds = sum(r["seconds"] for r in history)
    examples = sum(r["examples"] for r in history)
    return {"setup": setup, "workers": workers, "threads": threads, "global_batch": global_batch,
            "images_per_s": round(examples / seconds, 1), "train_seconds": round(seconds, 1),
            "wall_seconds": round(wall, 1), "final_train_loss": round(history[-1]["train_loss"], 4), "ratio": None,
            "sync_ms": None, "step_ms": None, "sync_share": None}


def _all_reduce_ms(numel: int, repeats: int) -> float:
    """The median milliseconds of one all-reduce of `numel` float32 values on 2 Ray Train workers."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def loop(config: dict) -> None:
        import ray.train
        import torch.distributed as dist

        torch.set_num_threads(1)
        grads = torch.ones(config["numel"])
        times = []
        for i in range(config["repeats"] + 3):
            t0 = time.perf_counter()
            dist.all_reduce(grads)
            if i >= 3:
                times.append(time.perf_counter() - t0)
        with tempfile.TemporaryDirectory() as out:  # Ray Train keeps the metrics of checkpoints
            (Path(out) / "ms").write_text(str(1000 * statistics.median(times)))
            ray.train.report({}, checkpoint=ray.train.Checkpoint.from_directory(out))

    with tempfile.TemporaryDirectory() as storage:
        result = TorchTrainer(loop, train_loop_config={"numel": numel, "repeats": repeats},
                              scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                              run_config=RunConfig(name="all_reduce", storage_path=storage)).fit()
        with result.checkpoint.as_directory() as folder:
            return float((Path(folder) / "ms").read_text())


if __name__ == "__main__":
    main()
