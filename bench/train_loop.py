"""Is the project's training loop as fast as a bare hand-written PyTorch loop? And what does the
channels_last memory format buy on this CPU? One run, the same model and data, interleaved repeats in rotating order.

    python bench/train_loop.py [--repeats 5] [--width 32] [--classes 400] [--net cnn] [--name train_loop]

`--net` takes any net name (`torchvision:resnet18`); the images are gray 28x28, as EMNIST's.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from common import timed, write_results

from ensemble.config import NetConfig, TrainConfig
from ensemble.data.synthetic import synthetic
from ensemble.nets import build_net
from ensemble.rundir import save_checkpoint
from ensemble.train import fit

CPU = torch.device("cpu")


def bare_loop(net, x, y, epochs, batch_size, channels_last):
    """The loop anyone would write: shuffle, uint8 -> float, forward, cross-entropy, backward, step."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net.to(memory_format=fmt).train()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=5e-4)
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(len(x) // batch_size):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            xb = x[idx].float().div_(255).contiguous(memory_format=fmt)
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def checkpoint_seconds(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int) -> list[float]:
    """What the checkpoint `fit` writes after each epoch costs: the same `save_checkpoint` of the net's
    and its AdamW state's tensors (after one step, so that the state exists), timed `repeats` times."""
    opt = torch.optim.AdamW(net.parameters())
    F.cross_entropy(net(x[:128].float() / 255), y[:128]).backward()
    opt.step()
    with tempfile.TemporaryDirectory() as d:
        return [timed(lambda: save_checkpoint(Path(d) / "checkpoint.pt", {
            "model": net.state_dict(), "optimizer": opt.state_dict()}))[1].wall for _ in range(repeats)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--classes", type=int, default=400)
    p.add_argument("--per-class", type=int, default=25)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--net", default="cnn", help="a built-in net (its --width), torchvision:<builder> or module:factory")
    p.add_argument("--name", default="train_loop", help="the results' file name")
    args = p.parse_args()
    src = synthetic(args.classes, args.per_class, 1, image_size=28)
    x, y = torch.from_numpy(src.x_train)[:, None], torch.from_numpy(src.y_train)
    net_cfg = NetConfig(args.net, width=args.width, depth=1)
    fresh = lambda: build_net(net_cfg, (1, 28, 28), args.classes)
    images = args.epochs * (len(x) // 128 * 128)

    def ours(channels_last):
        cfg = TrainConfig(epochs=args.epochs, batch_size=128, augment="none", channels_last=channels_last)
        with tempfile.TemporaryDirectory() as d:
            fit(fresh(), x, y, cfg, d, seed=0, device=CPU)

    runs = {"fit (channels_last)": lambda: ours(True), "bare loop (channels_last)":
            lambda: bare_loop(fresh(), x, y, args.epochs, 128, True),
            "fit (contiguous)": lambda: ours(False), "bare loop (contiguous)":
            lambda: bare_loop(fresh(), x, y, args.epochs, 128, False)}
    times = {k: [] for k in runs}
    names = list(runs)
    for r in range(args.repeats):  # rotate the order so that no variant always runs first
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(timed(runs[name])[1].wall)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    base, base_best = med["bare loop (channels_last)"], best["bare loop (channels_last)"]
    rows = [{"loop": k, "median_s": round(v, 3), "min_s": round(best[k], 3), "images_per_s": round(images / v),
             "median_vs_bare": round(v / base, 3), "min_vs_bare": round(best[k] / base_best, 3)}
            for k, v in med.items()]
    saves = checkpoint_seconds(fresh(), x, y, args.repeats)
    rows.append({"loop": "of which: a checkpoint (fit writes one per epoch)", "median_s": round(statistics.median(saves), 3),
                 "min_s": round(min(saves), 3)})
    write_results(args.name, rows, {"args": vars(args), "times_s": times, "checkpoint_s": saves,
                                       "fit_over_bare_channels_last": med["fit (channels_last)"] / base,
                                       "contiguous_over_channels_last_fit":
                                       med["fit (contiguous)"] / med["fit (channels_last)"]})


if __name__ == "__main__":
    main()
