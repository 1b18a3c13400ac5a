"""Networks by name. Each is `head(trunk(x))`: `trunk` maps images to features, `head` is the final
nn.Linear, which the specialists replace (their classes plus a dustbin).

Inputs are float images in [0, 1], shaped (N, C, H, W); each net normalises them with per-channel
statistics of its training data, kept as buffers so that saved weights are self-contained.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .config import NetConfig
from .rundir import load_tensors


class Net(nn.Module):
    """A trunk and a linear head; `forward` gives logits."""

    def __init__(self, trunk: nn.Module, head: nn.Linear, in_channels: int):
        super().__init__()
        self.register_buffer("input_mean", torch.full((1, in_channels, 1, 1), 0.5))
        self.register_buffer("input_std", torch.full((1, in_channels, 1, 1), 0.5))
        self.trunk = trunk
        self.head = head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk((x - self.input_mean) / self.input_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def set_input_stats(self, images: torch.Tensor) -> None:
        """Set the normalisation from uint8 training images (N, C, H, W)."""
        x = images.float().div_(255)
        self.input_mean.copy_(x.mean(dim=(0, 2, 3), keepdim=True))
        self.input_std.copy_(x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-3))


def build_net(cfg: NetConfig, input_shape: tuple[int, int, int], num_classes: int) -> Net:
    """The network `cfg.name` for inputs of `input_shape` (C, H, W) and `num_classes` outputs."""
    builders = {"mlp": _mlp, "cnn": _cnn, "resnet": _resnet}
    if cfg.name not in builders:
        raise ValueError(f"unknown net {cfg.name!r}; known: {sorted(builders)}")
    trunk, dim = builders[cfg.name](cfg, input_shape)
    return Net(trunk, nn.Linear(dim, num_classes), in_channels=input_shape[0])


def is_conv(net: nn.Module) -> bool:
    """Whether the net has 2-D convolutions (and so gains from the channels_last memory format)."""
    return any(isinstance(m, nn.Conv2d) for m in net.modules())


def _mlp(cfg: NetConfig, shape: tuple[int, int, int]) -> tuple[nn.Module, int]:
    """The paper's MNIST nets: `depth` hidden layers of `width` ReLU units (2x800, 2x1200 + dropout)."""
    layers: list[nn.Module] = [nn.Flatten()]
    dim = shape[0] * shape[1] * shape[2]
    for _ in range(cfg.depth):
        layers += [nn.Linear(dim, cfg.width), nn.ReLU(inplace=True), nn.Dropout(cfg.dropout)]
        dim = cfg.width
    return nn.Sequential(*layers), dim


def _conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def _cnn(cfg: NetConfig, shape: tuple[int, int, int]) -> tuple[nn.Module, int]:
    """A small CNN for 28x28: four stages of `depth` 3x3 conv-BN-ReLU (width w, 2w, 4w, 8w) with 2x2
    max-pooling between them (28 -> 14 -> 7 -> 3, so the last stage sees the whole image), global
    average pooling, dropout."""
    layers: list[nn.Module] = []
    c_in = shape[0]
    for stage, c_out in enumerate((cfg.width, 2 * cfg.width, 4 * cfg.width, 8 * cfg.width)):
        if stage:
            layers.append(nn.MaxPool2d(2))
        for _ in range(cfg.depth):
            layers += _conv_bn(c_in, c_out)
            c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(cfg.dropout)]
    return nn.Sequential(*layers), c_in


class _Block(nn.Module):
    """A basic residual block (two 3x3 convs), downsampling by stride 2 when asked."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out),
        )
        self.skip = (
            nn.Identity() if stride == 1 and c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


def _resnet(cfg: NetConfig, shape: tuple[int, int, int]) -> tuple[nn.Module, int]:
    """A CIFAR-style ResNet for 32x32 and up: a 3x3 stem, three stages of `depth` basic blocks
    (width w, 2w, 4w; ResNet-20 is width 16, depth 3), global average pooling, dropout."""
    layers: list[nn.Module] = _conv_bn(shape[0], cfg.width)
    c_in = cfg.width
    for stage, c_out in enumerate((cfg.width, 2 * cfg.width, 4 * cfg.width)):
        for block in range(cfg.depth):
            layers.append(_Block(c_in, c_out, stride=2 if stage and not block else 1))
            c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(cfg.dropout)]
    return nn.Sequential(*layers), c_in


def load_net(cfg: NetConfig, input_shape: tuple[int, int, int], num_classes: int,
             weights: Path | dict[str, torch.Tensor], what: str,
             adapt: Callable[[Net], nn.Module] | None = None) -> nn.Module:
    """The net `cfg` for `input_shape` and `num_classes` outputs, made into `adapt(net)` if given (a
    specialist's own head), with `weights`: a safetensors file or a state dict. Weights that do not fit
    are a ValueError naming `what` ("the generalist's weights") and the first tensor that differs."""
    net = build_net(cfg, input_shape, num_classes)
    net = adapt(net) if adapt is not None else net
    if not isinstance(weights, dict):
        what = f"{what} {weights}"
        weights = load_tensors(weights)
    expected = net.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{what} do not fit the configured net: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]} (were they trained with another net config?)")
    for key, tensor in expected.items():
        if tuple(weights[key].shape) != tuple(tensor.shape):
            raise ValueError(f"{what} do not fit the configured net: {key} has shape "
                             f"{tuple(weights[key].shape)}, the net expects {tuple(tensor.shape)} (were they "
                             f"trained with another net config or number of classes?)")
    net.load_state_dict(weights)
    return net
