"""A specialist's view of the data: local labels, and epochs of batches with a fixed in-subset share."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch


def local_labels(y: torch.Tensor, subset: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Global class ids -> the specialist's ids: position in `subset` for its classes, |S| (the dustbin)
    for every other class."""
    lookup = torch.full((num_classes,), len(subset), dtype=torch.int64)
    lookup[subset] = torch.arange(len(subset))
    return lookup[y]


def in_subset_count(rho: float, batch_size: int) -> int:
    """round(rho * batch_size), the subset's examples in each batch; a ValueError naming the settings
    unless it leaves room for both subset and dustbin examples."""
    k_in = round(rho * batch_size)
    if not 0 < k_in < batch_size:
        raise ValueError(f"specialists.in_subset_fraction {rho} leaves no room for both subset and dustbin "
                         f"examples in batches of specialists.train.batch_size {batch_size}")
    return k_in


def subset_sampler(in_subset: torch.Tensor, batch_size: int, rho: float) -> Callable[[torch.Generator], torch.Tensor]:
    """A sampler for `fit`: every batch holds round(rho * batch_size) examples of the subset and the rest
    from outside it. An epoch passes once over the subset's examples in random order (wrapping round
    to fill the last batch) and draws as many outside examples at random, without repeats while the
    outside pool lasts."""
    inside = in_subset.nonzero()[:, 0]
    outside = (~in_subset).nonzero()[:, 0]
    k_in = in_subset_count(rho, batch_size)
    if len(inside) == 0 or len(outside) == 0:
        raise ValueError(f"a specialist needs examples inside and outside its subset; it has {len(inside)} "
                         f"inside and {len(outside)} outside")
    k_out = batch_size - k_in
    steps = max(1, math.ceil(len(inside) / k_in))

    def draw(pool: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
        reps = math.ceil(n / len(pool))
        return torch.cat([pool[torch.randperm(len(pool), generator=gen)] for _ in range(reps)])[:n]

    def sample(gen: torch.Generator) -> torch.Tensor:
        a = draw(inside, steps * k_in, gen).view(steps, k_in)
        b = draw(outside, steps * k_out, gen).view(steps, k_out)
        batches = torch.cat([a, b], dim=1)
        return batches[:, torch.randperm(batch_size, generator=gen)].reshape(-1)

    return sample
