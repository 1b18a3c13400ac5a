"""One specialist's training, the function both launcher backends run: start it from the generalist, fit
it on batches with a fixed in-subset share, keep it only if it beats its start on validation, correct
its dustbin for the natural class mix, evaluate it."""
from __future__ import annotations

import copy
import os
import socket
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ensemble.config import Config, specialist_net_config
from ensemble.data import Data
from ensemble.launch import Store, task_folder
from ensemble.layout import specialist_name
from ensemble.metrics import conditional_top1
from ensemble.nets import build_net, load_net
from ensemble.train import fit, kept_epoch, predict_logits, validated

from .branches import freeze_front, shared_blocks
from .heads import Head, dustbin_correction, make_head, widen
from .sampling import local_labels, subset_sampler


@dataclass(frozen=True)
class Job:
    """Specialist number `index`, owning the classes `classes` (global ids, in head order)."""

    index: int
    classes: tuple[int, ...]

    @property
    def name(self) -> str:
        return specialist_name(self.index)


@dataclass
class Trained:
    """What a specialist's task returns: its weights (dustbin corrected), its per-epoch history, its
    metrics, and where and when it trained."""

    weights: dict[str, torch.Tensor]
    history: list[dict]
    metrics: dict
    provenance: dict


def train_specialist(job: Job, checkpoint: bytes | None, store: Store, device: torch.device,
                     generalist_state: dict[str, torch.Tensor], data: Data, cfg: Config) -> Trained:
    """Train specialist `job`, resuming from `checkpoint` if given; after every epoch the checkpoint goes
    to `store.save`. With `specialists.select_on_validation`, a specialist whose training did not raise
    its conditional top-1 on the subset's validation examples above its start's (which equals the
    generalist's) returns its start, uncorrected: it was never trained on the shifted class mix."""
    started = time.time()
    data.check_readable()
    seed = cfg.seed * 100_003 + job.index
    torch.manual_seed(seed)
    spec = cfg.specialists
    head = make_head(spec, job.classes)
    size = len(job.classes)
    x, shape, num_classes = data.x_train, data.input_shape, data.num_classes
    batch = spec.train.eval_batch_size
    generalist = load_net(cfg.generalist.net, shape, num_classes, generalist_state, "the generalist's weights")
    targets, loss_fn = head.targets(generalist, x, data.y_train, device, batch)
    if spec.width is not None:  # the same function, with room to grow
        generalist = widen(generalist, build_net(specialist_net_config(cfg), shape, num_classes))
    net, init_kl = head.start(generalist, x, device, batch, seed)
    start = head.view(copy.deepcopy(net))
    freeze_front(net, shared_blocks(spec, cfg.generalist.net))

    in_subset = local_labels(data.y_train, head.subset, num_classes) < size
    sampler = subset_sampler(in_subset, spec.train.batch_size, spec.in_subset_fraction)
    val = validation_mix(data, head, spec.in_subset_fraction, seed) if validated(spec.train) else None
    with task_folder(job.name, checkpoint, store) as folder:
        history = fit(net, x, targets, spec.train, folder.folder, seed=seed, device=device, sampler=sampler,
                      loss_fn=loss_fn, val=val, desc=f"specialist {job.name}", on_epoch=folder.on_epoch,
                      clean_images=head.soft_targets)
    trained = head.view(net)

    pi, rho = in_subset.float().mean().item(), spec.in_subset_fraction
    predict = lambda model, images: predict_logits(model, images, device=device, batch_size=batch,  # noqa: E731
                                                   channels_last=spec.train.channels_last)
    y_val = local_labels(data.y_val, head.subset, num_classes)
    val_logits = {"trained": predict(trained, data.x_val), "start": predict(start, data.x_val)}
    val = {name: conditional_top1(z, y_val, [torch.arange(size)]) for name, z in val_logits.items()}
    kept = "start" if spec.select_on_validation and val["trained"] <= val["start"] else "trained"
    view, shift = (start, 0.0) if kept == "start" else (trained, choose_shift(
        spec.dustbin_correction, dustbin_correction(pi, rho), val_logits["trained"], y_val))
    raw = predict(view, data.x_test)
    head.shift_dustbin(view, shift)
    metrics = {
        **specialist_metrics(raw, shift, local_labels(data.y_test, head.subset, num_classes), size),
        "kept": kept, "val_conditional_top1_trained": val["trained"], "val_conditional_top1_start": val["start"],
        "classes": size, "natural_share": pi, "sampled_share": rho, "dustbin_shift": shift,
        "init_dustbin_kl": init_kl, "epochs": len(history),
        "kept_epoch": kept_epoch(history, spec.train),
    }
    provenance = {
        "resumed_from_epoch": folder.resumed_from,
        "train_seconds": round(sum(r["seconds"] for r in history[folder.resumed_from:]), 2),
        "started": started, "finished": time.time(), "device": str(device),
        "host": socket.gethostname(), "node_id": _ray_node_id(), "pid": os.getpid(),
    }
    return Trained(head.weights(view), history, metrics, provenance)


def validation_mix(data: Data, head: Head, rho: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What `epochs: auto` and `schedule: plateau` follow for a specialist: its subset's validation images
    and, drawn at random, as many others as its batches' in-subset share `rho` puts beside them, with the
    labels its net is trained on."""
    local = local_labels(data.y_val, head.subset, data.num_classes)
    inside, outside = (local < len(head.subset)).nonzero()[:, 0], (local == len(head.subset)).nonzero()[:, 0]
    count = min(len(outside), round(len(inside) * (1 - rho) / rho))
    outside = outside[torch.randperm(len(outside), generator=torch.Generator().manual_seed(seed))[:count]]
    rows = torch.cat([inside, outside]).sort().values
    return data.x_val[rows], head.labels(data.y_val[rows], data.num_classes)


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
        "conditional_top1": conditional_top1(logits, y_local, [torch.arange(size)]),
        "dustbin_mean_prob": bin_prob.mean().item(),
        "dustbin_mean_prob_uncorrected": raw_logits.softmax(dim=1)[:, -1].mean().item(),
        "dustbin_true_share": (~inside).float().mean().item(),
        "in_out_accuracy": ((bin_prob > 0.5) == ~inside).float().mean().item(),
        "test_nll": F.cross_entropy(logits, y_local).item(),
    }


def _ray_node_id() -> str | None:
    """The Ray node this task runs on (hosts can share a name, nodes on one machine share the host),
    or None outside Ray."""
    if "ray" not in sys.modules:
        return None
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
