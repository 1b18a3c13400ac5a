"""The transfer set and its soft targets: the teacher's log-probabilities for every input, computed once."""
from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from ensemble.data import Data, Images, image_batches
from ensemble.train import augment

from .loss import UNLABELLED


def transfer_set(data: Data, copies: int, seed: int, batch_size: int = 4096) -> tuple[Images, torch.Tensor]:
    """uint8 images and labels: the training set, then `copies` passes over it under random affine maps
    (rotation, scale, shear, shift), labelled UNLABELLED: soft targets need no labels. Copies are of
    in-memory images (`distill_back.check` refuses them for a streamed set)."""
    if copies == 0:
        return data.x_train, data.y_train
    gen = torch.Generator().manual_seed(seed)
    images, labels = [data.x_train], [data.y_train]
    for _ in range(copies):
        for start in range(0, len(data.x_train), batch_size):
            x = data.x_train[start:start + batch_size].float().div_(255)
            images.append(augment(x, "affine", gen).mul_(255).round_().clamp_(0, 255).to(torch.uint8))
        labels.append(torch.full_like(data.y_train, UNLABELLED))
    return torch.cat(images), torch.cat(labels)


def soft_targets(predict_proba: Callable[[torch.Tensor], torch.Tensor], x: Images, batch_size: int,
                 desc: str = "soft targets") -> torch.Tensor:
    """The teacher's log-probabilities (N, C) in float32 for uint8 images `x`, batch by batch
    (probabilities clamped at float32's tiny, so that log q* of the combiner stays finite)."""
    out, start = [], 0
    for xb in tqdm(image_batches(x, batch_size), total=-(-len(x) // batch_size), desc=desc, leave=False,
                   disable=None):
        q = predict_proba(xb).float()
        if not torch.isfinite(q).all():
            raise ValueError(f"the teacher's probabilities are not finite for inputs {start}..{start + len(q) - 1}")
        out.append(q.clamp_min_(torch.finfo(torch.float32).tiny).log_().cpu())
        start += len(q)
    return torch.cat(out)
