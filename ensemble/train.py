"""The one training loop, used by every stage that trains a network.

`fit` trains a model on uint8 images, in memory or streamed, resuming from `<workdir>/checkpoint.pt` when one is
there: the checkpoint, written atomically after each epoch, holds the model, optimiser, LR schedule,
grad scaler, every RNG state, the epoch and the metric history, so a run killed at any moment and
started again ends with the same weights as one never interrupted. Progress: a tqdm bar with live
loss and accuracy, one printed line per epoch, and `<workdir>/metrics.jsonl`.

`epochs: auto` trains until the validation top-1 stops improving (`plateau`: `patience` epochs without a
new best, at most `max_epochs`) and keeps the best epoch's weights; `schedule: plateau` divides the
learning rate by 10 at a stall instead, LR_DROPS times, before that, and also keeps the best epoch's
weights when it runs a fixed number of epochs; `smooth_epochs` counts the stalls on the mean of the last
epochs' validation top-1 instead of each one's. Both are decided from the metric history alone, so a resumed
training decides as an uninterrupted one.

The same loop trains data-parallel when it runs in each process of a torch.distributed group (Ray
Train's workers, `ensemble.parallel`): every process takes its disjoint share of each global batch of
`batch_size x workers` examples, DistributedDataParallel averages the gradients, and rank 0 evaluates,
writes the checkpoint and prints. With one process it is the plain loop, unchanged.
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .config import TrainConfig, config_hash
from .data import Images, image_batches, shard_positions
from .layout import CHECKPOINT, HISTORY
from .metrics import classification_sums
from .nets import is_conv
from .rundir import load_checkpoint, save_checkpoint, write_history

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Sampler = Callable[[torch.Generator], torch.Tensor]  # one epoch's example indices, in order
Targets = torch.Tensor | tuple[torch.Tensor, ...]
LR_DROPS = 2  # schedule: plateau divides the learning rate by 10 at most this many times


def resolve_device(name: str) -> torch.device:
    """'auto' is the first CUDA device if there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available on this machine")
    return device


