"""The paper's classic distillation experiments (Hinton, Vinyals & Dean 2015, sections 3 and 6) on the
digits of EMNIST ByClass, with the project's distillation loss, nets and training loop.

    python bench/classic_kd.py [--data ../shared/data/emnist_byclass.npz] [--epochs 30]

The digits (classes 0-9): a stratified 10% of the training images is held out (it chooses the bias
shifts of experiments 3 and 4 and the early-stopping epoch of experiment 5; nothing is chosen on the
test set), the rest trains. Every network is an MLP on the 28x28 pixels, trained with AdamW and a
cosine schedule for the same number of examples (`--epochs` passes over the training images, however
small its transfer set); students see the clean images. Models are checkpointed in
bench/runs/classic_kd, so a rerun resumes. Results: bench/results/classic_kd.{json,md} (every
experiment, the paper's figure beside ours), classic_kd_temperature.{json,md} and
classic_kd_temperature.png (experiment 2).

1. A regularised teacher (2x1200, dropout 0.5, inputs jittered by up to 2 pixels), a 2x800 student
   on hard labels, the same student distilled at T=20.
2. Students of 2x800, 2x300 and 2x30 units distilled at T in {1, 2, 4, 8, 20}, and each on hard labels.
3. The 2x800 student distilled at T=20 on a transfer set without any 3, then with the 3's bias raised.
4. The same on a transfer set of only 7s and 8s, then with both their biases lowered.
5. The 2x800 net on 3% of the training images: hard labels (early-stopped on held-out data) against
   the teacher's soft targets, against 100% with hard labels.
"""
from __future__ import annotations

import argparse
import math
import dataclasses
from pathlib import Path

import torch

from common import write_results
from distill_back import distillation_loss
from ensemble.config import DataConfig, NetConfig, TrainConfig
from ensemble.data import Data, load_data
from ensemble.nets import Net, build_net
from ensemble.rundir import load_tensors, save_png, save_tensors
from ensemble.train import fit, predict_logits

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "bench" / "runs" / "classic_kd"
CPU = torch.device("cpu")
SIZES, TEMPERATURES = (800, 300, 30), (1, 2, 4, 8, 20)
T_PAPER, ALPHA = 20.0, 0.9  # the paper's temperature; most of the weight on the soft targets, as it advises
SHIFTS = torch.arange(-30, 30.001, 0.05)  # bias shifts tried on the held-out data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "emnist_byclass.npz"))
    p.add_argument("--epochs", type=int, default=30, help="passes over the training images for every network")
    args = p.parse_args()
    d = digits(args.data)
    print(f"digits: {len(d.y_train):,} train, {len(d.y_val):,} held out, {len(d.y_test):,} test", flush=True)
    run = Runner(d, args.epochs)

    teacher = run.train("teacher_2x1200", mlp(1200, dropout=0.5), d.y_train, augment="shift",
                        weight_decay=5e-4)
    soft = predict_logits(teacher, d.x_train, device=CPU)
    rows = [run.row("1", "teacher 2x1200, dropout, jitter", teacher, "67 (0.67%)")]

    grid = []
    for size in SIZES:
        hard = run.train(f"hard_2x{size}", mlp(size), d.y_train)
        grid.append(run.grid_row(size, "hard", hard))
        for t in TEMPERATURES:
            student = run.train(f"student_2x{size}_T{t}", mlp(size), (soft, d.y_train), temperature=t)
            grid.append(run.grid_row(size, t, student))
            if size == 800 and t == T_PAPER:
                distilled = student
        if size == 800:
            rows.append(run.row("1", "student 2x800, hard labels", hard, "146 (1.46%)"))
            rows.append(run.row("1", "student 2x800, distilled T=20", distilled, "74 (0.74%)"))

    rows += run.omitted_class(soft, 3)
    rows += run.two_classes(soft, (7, 8))
    rows += run.few_examples(soft, 0.03, hard_all=run.models["hard_2x800"])
    write_results("classic_kd", rows, {"epochs": args.epochs, "alpha": ALPHA})
    write_results("classic_kd_temperature", grid, {"epochs": args.epochs, "alpha": ALPHA})
    plot_temperature(RUNS.parent.parent / "results" / "classic_kd_temperature.png", grid, len(d.y_test))


