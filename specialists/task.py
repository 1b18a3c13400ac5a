"""One specialist's training, the function both launcher backends run: build it from the generalist, fit
it on batches with a fixed in-subset share, correct its dustbin for the natural class mix, evaluate it."""
from __future__ import annotations

import copy
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ensemble.config import Config, specialist_net_config
from ensemble.nets import Net, build_net, load_weights
from ensemble.rundir import CHECKPOINT, load_checkpoint
from ensemble.train import fit, predict_logits

from .model import (
    FullSoftmax,
    correct_dustbin,
    dustbin_correction,
    dustbin_kl,
    freeze_trunk,
    outside_distillation_loss,
    specialist_net,
    widen,
    with_own_head,
)
from .sampling import local_labels, subset_sampler

DUSTBIN_SAMPLE = 4096  # training inputs the dustbin row is fitted on


@dataclass(frozen=True)
class Job:
    """Specialist number `index`, owning the classes `classes` (global ids, in head order)."""

    index: int
    classes: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"m{self.index:03d}"


def train_specialist(job: Job, checkpoint: bytes | None, store, device: torch.device,
                     generalist_state: dict[str, torch.Tensor], data: dict[str, torch.Tensor], cfg: Config) -> dict:
    """Train specialist `job`, resuming from `checkpoint` if given; return its weights (dustbin
    corrected), metrics and per-epoch history.

    `data` holds uint8 images and labels `x_train y_train x_val y_val x_test y_test` and `num_classes`;
    after every epoch the checkpoint goes to `store.save`. With `specialists.select_on_validation`, a
    specialist whose training did not raise its conditional top-1 on the subset's validation examples
    above its start's (which equals the generalist's) returns its start, uncorrected: it was never
    trained on the shifted class mix."""
    started = time.time()
    seed = cfg.seed * 100_003 + job.index
    torch.manual_seed(seed)
    x, y = data["x_train"], data["y_train"]
    num_classes = int(data["num_classes"])
    subset = torch.tensor(job.classes, dtype=torch.int64)
    generalist = build_net(cfg.generalist.net, tuple(x.shape[1:]), num_classes)
    load_weights(generalist, generalist_state, "the generalist's weights")
    batch = cfg.specialists.train.eval_batch_size
    if cfg.specialists.head == "full":  # §6.1's soft targets, from the generalist before any widening
        teacher = predict_logits(generalist, x, device=device, batch_size=batch).log_softmax(dim=1)
    if cfg.specialists.width is not None:  # the same function, with room to grow
        generalist = widen(generalist, build_net(specialist_net_config(cfg), tuple(x.shape[1:]), num_classes))

    y_local = local_labels(y, subset, num_classes)
    if cfg.specialists.head == "dustbin":
        sample = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:DUSTBIN_SAMPLE]
        features = trunk_outputs(generalist, x[sample], device, batch)
        net = specialist_net(generalist, subset, features)
        init_kl = dustbin_kl(features, generalist, net, subset)
        targets, loss_fn = y_local, None
    else:  # §6.1: the full softmax, its classes outside S learnt from the generalist's soft targets
        net, init_kl = copy.deepcopy(generalist), 0.0
        outside = FullSoftmax(net, subset).outside.to(device)  # the classes outside S
        targets = (y, teacher)
        loss_fn = lambda z, t: outside_distillation_loss(z, t[0], t[1], outside)  # noqa: E731
    net = with_own_head(net, cfg.specialists.head_hidden)
    start = copy.deepcopy(net) if cfg.specialists.head == "dustbin" else FullSoftmax(copy.deepcopy(net), subset)

    if cfg.specialists.freeze_trunk:
        freeze_trunk(net)
    rho = cfg.specialists.in_subset_fraction
    in_subset = y_local < len(subset)
    sampler = subset_sampler(in_subset, cfg.specialists.train.batch_size, rho)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        resumed = _restore(checkpoint, workdir)
        history = fit(net, x, targets, cfg.specialists.train, workdir, seed=seed, device=device, sampler=sampler,
                      loss_fn=loss_fn, desc=f"specialist {job.name}", on_epoch=lambda h: store.save(
                          job.name, (workdir / CHECKPOINT).read_bytes(), len(h), os.getpid()))
    if cfg.specialists.head == "full":
        net = FullSoftmax(net, subset)

    pi = in_subset.float().mean().item()
    channels_last = cfg.specialists.train.channels_last
    y_val = local_labels(data["y_val"], subset, num_classes)
    val_logits = {name: predict_logits(model, data["x_val"], device=device, batch_size=batch,
                                       channels_last=channels_last) for name, model in (("trained", net), ("start", start))}
    val = {name: conditional_top1(z, y_val, len(subset)) for name, z in val_logits.items()}
    kept = "start" if cfg.specialists.select_on_validation and val["trained"] <= val["start"] else "trained"
    net, shift = (start, 0.0) if kept == "start" else (net, choose_shift(
        cfg.specialists.dustbin_correction, dustbin_correction(pi, rho), val_logits["trained"], y_val))
    raw = predict_logits(net, data["x_test"], device=device, batch_size=batch, channels_last=channels_last)
    correct_dustbin(net, shift)
    metrics = {
        **specialist_metrics(raw, shift, local_labels(data["y_test"], subset, num_classes), len(subset)),
        "kept": kept, "val_conditional_top1_trained": val["trained"], "val_conditional_top1_start": val["start"],
        "classes": len(subset), "natural_share": pi, "sampled_share": rho, "dustbin_shift": shift,
        "init_dustbin_kl": init_kl, "epochs": len(history), "resumed_from_epoch": resumed,
        "train_seconds": round(sum(r["seconds"] for r in history[resumed:]), 2),
        "started": started, "finished": time.time(), "device": str(device),
        "host": socket.gethostname(), "node_id": _ray_node_id(), "pid": os.getpid(),
    }
    inner = net.net if isinstance(net, FullSoftmax) else net
    return {"state": {k: v.detach().cpu() for k, v in inner.state_dict().items()}, "metrics": metrics,
            "history": history}


