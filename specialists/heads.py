"""The specialist network: the generalist's trunk with a head over its subset's classes plus a dustbin.

Head rows 0..|S|-1 are the generalist's rows for the classes of S, in the subset's order; the last row
is the dustbin. The dustbin row is fitted so that, on the generalist's features, the specialist starts
out predicting the generalist's own distribution collapsed onto S ∪ {dustbin} (see `fit_dustbin_row`).

The paper's §6.1 variant (`specialists.head=full`) keeps the generalist's full softmax instead and learns
the classes outside S from the generalist's soft targets (`outside_distillation_loss`); `FullSoftmax`
shows it to the rest of the system as a dustbin specialist.

`DustbinHead` and `FullSoftmaxHead` (`make_head`) hold what differs between the two: how a specialist
starts, what it trains on, how its dustbin logit shifts, what its weights are; with `head_hidden` both
get a hidden layer of their own (`ResidualHead`).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ensemble.config import NetConfig, SpecialistsConfig
from ensemble.nets import Net, load_net
from ensemble.train import predict_logits

from .sampling import local_labels

DUSTBIN_SAMPLE = 4096  # training inputs the dustbin row is fitted on
LossFn = Callable[[torch.Tensor, object], torch.Tensor]


def specialist_net(generalist: Net, subset: torch.Tensor, features: torch.Tensor,
                   outside: torch.Tensor | None = None) -> Net:
    """A copy of `generalist` whose head predicts the classes `subset` and then a dustbin; the dustbin
    row is fitted on `features` (generalist trunk outputs for a sample of inputs with the natural mix;
    `outside`: their `outside_logit`, if already computed)."""
    net = copy.deepcopy(generalist)
    w, b = generalist.head.weight.detach(), generalist.head.bias.detach()
    w_bin, b_bin = fit_dustbin_row(features, w, b, subset, outside=outside)
    head = nn.Linear(w.shape[1], len(subset) + 1).to(w.device, w.dtype)
    with torch.no_grad():
        head.weight.copy_(torch.cat([w[subset], w_bin[None]]))
        head.bias.copy_(torch.cat([b[subset], b_bin[None]]))
    net.head = head
    return net


def fit_dustbin_row(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, subset: torch.Tensor,
                    max_iter: int = 100, outside: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The dustbin row (w, b) that makes the specialist's initial distribution closest to the generalist's.

    The exact dustbin logit would be logsumexp of the generalist's logits outside S, which no linear row
    can produce. We take the row that minimises the cross-entropy from the generalist's collapsed
    distribution [p_S, Σ_{c∉S} p_c] to the specialist's softmax([z_S, w·h + b]) over the features h:
    a convex problem in (w, b), solved by L-BFGS started from the least-squares fit of that logsumexp
    (`outside_logit`, or `outside` if the caller has it).
    """
    h = features.detach().double()
    inside = torch.zeros(weight.shape[0], dtype=torch.bool, device=weight.device)
    inside[subset] = True
    z_in = h @ weight[subset].double().T + bias[subset].double()
    if inside.all():  # nothing is left for the dustbin: make it (nearly) impossible
        return torch.zeros_like(weight[0]), torch.tensor(-30.0, dtype=bias.dtype, device=bias.device)
    target_logit = outside_logit(features, weight, bias, subset) if outside is None else outside
    target = torch.cat([z_in, target_logit[:, None]], dim=1).softmax(dim=1)

    design = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype, device=h.device)], dim=1)
    row = torch.linalg.lstsq(design, target_logit[:, None]).solution[:, 0]
    row = row.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([row], max_iter=max_iter, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        opt.zero_grad()
        z = torch.cat([z_in, (design @ row)[:, None]], dim=1)
        value = -(target * z.log_softmax(dim=1)).sum(dim=1).mean()
        value.backward()
        return value

    opt.step(loss)
    row = row.detach()
    return row[:-1].to(weight.dtype), row[-1].to(bias.dtype)


LOGIT_BLOCK = 2**24  # outside_logit computes (examples × classes) logits in blocks of at most this many


def outside_logit(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, subset: torch.Tensor) -> torch.Tensor:
    """log Σ_{c ∉ subset} exp(h·w_c + b_c) per row h of `features`: the generalist's logit of everything
    outside the subset (-inf if nothing is), from float32 logits (the generalist's own precision) over
    blocks of classes, each block's logsumexp in float32 and their sum in float64: at 100,000 classes the
    whole (4,096 × C) logits would take 1.6 GB, and float64 arithmetic on them three times the time."""
    keep = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
    keep[subset] = False
    h, classes = features.detach().float(), keep.nonzero()[:, 0]
    width = max(1, LOGIT_BLOCK // max(1, len(h)))
    parts = [torch.addmm(bias[c].float(), h, weight[c].float().T).logsumexp(dim=1).double() for c in classes.split(width)]
    return torch.stack(parts, dim=1).logsumexp(dim=1) if parts else h.new_full((len(h),), -torch.inf).double()


def dustbin_correction(pi: float, rho: float) -> float:
    """The shift of the dustbin logit that undoes training at in-subset share rho when the natural share
    is pi (a change of class prior): log((1-pi)/pi) - log((1-rho)/rho)."""
    if not (0 < pi < 1 and 0 < rho < 1):
        raise ValueError(f"in-subset shares must lie in (0, 1), got natural {pi} and sampled {rho}")
    return math.log((1 - pi) / pi) - math.log((1 - rho) / rho)


class FullSoftmax(nn.Module):
    """A specialist with a softmax over all classes, seen as a dustbin specialist: its logits on the
    subset, then the logsumexp of all the others (so the softmax gives [p_S, Σ_{c∉S} p_c] exactly).
    Its state dict is the inner net's under `net.`; the subset is not saved with it."""

    def __init__(self, net: Net, subset: torch.Tensor):
        super().__init__()
        self.net = net
        outside = torch.ones(net.head.out_features, dtype=torch.bool)
        outside[subset] = False
        self.register_buffer("subset", subset.clone(), persistent=False)
        self.register_buffer("outside", outside.nonzero()[:, 0], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._collapsed(self.net(x))

    def back(self, h: torch.Tensor, k: int) -> torch.Tensor:
        """The logits from the inner net's `front(x, k)` (see `Net.back`)."""
        return self._collapsed(self.net.back(h, k))

    def _collapsed(self, z: torch.Tensor) -> torch.Tensor:
        return torch.cat([z[:, self.subset], z[:, self.outside].logsumexp(dim=1, keepdim=True)], dim=1)


def outside_distillation_loss(logits: torch.Tensor, labels: torch.Tensor, teacher_log_probs: torch.Tensor,
                              outside: torch.Tensor) -> torch.Tensor:
    """§6.1: cross-entropy on the hard labels over all classes, plus the KL from the generalist's to the
    specialist's distribution over the classes outside the subset (each renormalised there), which keeps
    what the generalist knows about them while the specialist learns its own classes."""
    hard = F.cross_entropy(logits, labels)
    soft = F.kl_div(logits[:, outside].log_softmax(dim=1), teacher_log_probs[:, outside].log_softmax(dim=1),
                    log_target=True, reduction="batchmean")
    return hard + soft


class ResidualHead(nn.Linear):
    """A specialist's capacity of its own on top of the trunk: the linear head plus a hidden ReLU layer,
    z = W h + b + V relu(U h + c). V starts at zero, so the head starts out computing what the linear one
    did; with a frozen trunk every specialist shares the generalist's features and owns only this head."""

    def __init__(self, linear: nn.Linear, hidden: int):
        super().__init__(linear.in_features, linear.out_features, device=linear.weight.device,
                         dtype=linear.weight.dtype)
        with torch.no_grad():
            self.weight.copy_(linear.weight)
            self.bias.copy_(linear.bias)
        self.hidden = nn.Linear(linear.in_features, hidden, device=linear.weight.device, dtype=linear.weight.dtype)
        self.out = nn.Linear(hidden, linear.out_features, bias=False, device=linear.weight.device,
                             dtype=linear.weight.dtype)
        nn.init.zeros_(self.out.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight, self.bias) + self.out(F.relu(self.hidden(h)))


def with_own_head(net: Net, hidden: int) -> Net:
    """`net` with its head made a `ResidualHead` of `hidden` units (unchanged if `hidden` is 0), in place."""
    if hidden:
        net.head = ResidualHead(net.head, hidden)
    return net


@torch.no_grad()
def widen(narrow: Net, wide: Net) -> Net:
    """`wide` (the same net with wider layers, freshly initialised) made to compute what `narrow` does:
    each narrow tensor is copied into the leading block of the wide one, and the weights from the new
    units into the old ones are zeroed, so the new units start with random inputs and no effect on the
    output (they grow by training). Works for any net whose wider layers only append units."""
    wide_state = wide.state_dict()
    for key, w in narrow.state_dict().items():
        big = wide_state[key]
        if w.dim() != big.dim() or any(a > b for a, b in zip(w.shape, big.shape)):
            raise ValueError(f"cannot widen {key} of shape {tuple(w.shape)} into {tuple(big.shape)}")
        big[tuple(slice(0, n) for n in w.shape)] = w
        if w.dim() >= 2:  # weights (out, in, ...): the old outputs ignore the new inputs
            big[:w.shape[0], w.shape[1]:] = 0
    wide.load_state_dict(wide_state)
    return wide


@torch.no_grad()
def collapse(probs: torch.Tensor, subset: torch.Tensor) -> torch.Tensor:
    """Probabilities over all classes (N, C) -> over the subset's classes then the dustbin (N, |S|+1)."""
    inside = probs[:, subset]
    return torch.cat([inside, (1 - inside.sum(dim=1, keepdim=True)).clamp_min(0)], dim=1)


def dustbin_kl(features: torch.Tensor, generalist: Net, specialist: Net, subset: torch.Tensor,
               outside: torch.Tensor | None = None) -> float:
    """Mean KL from the generalist's collapsed distribution to the specialist's, on trunk `features`; the
    generalist's mass outside the subset from `outside_logit` (or `outside`, if the caller has it)."""
    with torch.no_grad():
        w, b = generalist.head.weight, generalist.head.bias
        if outside is None:
            outside = outside_logit(features, w, b, subset)
        z = torch.cat([features.double() @ w[subset].double().T + b[subset].double(), outside[:, None]], dim=1)
        log_q = specialist.head(features).double().log_softmax(dim=1)
        return F.kl_div(log_q, z.log_softmax(dim=1), reduction="batchmean", log_target=True).item()


def trunk_outputs(net: Net, x: torch.Tensor, device: torch.device, batch_size: int) -> torch.Tensor:
    """The trunk's features (N, d) of `net` for uint8 images `x`, on the CPU."""
    trunk = copy.deepcopy(net)
    trunk.head = nn.Identity()
    return predict_logits(trunk, x, device=device, batch_size=batch_size)


@dataclass(frozen=True)
class _Head:
    """A specialist's head over the classes `subset` (global ids, in head order), with a hidden layer of
    its own of `hidden` units (0: none). Its `view` of a net outputs logits over S then the dustbin."""

    subset: torch.Tensor
    hidden: int
    soft_targets = False  # whether its targets include the generalist's predictions on the clean images

    def load(self, cfg: NetConfig, input_shape: tuple[int, int, int], num_classes: int,
             weights: Path | dict[str, torch.Tensor]) -> nn.Module:
        """A trained specialist, as the combiner sees it, from the weights its task returned."""
        net = load_net(cfg, input_shape, self.outputs(num_classes), weights, "the specialist's weights",
                       adapt=lambda n: with_own_head(n, self.hidden))
        return self.view(net)

    def weights(self, view: nn.Module) -> dict[str, torch.Tensor]:
        """The weights to save of a specialist's view: those of the net inside it."""
        return {k: v.detach().cpu() for k, v in self.net(view).state_dict().items()}


@dataclass(frozen=True)
class DustbinHead(_Head):
    """The paper's specialist: the generalist's head rows for S and one fitted dustbin row, trained on
    local labels (the dustbin for every class outside S)."""

    def outputs(self, num_classes: int) -> int:
        return len(self.subset) + 1

    def labels(self, y: torch.Tensor, num_classes: int) -> torch.Tensor:
        """The labels its net's outputs are trained and validated on: local ones, the dustbin for the rest."""
        return local_labels(y, self.subset, num_classes)

    def targets(self, generalist: Net, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                batch_size: int) -> tuple[torch.Tensor, LossFn | None]:
        """Local labels, and the training loop's default loss (cross-entropy)."""
        return self.labels(y, generalist.head.out_features), None

    def start(self, generalist: Net, x: torch.Tensor, device: torch.device, batch_size: int,
              seed: int) -> tuple[Net, float]:
        """The net to train: a copy of `generalist` with the dustbin row fitted on the trunk's features of
        DUSTBIN_SAMPLE training images; and the mean KL of its first predictions from the generalist's
        collapsed ones there."""
        sample = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:DUSTBIN_SAMPLE]
        features = trunk_outputs(generalist, x[sample], device, batch_size)
        outside = outside_logit(features, generalist.head.weight.detach(), generalist.head.bias.detach(), self.subset)
        net = specialist_net(generalist, self.subset, features, outside)
        kl = dustbin_kl(features, generalist, net, self.subset, outside)
        return with_own_head(net, self.hidden), kl

    def start_macs(self, num_train: int, generalist: int, widened: int) -> int:
        """The multiply-adds of the start's forward passes, given the generalist's and the widened
        generalist's per image: the dustbin row's sample through the widened generalist."""
        return min(DUSTBIN_SAMPLE, num_train) * widened

    def view(self, net: Net) -> nn.Module:
        return net

    def net(self, view: nn.Module) -> Net:
        return view

    def shift_dustbin(self, view: nn.Module, shift: float) -> None:
        """Add `shift` to the dustbin logit: the bias of the head's last row, in place."""
        with torch.no_grad():
            view.head.bias[-1] += shift


@dataclass(frozen=True)
class FullSoftmaxHead(_Head):
    """§6.1: the generalist's whole softmax, its classes outside S trained towards the generalist's soft
    targets while those of S learn from the labels; seen through `FullSoftmax` as S plus a dustbin."""

    soft_targets = True

    def outputs(self, num_classes: int) -> int:
        return num_classes

    def labels(self, y: torch.Tensor, num_classes: int) -> torch.Tensor:
        """The labels its net's outputs are validated on: global ones, its outputs being all the classes."""
        return y

    def targets(self, generalist: Net, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                batch_size: int) -> tuple[tuple[torch.Tensor, torch.Tensor], LossFn]:
        """Global labels and the generalist's log-probabilities on `x` (made before any widening), and
        `outside_distillation_loss`."""
        teacher = predict_logits(generalist, x, device=device, batch_size=batch_size).log_softmax(dim=1)
        outside = FullSoftmax(generalist, self.subset).outside.to(device)
        return (y, teacher), lambda z, t: outside_distillation_loss(z, t[0], t[1], outside)

    def start(self, generalist: Net, x: torch.Tensor, device: torch.device, batch_size: int,
              seed: int) -> tuple[Net, float]:
        """A copy of `generalist`: it starts as the generalist exactly (KL 0)."""
        return with_own_head(copy.deepcopy(generalist), self.hidden), 0.0

    def start_macs(self, num_train: int, generalist: int, widened: int) -> int:
        """The multiply-adds of the start's forward passes: the soft targets, the plain generalist's pass
        over the training set."""
        return num_train * generalist

    def view(self, net: Net) -> nn.Module:
        return FullSoftmax(net, self.subset)

    def net(self, view: nn.Module) -> Net:
        return view.net

    def shift_dustbin(self, view: nn.Module, shift: float) -> None:
        """Add `shift` to the biases of every class outside S, which shifts their logsumexp (the dustbin
        logit) by the same, in place."""
        with torch.no_grad():
            view.net.head.bias[view.outside] += shift


Head = DustbinHead | FullSoftmaxHead


def make_head(cfg: SpecialistsConfig, subset: torch.Tensor | list[int]) -> Head:
    """The head `specialists.head` asks for, over `subset`, with `specialists.head_hidden` units of its own."""
    kind = FullSoftmaxHead if cfg.head == "full" else DustbinHead
    return kind(torch.as_tensor(subset, dtype=torch.int64), cfg.head_hidden)
