"""Branch specialists (`specialists.branch_at`): each shares the generalist's first blocks, frozen, and owns
the blocks after them and its head; at inference the shared blocks run once per example, then only the
active specialists' own blocks. What they share, how they are frozen, and what the ensemble costs."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ensemble.config import Config, NetConfig, SpecialistsConfig
from ensemble.cost import multiply_adds, parameters
from ensemble.data import Images, load_data
from ensemble.metrics import active_table
from ensemble.nets import BUILT_IN, Net, block_count, build_net
from ensemble.train import logit_batches


def shared_blocks(cfg: SpecialistsConfig, generalist: NetConfig) -> int | str:
    """How many of the generalist's blocks every specialist shares: `branch_at` (a number, or the module
    of a torchvision or factory net after which it is cut), or all of them with `freeze_trunk`; a
    ValueError naming the key where the settings cannot hold together."""
    count = block_count(generalist)
    if cfg.freeze_trunk and cfg.branch_at:
        raise ValueError(f"specialists.freeze_trunk shares all {count} blocks and specialists.branch_at "
                         f"{cfg.branch_at} some: set one of them")
    if isinstance(cfg.branch_at, str) and generalist.name in BUILT_IN:
        raise ValueError(f"specialists.branch_at: the built-in net {generalist.name} is cut after a number of "
                         f"blocks (0 to {count}), not after a module name ({cfg.branch_at!r})")
    if isinstance(cfg.branch_at, int) and cfg.branch_at > count:
        raise ValueError(f"specialists.branch_at must be at most {count}, the blocks of generalist.net "
                         f"{generalist.name}" + (f" (depth {generalist.depth})" if generalist.name == "mlp" else "")
                         + f", got {cfg.branch_at}")
    if (cfg.branch_at or cfg.freeze_trunk) and cfg.width is not None:
        key = "branch_at" if cfg.branch_at else "freeze_trunk"
        raise ValueError(f"specialists.{key} shares the generalist's blocks, which specialists.width would "
                         "widen: leave specialists.width null")
    return count if cfg.freeze_trunk else cfg.branch_at


def check_split(cfg: Config) -> None:
    """A named `specialists.branch_at` is a place where the generalist's net can be cut (`split_at`): tried on
    the net built for the data, before any stage runs."""
    at = shared_blocks(cfg.specialists, cfg.generalist.net)
    if not isinstance(at, str):
        return
    data = load_data(cfg.data)
    try:
        build_net(cfg.generalist.net, data.input_shape, data.num_classes, "generalist.net").blocks(at)
    except ValueError as e:
        raise ValueError(f"specialists.branch_at: {e}") from None


def freeze_front(net: Net, k: int | str) -> None:
    """Train only what follows the first `k` blocks: theirs get no gradient and their batch-norm layers
    keep the generalist's running statistics (they stay in eval mode whatever `net.train()` asks)."""
    front = net.blocks(k)[0]
    for p in front.parameters():
        p.requires_grad_(False)
    for m in front.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            m.train = lambda mode=True, m=m: m  # noqa: E731  (nn.Module.train recurses through this)


def own_net(specialist: nn.Module) -> Net:
    """The Net inside a specialist as the combiner sees it (a `FullSoftmax` view holds one)."""
    return getattr(specialist, "net", specialist)


def front_macs(generalist: Net, k: int | str, input_shape: tuple[int, int, int]) -> int:
    """The multiply-adds per example of the generalist's first `k` blocks, the part every specialist shares."""
    return multiply_adds(generalist, input_shape, forward=lambda x: generalist.front(x, k)) if k else 0


def branch_costs(generalist: Net, specialists: Sequence[nn.Module], k: int | str,
                 input_shape: tuple[int, int, int]) -> tuple[int, list[int]]:
    """The generalist's multiply-adds per example, and each specialist's own where all share the
    generalist's first `k` blocks: its blocks after them and its head (the whole specialist where k is 0)."""
    front = front_macs(generalist, k, input_shape)
    return multiply_adds(generalist, input_shape), [multiply_adds(net, input_shape) - front for net in specialists]


def active_shares(generalist: nn.Module, subsets: Sequence[torch.Tensor], top_n: int | None, x: Images, *,
                  device: torch.device, batch_size: int, channels_last: bool) -> list[float]:
    """The share of the images `x` each specialist is active for (`active_table` on the generalist's
    logits, batch by batch): what `ensemble_multiply_adds` weighs each specialist's own cost by."""
    active = torch.zeros(len(subsets), dtype=torch.float64)
    subsets = [torch.as_tensor(s) for s in subsets]
    for (logits,) in logit_batches([generalist], x, device=device, batch_size=batch_size, channels_last=channels_last):
        active += active_table(logits, subsets, top_n).sum(dim=1).double()
    return (active / len(x)).tolist()


def ensemble_multiply_adds(costs: tuple[int, list[int]], active_share: Sequence[float]) -> float:
    """The ensemble's multiply-adds per example, from `branch_costs`, where specialist m is active for a
    share `active_share[m]` of the examples: the generalist's, and each active specialist's own."""
    general, own = costs
    return general + sum(share * macs for share, macs in zip(active_share, own))


def ensemble_parameters(generalist: Net, specialists: Sequence[nn.Module], k: int | str) -> int:
    """The ensemble's parameters: the generalist's and each specialist's own (the shared blocks once)."""
    front = parameters(generalist.blocks(k)[0]) if k else 0
    return parameters(generalist) + sum(parameters(net) - front for net in specialists)