def fit(
    model: nn.Module,
    x: Images,
    targets: Targets,
    cfg: TrainConfig,
    workdir: Path,
    *,
    seed: int,
    device: torch.device,
    loss_fn: LossFn | None = None,
    sampler: Sampler | None = None,
    val: tuple[Images, torch.Tensor] | None = None,
    desc: str = "train",
    on_epoch: Callable[[list[dict]], None] | None = None,
    clean_images: bool = False,
) -> list[dict]:
    """Train `model` on uint8 images `x` (N, C, H, W), in memory or streamed, against `targets`: class ids (N,), soft
    targets (N, K), or a tuple of per-example tensors that `loss_fn` takes apart (train accuracy is
    measured against the first). Returns the per-epoch metrics, also written to
    `<workdir>/metrics.jsonl`. `on_epoch(history)` runs after each epoch's checkpoint is written (to
    copy it elsewhere), in every process of a data-parallel group. Streamed images go through
    `data.train_transform`'s random crops, unless `clean_images`: for targets computed on the images as
    evaluation sees them (soft targets)."""
    parts = targets if isinstance(targets, tuple) else (targets,)
    if any(len(t) != len(x) for t in parts):
        raise ValueError(f"{len(x)} images but {[len(t) for t in parts]} targets")
    if validated(cfg) and val is None:
        raise ValueError(f"{desc}: epochs: auto and schedule: plateau follow the validation top-1, and this "
                         "training has no validation images")
    rank, world = _process_group(cfg)
    batch, global_batch = cfg.batch_size, cfg.batch_size * world
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    loss_fn = loss_fn or (lambda z, y: F.cross_entropy(z, y, label_smoothing=cfg.label_smoothing))
    if sampler is None and len(x) < global_batch:
        batches = f"batch_size {cfg.batch_size}" + (f" x {world} workers" if world > 1 else "")
        raise ValueError(f"{desc}: {batches} is larger than the {len(x)} training examples, so no batch would "
                         "train (the last partial batch of an epoch is dropped)")
    sampler = sampler or (lambda g: torch.randperm(len(x), generator=g))
    memory_format = _memory_format(model, cfg)
    model.to(device=device, memory_format=memory_format)

    steps_per_epoch = max(1, len(sampler(torch.Generator().manual_seed(0))) // global_batch)
    optimizer = _optimizer(model, cfg)
    drops = [0]  # the learning rate's divisions by 10 so far (schedule: plateau), which the schedule reads
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, steps_per_epoch, lambda: drops[0]))
    autocast, scaler = _amp(device, cfg.amp)
    gen = torch.Generator().manual_seed(seed)  # the same in every process: one order, one augmentation
    torch.manual_seed(seed + rank)  # the model's own randomness (dropout): rank 0 as one process would

    key = training_key(cfg, seed, len(x), targets)
    start, history, best = _resume(workdir / CHECKPOINT, key, model, optimizer, schedule, scaler, gen, rank,
                                   keeps_best=validated(cfg))
    drops[0] = plateau(history, cfg).drops
    net = _data_parallel(model, device) if world > 1 else model
    cap, of = epoch_cap(cfg), f"{epoch_cap(cfg)}{' at most' if cfg.epochs == 'auto' else ''}"
    for epoch in range(start, cap):
        if plateau(history, cfg).stop:
            break
        t0 = time.perf_counter()
        net.train()
        order = sampler(gen)
        mine = order[shard_positions(len(order), batch, rank, world)]
        loss_sum = torch.zeros((), device=device)  # Σ loss · batch size, kept on the device: no sync a step
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen = 0
        bar = tqdm(total=len(mine) // batch, desc=f"{desc} {epoch + 1}/{of}", leave=False,
                   disable=None if rank == 0 else True, file=sys.stderr, dynamic_ncols=True)
        pin = device.type == "cuda"
        images = image_batches(x, batch, order=order, train=not clean_images, gen=gen, pin=pin, shard=(rank, world))
        for step, xb in enumerate(images):
            idx = mine[step * batch:(step + 1) * batch]
            xb = augment(_prepare(xb, device, memory_format), cfg.augment, gen, first=rank * batch, of=global_batch)
            yb = _rows(targets, idx, device, pin)
            with autocast():
                logits = net(xb)
                loss = loss_fn(logits.float(), yb)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            loss_sum += loss.detach().float() * len(idx)
            correct += _correct(logits.detach(), yb)
            seen += len(idx)
            if not bar.disable and (step % 10 == 0 or step == bar.total - 1):  # a sync, for the eyes only
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}",
                                refresh=False)
            bar.update()
        bar.close()
        loss_total, correct_total, seen = _summed([loss_sum, correct, seen], device, world)
        row = {"epoch": epoch + 1, "train_loss": loss_total / max(1, seen), "train_acc": correct_total / max(1, seen),
               "lr": optimizer.param_groups[0]["lr"], "examples": int(seen), "device": str(device)}
        if val is not None and rank == 0:
            row.update(evaluate(model, *val, device=device, batch_size=cfg.eval_batch_size,
                                channels_last=cfg.channels_last, prefix="val_"))
        if validated(cfg) and world > 1:  # every process decides the schedule and the stop from the same history
            row = _gathered(row, world)[0]
        row["seconds"] = round(time.perf_counter() - t0, 3)
        history.append(row)
        state = plateau(history, cfg)
        if validated(cfg) and state.best_epoch == epoch + 1:
            best = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if state.drops != drops[0]:
            drops[0] = state.drops
            for group, base, lr_factor in zip(optimizer.param_groups, schedule.base_lrs, schedule.lr_lambdas):
                group["lr"] = base * lr_factor(schedule.last_epoch)  # the next step at the new rate
        rng = _rng_state(device) if world == 1 else _gathered(_rng_state(device), world)
        if rank == 0:
            save_checkpoint(workdir / CHECKPOINT, {
                "key": key, "epoch": epoch + 1, "history": history, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                "scaler": scaler.state_dict(), "rng": rng, "gen": gen.get_state(),
                **({"best": best} if best is not None else {}),
            })
            write_history(workdir / HISTORY, history)
        if on_epoch is not None:
            on_epoch(history)
        if rank == 0:
            print(f"{desc} epoch {epoch + 1}/{of}: " + "  ".join(
                f"{k} {v}" if isinstance(v, int | str) else f"{k} {v:.4g}" for k, v in row.items() if k != "epoch"),
                flush=True)
    if validated(cfg):
        model.load_state_dict(best)
        if rank == 0:
            print(f"{desc}: stopped after {len(history)} epochs; the best, epoch {plateau(history, cfg).best_epoch}, "
                  "is kept", flush=True)
    return history


