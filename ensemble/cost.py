"""What a model costs at inference: parameters, multiply-adds per example, measured examples per second."""
from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@torch.no_grad()
def multiply_adds(net: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-adds of one forward pass on one example (torch's FLOP counter counts two per MAC)."""
    net.eval()
    with FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, *input_shape, device=next(net.parameters()).device))
    return counter.get_total_flops() // 2


def timed_predictions(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                      batch_size: int) -> tuple[torch.Tensor, float]:
    """predict() over `x` batch by batch, and the examples per second it ran at (after one warm-up batch)."""
    predict(x[:batch_size])
    start = time.perf_counter()
    out = torch.cat([predict(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    return out, len(x) / (time.perf_counter() - start)
