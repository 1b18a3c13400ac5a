"""What a model costs at inference: parameters, multiply-adds per example, measured examples per second."""
from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .data import Images, image_batches


def parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@torch.no_grad()
def multiply_adds(net: nn.Module, input_shape: tuple[int, ...],
                  forward: Callable[[torch.Tensor], torch.Tensor] | None = None) -> int:
    """Multiply-adds of one forward pass of `net` (or of `forward`, a part of it) on one example (torch's
    FLOP counter counts two per MAC)."""
    net.eval()
    with FlopCounterMode(display=False) as counter:
        (forward or net)(torch.zeros(1, *input_shape, device=next(net.parameters()).device))
    return counter.get_total_flops() // 2


def timed_predictions(predict: Callable[[torch.Tensor], torch.Tensor], x: Images, y: torch.Tensor,
                      batch_size: int) -> tuple[dict[str, float], float]:
    """Top-1 and NLL of predict()'s probabilities over labelled images `x` batch by batch (never all of
    them at once: 30,000 images over 15,000 classes would take 1.8 GB), and the examples per second
    predict() ran at, after one warm-up batch (reading and decoding the images is not timed: it costs
    every system the same). NLL clamps probabilities at float32's tiny."""
    right, nll, seconds, start = 0, 0.0, 0.0, 0
    for i, xb in enumerate(image_batches(x, batch_size)):
        if i == 0:
            predict(xb)
        began = time.perf_counter()
        probs = predict(xb)
        seconds += time.perf_counter() - began
        labels = y[start:start + len(xb)].to(probs.device)
        right += int((probs.argmax(dim=1) == labels).sum())
        chosen = probs.gather(1, labels[:, None])[:, 0].double()
        nll -= chosen.clamp_min(torch.finfo(torch.float32).tiny).log().sum().item()
        start += len(xb)
    return {"test_top1": right / len(y), "test_nll": nll / len(y)}, len(x) / seconds
