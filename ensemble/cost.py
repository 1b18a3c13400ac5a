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
def multiply_adds(net: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-adds of one forward pass on one example (torch's FLOP counter counts two per MAC)."""
    net.eval()
    with FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, *input_shape, device=next(net.parameters()).device))
    return counter.get_total_flops() // 2


def timed_predictions(predict: Callable[[torch.Tensor], torch.Tensor], x: Images,
                      batch_size: int) -> tuple[torch.Tensor, float]:
    """predict() over `x` batch by batch, and the examples per second predict() ran at, after one warm-up
    batch (reading and decoding the images is not timed: it costs every system the same)."""
    out, seconds = [], 0.0
    for i, xb in enumerate(image_batches(x, batch_size)):
        if i == 0:
            predict(xb)
        start = time.perf_counter()
        out.append(predict(xb))
        seconds += time.perf_counter() - start
    return torch.cat(out), len(x) / seconds
