"""A streamed image folder against memory: does the generalist stage's memory stay flat as the folder
grows, and what does decoding per batch cost the training loop?

    python bench/streaming.py [--images 4000] [--classes 20] [--side 160] [--image-size 128] [--workers 1]

Writes a folder of --images JPEGs (--side pixels square, --classes classes; 10% more as a test split)
and one of 4x as many, then:

1. memory: `ensemble stage generalist` (a CNN, one epoch, streamed, `data.workers` decoding processes) on
   each folder in a process of its own; the peak of the summed PSS of it and its DataLoader workers
   (bench/common.py `Sampler`), and what the index of file names takes.
2. speed: one epoch of `ensemble.train.fit` on the small folder streamed, and on the same images
   decoded once into memory (evaluation transform, no random crop in either), interleaved, twice each:
   training images per second, and their ratio.

Results: bench/results/streaming_memory.{json,md} and streaming_speed.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import Sampler, timed, write_image_folder, write_results

from ensemble.config import DataConfig, NetConfig, TrainConfig
from ensemble.data import image_batches, load_data
from ensemble.nets import build_net
from ensemble.train import fit

CPU = torch.device("cpu")


def stage_memory(root: Path, runs: Path, name: str, args) -> dict:
    """Peak PSS of `ensemble stage generalist` on the folder at `root`, run in a process of its own."""
    overrides = ["data.source=imagefolder", f"data.path={root}", f"data.image_size={args.image_size}",
                 f"data.workers={args.workers}", "generalist.net.name=cnn", "generalist.net.width=16",
                 "generalist.train.epochs=1", "generalist.train.batch_size=64", "generalist.train.eval_batch_size=128",
                 f"runs_dir={runs}", f"name={name}"]
    child = subprocess.Popen([sys.executable, "-m", "ensemble", "stage", "generalist", *overrides],
                             stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    sampler = Sampler(child.pid, 0.1)
    sampler.start()
    if child.wait() != 0:
        sys.exit(f"ensemble stage generalist failed on {root}")
    peak = sampler.stop()
    files = load_data(DataConfig(source="imagefolder", path=str(root), image_size=args.image_size, workers=0))
    index = sum(x.files.nbytes for x in (files.x_train, files.x_val, files.x_test))
    decoded = len(files.x_train) * 3 * args.image_size ** 2  # what the training images would take in memory
    return {"train_images": len(files.x_train), "peak_pss_mib": round(peak / 1024), "index_kib": round(index / 1024),
            "images_in_memory_would_be_mib": round(decoded / 2**20)}


def training_speed(root: Path, args) -> list[dict]:
    """Images per second of one epoch of `fit` on the folder streamed and on its images in memory."""
    cfg = DataConfig(source="imagefolder", path=str(root), image_size=args.image_size, workers=args.workers,
                     train_transform="none")
    data = load_data(cfg)
    in_memory = torch.cat(list(image_batches(data.x_train, 256)))
    train = TrainConfig(epochs=1, batch_size=64, augment="none")
    seconds: dict[str, list[float]] = {"streamed": [], "in memory": []}
    for _ in range(args.repeats):
        for name, x in (("streamed", data.x_train), ("in memory", in_memory)):
            torch.manual_seed(0)
            net = build_net(NetConfig(name="cnn", width=16), data.input_shape, data.num_classes)
            net.set_input_stats(in_memory)
            with tempfile.TemporaryDirectory() as d:
                _, took = timed(lambda net=net, x=x, d=d: fit(net, x, data.y_train, train, Path(d), seed=0, device=CPU))
                seconds[name].append(took.wall)
    rate = {name: len(in_memory) / min(s) for name, s in seconds.items()}
    return [{"data": name, "train_images": len(in_memory), "images_per_s": round(r, 1),
             "ratio_to_in_memory": round(r / rate["in memory"], 3)} for name, r in rate.items()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=4000, help="training images in the small folder (4x in the large)")
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--side", type=int, default=160, help="pixels of the stored images, square")
    p.add_argument("--image-size", type=int, default=128, help="data.image_size: the side the net sees")
    p.add_argument("--workers", type=int, default=1, help="data.workers")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    memory = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for scale in (1, 4):
            root = tmp / f"x{scale}"
            images = args.images * scale
            write_image_folder(root, args.classes, images, max(args.classes, images // 10), sides=(args.side,))
            memory.append({"folder": f"{scale}N", **stage_memory(root, tmp / "runs", f"x{scale}", args)})
        speed = training_speed(tmp / "x1", args)
    for row in memory:
        row["ratio_to_N"] = round(row["peak_pss_mib"] / memory[0]["peak_pss_mib"], 3)
    write_results("streaming_memory", memory, vars(args))
    write_results("streaming_speed", speed, vars(args))


if __name__ == "__main__":
    main()