def digits(path: str) -> Data:
    """Classes 0-9 of EMNIST ByClass with a stratified 10% of the training images held out."""
    data = load_data(DataConfig(source="npz", path=path, val_fraction=0.1, seed=0))
    if data.class_names[:10] != [str(c) for c in range(10)]:
        raise ValueError(f"{path}: classes 0-9 are not the digits ({data.class_names[:10]})")
    split = {}
    for name in ("train", "val", "test"):
        x, y = getattr(data, f"x_{name}"), getattr(data, f"y_{name}")
        split[f"x_{name}"], split[f"y_{name}"] = x[y < 10], y[y < 10]
    return dataclasses.replace(data, **split, class_names=data.class_names[:10], class_groups=None, group_names=None)


def mlp(width: int, dropout: float = 0.0) -> NetConfig:
    return NetConfig("mlp", width=width, depth=2, dropout=dropout)


class Runner:
    """Trains (or resumes) each named network once and evaluates it on the digits."""

    def __init__(self, d: Data, epochs: int):
        self.d, self.epochs, self.models = d, epochs, {}

    def train(self, name: str, net_cfg: NetConfig, targets, *, rows: torch.Tensor | None = None,
              temperature: float | None = None, alpha: float = ALPHA, augment: str = "none",
              weight_decay: float = 0.0, early_stop: bool = False) -> Net:
        """`net_cfg` trained on the training images `rows` (all by default) for `epochs` passes' worth
        of examples: on hard labels `targets`, or on (teacher logits, labels) at `temperature`. No
        weight decay unless asked: the paper's students have no regulariser but the soft targets."""
        d = self.d
        rows = torch.arange(len(d.y_train)) if rows is None else rows
        torch.manual_seed(0)
        net = build_net(net_cfg, (1, 28, 28), 10)
        net.set_input_stats(d.x_train)
        cfg = TrainConfig(epochs=self.epochs, batch_size=128, lr=1e-3, weight_decay=weight_decay,
                          warmup_epochs=0.5, augment=augment, eval_batch_size=4096)
        copies = math.ceil(len(d.y_train) / len(rows))

        def sampler(gen: torch.Generator) -> torch.Tensor:  # as many examples per epoch as the full set
            return torch.cat([torch.randperm(len(rows), generator=gen) for _ in range(copies)])[:len(d.y_train)]

        loss_fn = None if temperature is None else (
            lambda z, t: distillation_loss(z, t[0], t[1], temperature=temperature, alpha=alpha))
        subset = tuple(t[rows] for t in targets) if isinstance(targets, tuple) else targets[rows]
        workdir = RUNS / name
        best = workdir / "best.safetensors"

        def keep_best(history: list[dict]) -> None:  # early stopping: the weights of the best held-out epoch
            if history[-1]["val_top1"] >= max(r["val_top1"] for r in history):
                save_tensors(best, net.state_dict())

        fit(net, d.x_train[rows], subset, cfg, workdir, seed=0, device=CPU, loss_fn=loss_fn, sampler=sampler,
            val=(d.x_val, d.y_val), desc=name, on_epoch=keep_best if early_stop else None)
        if early_stop:
            net.load_state_dict(load_tensors(best))
        self.models[name] = net
        return net

    def logits(self, net: Net, split: str) -> torch.Tensor:
        return predict_logits(net, getattr(self.d, f"x_{split}"), device=CPU, batch_size=4096)

    def row(self, experiment: str, model: str, net: Net, paper: str, bias: torch.Tensor | None = None,
            detail: str = "") -> dict:
        z = self.logits(net, "test") + (0 if bias is None else bias)
        wrong = z.argmax(dim=1) != self.d.y_test
        return {"experiment": experiment, "model": model, "test_errors": int(wrong.sum()),
                "test_error_pct": round(100 * wrong.double().mean().item(), 2), "detail": detail, "paper (MNIST)": paper}

    def grid_row(self, size: int, temperature, net: Net) -> dict:
        errors = {split: int((self.logits(net, split).argmax(dim=1) != getattr(self.d, f"y_{split}")).sum())
                  for split in ("val", "test")}
        return {"hidden": f"2x{size}", "T": temperature, "val_errors": errors["val"], "test_errors": errors["test"]}

    def omitted_class(self, soft: torch.Tensor, digit: int) -> list[dict]:
        """Experiment 3: no `digit` in the transfer set, then its bias raised by the held-out best shift."""
        d = self.d
        net = self.train(f"student_no{digit}", mlp(800), (soft, d.y_train), rows=(d.y_train != digit).nonzero()[:, 0],
                         temperature=T_PAPER)
        shift = fit_shift(self.logits(net, "val"), d.y_val, [digit])
        bias = torch.zeros(10).index_fill_(0, torch.tensor([digit]), shift)
        on = d.y_test == digit
        rows = []
        for label, b, paper in ((f"student 2x800, T=20, no {digit}s in the transfer set", None,
                                 "206 (133 of 1,010 3s)"),
                                (f"same, bias of {digit} {shift:+.2f} (fitted on held-out data)", bias,
                                 "109 (14 of 1,010 3s), bias +3.5")):
            wrong = (self.logits(net, "test") + (0 if b is None else b)).argmax(dim=1) != d.y_test
            rows.append(self.row("3", label, net, paper, b,
                                 detail=f"{int(wrong[on].sum())} of {int(on.sum()):,} {digit}s wrong"))
        return rows

    def two_classes(self, soft: torch.Tensor, digits_kept: tuple[int, ...]) -> list[dict]:
        """Experiment 4: a transfer set of only `digits_kept`, then their biases lowered by the held-out
        best shift."""
        d = self.d
        keep = torch.isin(d.y_train, torch.tensor(digits_kept))
        name = "".join(map(str, digits_kept))
        net = self.train(f"student_only{name}", mlp(800), (soft, d.y_train), rows=keep.nonzero()[:, 0],
                         temperature=T_PAPER)
        shift = fit_shift(self.logits(net, "val"), d.y_val, list(digits_kept), sign=-1)
        bias = torch.zeros(10).index_fill_(0, torch.tensor(digits_kept), -shift)
        kept = " and ".join(f"{k}s" for k in digits_kept)
        return [self.row("4", f"student 2x800, T=20, transfer set of only {kept}", net, "47.3%"),
                self.row("4", f"same, biases of {kept} {-shift:+.2f} (fitted on held-out data)", net,
                         "13.2%, bias -7.6", bias)]

    def few_examples(self, soft: torch.Tensor, fraction: float, hard_all: Net) -> list[dict]:
        """Experiment 5: `fraction` of the training images with hard labels (early-stopped) and with the
        teacher's soft targets only, against all of them with hard labels."""
        d = self.d
        gen = torch.Generator().manual_seed(0)
        rows = torch.randperm(len(d.y_train), generator=gen)[:round(fraction * len(d.y_train))].sort().values
        pct = f"{fraction:.0%}"
        hard = self.train(f"hard_2x800_{pct}", mlp(800), d.y_train, rows=rows, early_stop=True)
        taught = self.train(f"soft_2x800_{pct}", mlp(800), (soft, d.y_train), rows=rows, temperature=T_PAPER,
                            alpha=1.0)
        n = f"{len(rows):,} images"
        return [self.row("5", f"2x800, {pct} ({n}), hard labels, early-stopped", hard, "44.5% accuracy (speech)"),
                self.row("5", f"2x800, {pct} ({n}), soft targets T=20 only", taught, "57.0% accuracy (speech)"),
                self.row("5", "2x800, 100%, hard labels", hard_all, "58.9% accuracy (speech)")]


