"""On a machine with a CUDA GPU: a short pipeline on a streamed image folder, checked to have run on it.

    python bench/gpu_check.py [--classes 12] [--per-class 60] [--image-size 64] [--workers 4]

Writes a folder of JPEGs and PNGs (two sizes), runs every stage with the defaults that pick the device
(`device: auto`; the specialists and baselines as Ray tasks on a local cluster with `launch.num_gpus`
unset, so one GPU each), then checks that

- the generalist, every specialist, the baselines, the combiner and the student ran on CUDA;
- the generalist's float32 test probabilities on the GPU match the CPU's (max |difference| <= --tolerance),
  and the ones the generalist stage saved match them too; so do the ensemble's (the `Combiner`, whose
  branch specialists share the generalist's first two stages: `specialists.branch_at=2`);
- with 2 GPUs or more, the generalist trained again on 2 Ray Train workers (`generalist.train.workers=2`,
  NCCL) ran on CUDA (with one GPU this check says it was not run);

and prints each stage's seconds and its training images per second. Exits 1 if a check fails. On a
machine without CUDA it says so and exits 0; `--device cpu` runs the same checks expecting the CPU
everywhere (how the script is tested without a GPU). Results: bench/results/gpu_check.{json,md}.
It takes a few minutes on one GPU; --per-class and --image-size size it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from common import write_image_folder, write_results

from combiner import Combiner
from ensemble.config import Config, load_config
from ensemble.data import image_batches, load_data
from ensemble.layout import STAGE_NAMES, RunDir
from ensemble.nets import load_net
from ensemble.pipeline import run_pipeline
from ensemble.predictions import read_split
from ensemble.rundir import Manifest, load_tensors, read_json
from ensemble.train import predict_logits


def devices(run: RunDir) -> dict[str, list[str]]:
    """The devices each stage recorded that it trained or predicted on."""
    specialists = read_json(run.specialists_report)["specialists"]
    baselines = read_json(run.baselines_report)["baselines"]
    return {"generalist": [read_json(run.generalist.metrics)["device"]],
            "specialists": [row["device"] for row in specialists],
            "baselines": [row["device"] for row in baselines],
            "combiner": [read_json(run.evaluation)["device"]],
            "distill_back": [read_json(run.distill_report)["device"]]}


def training_rates(run: RunDir, cfg: Config) -> dict[str, float | None]:
    """Training images per second of each stage's nets: examples over seconds, from their metrics.jsonl."""
    nets = {"generalist": [run.generalist],
            "specialists": [run.specialist(m) for m in range(len(read_json(run.specialists_report)["specialists"]))],
            "baselines": [run.baseline(b) for b in cfg.baselines.budgets], "distill_back": [run.student, run.control]}
    rates = {}
    for stage, folders in nets.items():
        rows = [json.loads(line) for net in folders if net.history.is_file()
                for line in net.history.read_text().splitlines() if line]
        seconds = sum(r["seconds"] for r in rows)
        rates[stage] = round(sum(r["examples"] for r in rows) / seconds, 1) if seconds else None
    return rates


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="the device every stage must use")
    p.add_argument("--classes", type=int, default=12)
    p.add_argument("--per-class", type=int, default=60)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=4, help="data.workers")
    p.add_argument("--epochs", type=int, default=2, help="epochs of every training stage")
    p.add_argument("--batch-size", type=int, default=64, help="of every training stage")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest |GPU - CPU| of a test probability")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU on this machine: nothing to check (--device cpu runs the checks on the CPU)")
        return 0
    workers = min(args.workers, len(os.sched_getaffinity(0)))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_image_folder(tmp / "images", args.classes, args.classes * args.per_class,
                           args.classes * max(2, args.per_class // 5), sides=(96, 48), formats=("jpg", "png", "jpg"))
        e, b = args.epochs, args.batch_size
        overrides = [
            "data.source=imagefolder", f"data.path={tmp / 'images'}", f"data.image_size={args.image_size}",
            f"data.workers={workers}", "generalist.net.name=resnet", "generalist.net.width=16",
            f"generalist.train.epochs={e}", f"generalist.train.batch_size={b}", f"specialists.train.epochs={e}",
            f"specialists.train.batch_size={b}", f"distill_back.train.epochs={e}", f"distill_back.train.batch_size={b}",
            "cluster.num_subsets=3", "cluster.shape=partition", "specialists.branch_at=2", f"device={args.device}",
            f"runs_dir={tmp / 'runs'}"]
        cfg = load_config(None, [*overrides, "name=gpu_check"])
        run_pipeline(cfg)
        parallel = None  # the generalist on 2 Ray Train workers (NCCL on GPUs): needs 2 GPUs, or 2 CPUs
        if args.device == "cpu" or torch.cuda.device_count() >= 2:
            pcfg = load_config(None, [*overrides, "name=gpu_check_parallel", "generalist.train.workers=2",
                                      f"generalist.train.batch_size={b // 2}"])
            run_pipeline(pcfg, only="generalist")
            parallel = {json.loads(line)["device"] for line in RunDir(pcfg.run_dir).generalist.history.read_text().splitlines()}
        run = RunDir(cfg.run_dir)
        seen = devices(run)
        rates = training_rates(run, cfg)
        manifest = Manifest(cfg.run_dir)
        data = load_data(cfg.data)
        net = load_net(cfg.generalist.net, data.input_shape, data.num_classes, load_tensors(run.generalist.weights),
                       "the generalist")
        probs = {d: predict_logits(net, data.x_test, device=torch.device(d)).softmax(dim=1) for d in (args.device, "cpu")}
        gap = (probs[args.device] - probs["cpu"]).abs().max().item()
        saved_gap = (read_split(run.generalist.prediction_folder, "test").probs - probs["cpu"]).abs().max().item()
        images = next(image_batches(data.x_test, 256))
        q = {d: Combiner.from_run(cfg.run_dir, device=d).predict_proba(images).cpu() for d in (args.device, "cpu")}
        ensemble_gap = (q[args.device] - q["cpu"]).abs().max().item()
    rows, failed = [], []
    for stage in STAGE_NAMES:
        if stage == "cluster":
            continue
        on = sorted(set(seen[stage]))
        ok = all(d.startswith(args.device) for d in seen[stage])
        failed += [] if ok else [f"{stage} ran on {on}, not {args.device}"]
        rows.append({"check": f"{stage} on {args.device}", "ok": ok, "devices": ", ".join(on),
                     "seconds": manifest.get(stage)["seconds"], "train_images_per_s": rates.get(stage)})
    for what, value in (("generalist test probabilities, GPU vs CPU", gap),
                        ("saved generalist test probabilities vs CPU", saved_gap),
                        ("ensemble (branch specialists) test probabilities, GPU vs CPU", ensemble_gap)):
        ok = value <= args.tolerance
        failed += [] if ok else [f"{what}: max |difference| {value:.3g} > {args.tolerance:g}"]
        rows.append({"check": what, "ok": ok, "devices": f"max |diff| {value:.2e}", "seconds": None,
                     "train_images_per_s": None})
    what = f"generalist on 2 Ray Train workers on {args.device}"
    if parallel is None:
        rows.append({"check": what, "ok": None, "devices": "not run: needs 2 GPUs", "seconds": None,
                     "train_images_per_s": None})
    else:
        ok = all(d.startswith(args.device) for d in parallel)
        failed += [] if ok else [f"{what}: rank 0 trained on {sorted(parallel)}"]
        rows.append({"check": what, "ok": ok, "devices": ", ".join(sorted(parallel)), "seconds": None,
                     "train_images_per_s": None})
    write_results("gpu_check", rows, {"device": args.device, "args": vars(args)})
    for line in failed:
        print(f"gpu_check FAILED: {line}", file=sys.stderr)
    print("gpu_check: " + ("all checks passed" if not failed else f"{len(failed)} checks failed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