def choose_shift(mode: str, prior_shift: float, val_logits: torch.Tensor, y_val_local: torch.Tensor) -> float:
    """The dustbin logit's shift: the prior ratio's (`prior`), none, or whichever of the two gives the
    lower NLL on the validation examples, which have the natural class mix (`validation`)."""
    if mode == "none":
        return 0.0
    if mode == "prior":
        return prior_shift

    def nll(shift: float) -> float:
        z = val_logits.clone()
        z[:, -1] += shift
        return F.cross_entropy(z, y_val_local).item()

    return min((prior_shift, 0.0), key=nll)


def _ray_node_id() -> str | None:
    """The Ray node this task runs on (hosts can share a name, nodes on one machine share the host),
    or None outside Ray."""
    if "ray" not in sys.modules:
        return None
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def specialist_metrics(raw_logits: torch.Tensor, shift: float, y_local: torch.Tensor, size: int) -> dict:
    """On test data with its natural class mix: conditional top-1 (examples of the subset, argmax over
    the subset's classes), the mean dustbin probability before and after the correction against the
    true share of examples outside the subset, in/out accuracy and NLL of the corrected specialist."""
    logits = raw_logits.clone()
    logits[:, -1] += shift
    inside = y_local < size
    bin_prob = logits.softmax(dim=1)[:, -1]
    return {
        "test_in_subset": int(inside.sum()),
        "conditional_top1": conditional_top1(logits, y_local, size),
        "dustbin_mean_prob": bin_prob.mean().item(),
        "dustbin_mean_prob_uncorrected": raw_logits.softmax(dim=1)[:, -1].mean().item(),
        "dustbin_true_share": (~inside).float().mean().item(),
        "in_out_accuracy": ((bin_prob > 0.5) == ~inside).float().mean().item(),
        "test_nll": F.cross_entropy(logits, y_local).item(),
    }


def conditional_top1(logits: torch.Tensor, y_local: torch.Tensor, size: int) -> float:
    """On the examples of the subset (local label < size): accuracy of the argmax over its classes."""
    inside = y_local < size
    return (logits[inside, :size].argmax(dim=1) == y_local[inside]).float().mean().item()


def trunk_outputs(net: Net, x: torch.Tensor, device: torch.device, batch_size: int) -> torch.Tensor:
    """The trunk's features (N, d) of `net` for uint8 images `x`, on the CPU."""
    trunk = copy.deepcopy(net)
    trunk.head = nn.Identity()
    return predict_logits(trunk, x, device=device, batch_size=batch_size)


def _restore(checkpoint: bytes | None, workdir: Path) -> int:
    """Put a checkpoint from the store where `fit` resumes from; return the epoch it was saved after."""
    if checkpoint is None:
        return 0
    path = workdir / CHECKPOINT
    path.write_bytes(checkpoint)
    return int(load_checkpoint(path)["epoch"])