def fit_shift(logits: torch.Tensor, y: torch.Tensor, classes: list[int], sign: int = 1) -> float:
    """The shift (the smallest of the best) added, times `sign`, to the logits of `classes` that leaves
    the fewest errors on held-out data."""
    mask = torch.zeros(logits.shape[1]).index_fill_(0, torch.tensor(classes), sign)
    errors = torch.stack([((logits + s * mask).argmax(dim=1) != y).sum() for s in SHIFTS])
    best = (errors == errors.min()).nonzero()[:, 0]
    return SHIFTS[best[SHIFTS[best].abs().argmin()]].item()


def plot_temperature(path: Path, grid: list[dict], n_test: int) -> None:
    """Experiment 2: test errors against T per student size, hard labels as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for size, color in zip(SIZES, ("C0", "C1", "C2"), strict=True):
        rows = [r for r in grid if r["hidden"] == f"2x{size}"]
        soft = [r for r in rows if r["T"] != "hard"]
        ax.plot([r["T"] for r in soft], [r["test_errors"] for r in soft], "o-", color=color,
                label=f"2x{size} distilled")
        ax.axhline(next(r["test_errors"] for r in rows if r["T"] == "hard"), color=color, ls="--", lw=1,
                   label=f"2x{size} hard labels")
    ax.set(xscale="log", xlabel="temperature T", ylabel=f"test errors (of {n_test:,})",
           title="Distillation temperature against student size (EMNIST digits)")
    ax.set_xticks(TEMPERATURES, [str(t) for t in TEMPERATURES])
    ax.legend(fontsize=8)
    save_png(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    main()