def epoch_cap(cfg: TrainConfig) -> int:
    """The most epochs a training runs: `epochs`, or under `epochs: auto` its cap `max_epochs`."""
    return cfg.max_epochs if cfg.epochs == "auto" else cfg.epochs


def validated(cfg: TrainConfig) -> bool:
    """Whether the training follows its validation top-1 (epochs: auto, schedule: plateau)."""
    return cfg.epochs == "auto" or cfg.schedule == "plateau"


@dataclass(frozen=True)
class Plateau:
    """Where a validation-driven training stands: its best epoch (1-based; 0 before any), the learning
    rate's divisions by 10 so far, and whether it is done (`epochs: auto`)."""

    best_epoch: int
    drops: int
    stop: bool


def plateau(history: list[dict], cfg: TrainConfig) -> Plateau:
    """Replay `history`'s validation top-1: a stall is `patience` epochs without a strictly better one (its
    mean over the last `smooth_epochs` epochs); under `schedule: plateau` each of the first LR_DROPS stalls
    divides the learning rate by 10 and starts the count again; under `epochs: auto` the next stall stops
    the training. The best epoch is the one of the highest single validation top-1."""
    if not validated(cfg):
        return Plateau(0, 0, False)
    best, best_epoch, top, since, drops = -math.inf, 0, -math.inf, 0, 0
    for i, row in enumerate(history):
        if row["val_top1"] > best:
            best, best_epoch = row["val_top1"], row["epoch"]
        recent = [r["val_top1"] for r in history[max(0, i + 1 - cfg.smooth_epochs):i + 1]]
        level = sum(recent) / len(recent)
        if level > top:
            top, since = level, 0
        else:
            since += 1
        if since >= cfg.patience:
            if cfg.schedule == "plateau" and drops < LR_DROPS:
                drops, since = drops + 1, 0
            elif cfg.epochs == "auto":
                return Plateau(best_epoch, drops, True)
    return Plateau(best_epoch, drops, False)


def kept_epoch(history: list[dict], cfg: TrainConfig) -> int:
    """The epoch whose weights a finished training keeps: the best on validation where the training follows
    it (`epochs: auto`, `schedule: plateau`), else the last."""
    return plateau(history, cfg).best_epoch if validated(cfg) else len(history)


def epochs_text(cfg: TrainConfig) -> str:
    """How long a training runs, in words for its first line."""
    if cfg.epochs == "auto":
        mean = f" (its mean over {cfg.smooth_epochs})" if cfg.smooth_epochs > 1 else ""
        return f"epochs until the validation top-1{mean} stalls for {cfg.patience} (at most {cfg.max_epochs})"
    return f"{cfg.epochs} epochs"


def finished(history: list[dict], cfg: TrainConfig) -> bool:
    """Whether a training with this `history` has ended: it ran its epochs, or `epochs: auto` stopped it."""
    return len(history) >= epoch_cap(cfg) or plateau(history, cfg).stop


def training_key(cfg: TrainConfig, seed: int, n: int, targets: Targets) -> str:
    """What a checkpoint must have been trained under to be resumed: the settings, the seed, the number of
    examples and the targets' shapes."""
    parts = targets if isinstance(targets, tuple) else (targets,)
    return config_hash(cfg, seed, n, [tuple(t.shape) for t in parts])


def finished_history(model: nn.Module, path: Path, key: str, cfg: TrainConfig) -> list[dict] | None:
    """The history of the training whose checkpoint at `path` under `key` has `finished`, its weights (the
    best epoch's where the training follows its validation top-1) loaded into `model`; None where there is
    no such checkpoint."""
    ckpt = load_checkpoint(path)
    if (ckpt is None or ckpt.get("key") != key or not finished(ckpt["history"], cfg)
            or _lacks_best(ckpt, validated(cfg))):
        return None
    model.load_state_dict(ckpt["best"] if validated(cfg) else ckpt["model"])
    return list(ckpt["history"])


def _lacks_best(ckpt: dict, keeps_best: bool) -> bool:
    """Whether a checkpoint of a training that keeps its best epoch has none: one written before fixed-epoch
    `schedule: plateau` trainings kept it (`epochs: auto` always has one after its first epoch)."""
    return keeps_best and bool(ckpt["history"]) and "best" not in ckpt


def _process_group(cfg: TrainConfig) -> tuple[int, int]:
    """This process's rank and the number of processes training together: (0, 1) outside a
    torch.distributed group; within one (Ray Train's workers) it must have `cfg.workers` processes."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != cfg.workers:
        raise ValueError(f"train.workers is {cfg.workers} but {world} processes train together")
    return rank, world


def _data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` in DistributedDataParallel: its gradients averaged over the group in the backward pass."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def _summed(values: list[torch.Tensor | int], device: torch.device, world: int) -> list[float]:
    """The sums of per-process `values` over the group (in float64: counts stay exact)."""
    total = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(total)
    return total.tolist()


def _gathered(state: dict, world: int) -> list[dict]:
    """Every process's `state`, in rank order."""
    states: list = [None] * world
    dist.all_gather_object(states, state)
    return states


@torch.no_grad()
def predict_logits(model: nn.Module, x: Images, *, device: torch.device, batch_size: int = 1024,
                   channels_last: bool = True) -> torch.Tensor:
    """Logits (N, K) in float32 on the CPU for uint8 images `x` (in memory or streamed), in eval mode,
    computed in float32 (no mixed precision, no TF32): these are the probabilities the clustering, the
    evaluation and the Combiner read, and they must agree on every device."""
    return predict_logits_of([model], x, device=device, batch_size=batch_size, channels_last=channels_last)[0]


def predict_logits_of(models: Sequence[nn.Module], x: Images, *, device: torch.device, batch_size: int = 1024,
                      channels_last: bool = True) -> list[torch.Tensor]:
    """`predict_logits` of each of `models` on `x`, each batch of images read (decoded, if streamed) once
    for all of them."""
    if not models:
        return []
    out: list[list[torch.Tensor]] = [[] for _ in models]
    for logits in logit_batches(models, x, device=device, batch_size=batch_size, channels_last=channels_last):
        for rows, z in zip(out, logits):
            rows.append(z)
    return [torch.cat(rows) for rows in out]


def evaluate(model: nn.Module, x: Images, y: torch.Tensor, *, device: torch.device,
             batch_size: int = 1024, channels_last: bool = True, prefix: str = "") -> dict[str, float]:
    """Top-1, top-5 accuracy and NLL of `model` on labelled uint8 images, batch by batch (the logits of
    the whole set are never held at once)."""
    sums: dict[str, float] = {}
    start = 0
    for (logits,) in logit_batches([model], x, device=device, batch_size=batch_size, channels_last=channels_last):
        for key, value in classification_sums(logits, y[start:start + len(logits)]).items():
            sums[key] = sums.get(key, 0) + value
        start += len(logits)
    return {f"{prefix}{key}": value / len(y) for key, value in sums.items()}


@torch.no_grad()
def logit_batches(models: Sequence[nn.Module], x: Images, *, device: torch.device, batch_size: int,
                   channels_last: bool) -> Iterator[list[torch.Tensor]]:
    """Each model's float32 CPU logits of `x`, batch by batch, in order."""
    formats = [torch.channels_last if channels_last and is_conv(m) else torch.contiguous_format for m in models]
    for model, memory_format in zip(models, formats):
        model.eval().to(device=device, memory_format=memory_format)
    with exact_float32(device):
        for xb in image_batches(x, batch_size, pin=device.type == "cuda"):
            xb = xb.to(device, non_blocking=True)
            yield [model(_prepare(xb, device, f)).float().cpu() for model, f in zip(models, formats)]


@contextmanager
def exact_float32(device: torch.device) -> Iterator[None]:
    """float32 convolutions and matrix products on CUDA within the block, not TF32 (torch's default for
    cuDNN): predictions that agree with the CPU's."""
    if device.type != "cuda":
        yield
        return
    cudnn, matmul = torch.backends.cudnn.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    torch.backends.cudnn.fp32_precision = torch.backends.cuda.matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        torch.backends.cudnn.fp32_precision, torch.backends.cuda.matmul.fp32_precision = cudnn, matmul


def augment(x: torch.Tensor, kind: str, gen: torch.Generator, *, first: int = 0, of: int | None = None) -> torch.Tensor:
    """Random per-image shifts ('shift': up to 1/14 of the side) or affine maps ('affine': also
    rotation, scale, shear) applied with one `grid_sample`; 'none' returns `x`. The maps are drawn for
    `of` images (default: x's), of which `x` are rows `first`...: one process's share of a global batch
    gets the maps one process training on all of it would draw for them."""
    if kind == "none":
        return x
    n = len(x) if of is None else of
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * (2 / 14)  # in [-1, 1] grid units: +-1/14 of the side
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    if kind == "affine":
        angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(10)
        scale = 1 + (torch.rand(n, generator=gen) * 2 - 1) * 0.1
        shear = (torch.rand(n, generator=gen) * 2 - 1) * 0.1
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta[:, 0, 0], theta[:, 0, 1] = cos, -sin + shear
        theta[:, 1, 0], theta[:, 1, 1] = sin, cos
    theta[:, :, 2] = shift
    theta = theta[first:first + len(x)]
    if x.device.type == "cuda":  # drawn on the CPU from `gen`; copied without a sync
        theta = theta.pin_memory().to(x.device, non_blocking=True)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _prepare(x: torch.Tensor, device: torch.device, memory_format: torch.memory_format) -> torch.Tensor:
    """uint8 images -> float in [0, 1] on `device`, in `memory_format` (a pinned batch copies without
    blocking the host)."""
    return x.to(device, non_blocking=True).float().div_(255).contiguous(memory_format=memory_format)


def _rows(targets: Targets, idx: torch.Tensor, device: torch.device, pin: bool = False) -> Targets:
    """The targets of rows `idx` on `device`, copied from page-locked memory if `pin`."""
    if isinstance(targets, tuple):
        return tuple(_rows(t, idx, device, pin) for t in targets)
    rows = targets[idx]
    return (rows.pin_memory() if pin else rows).to(device, non_blocking=True)


def _correct(logits: torch.Tensor, y: Targets) -> torch.Tensor:
    """How many examples have no logit above their label's (the label: a class id, or the soft target's
    top class: the argmax of its dense log q, or the first of its top-k class ids). A tie with the label counts as right; unlike an argmax, this costs a fraction of a step."""
    y = y[0] if isinstance(y, tuple) else y
    labels = y if y.ndim == 1 else y.argmax(dim=1) if y.is_floating_point() else y[:, 0]  # top-k ids: best first
    return (logits.gather(1, labels[:, None])[:, 0] >= logits.amax(dim=1)).sum()


def _memory_format(model: nn.Module, cfg: TrainConfig) -> torch.memory_format:
    return torch.channels_last if cfg.channels_last and is_conv(model) else torch.contiguous_format


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum or AdamW; no weight decay on biases and norm parameters."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _lr_lambda(cfg: TrainConfig, steps_per_epoch: int, drops: Callable[[], int]) -> Callable[[int], float]:
    """Linear warm-up over `warmup_epochs`, then constant, constant divided by 10 `drops()` times (plateau)
    or cosine decay to zero over `epoch_cap` epochs, per step."""
    warmup = cfg.warmup_epochs * steps_per_epoch
    total = max(1, epoch_cap(cfg) * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        if cfg.schedule == "plateau":
            return 0.1 ** drops()
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return factor


def _amp(device: torch.device, enabled: bool):
    """Mixed precision on CUDA if `enabled` (bfloat16 where supported, else float16 with a grad scaler);
    off on CPU."""
    use = device.type == "cuda" and enabled
    dtype = torch.bfloat16 if use and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use and dtype == torch.float16)
    if not use:
        return nullcontext, scaler
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _resume(path: Path, key: str, model, optimizer, schedule, scaler, gen, rank: int = 0,
            keeps_best: bool = False) -> tuple[int, list[dict], dict | None]:
    """Restore everything from the checkpoint at `path` if it belongs to this training; else start at 0.
    A data-parallel checkpoint holds every process's RNG state; process `rank` takes its own. Also the
    best epoch's weights where the training `keeps_best` (it follows its validation top-1)."""
    ckpt = load_checkpoint(path)
    if ckpt is None:
        return 0, [], None
    if ckpt.get("key") != key or _lacks_best(ckpt, keeps_best):
        if rank == 0:
            why = ("config, seed or data differ" if ckpt.get("key") != key
                   else "written before a fixed-epoch plateau training kept its best epoch")
            print(f"{path} belongs to another training ({why}): starting afresh", flush=True)
        return 0, [], None
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    schedule.load_state_dict(ckpt["schedule"])
    scaler.load_state_dict(ckpt["scaler"])
    gen.set_state(ckpt["gen"])
    rng = ckpt["rng"][rank] if isinstance(ckpt["rng"], list) else ckpt["rng"]
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    if rank == 0:
        print(f"resumed from {path} after epoch {ckpt['epoch']}", flush=True)
    return ckpt["epoch"], list(ckpt["history"]), ckpt.get("best")
