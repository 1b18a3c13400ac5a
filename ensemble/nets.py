"""Networks by name. Each is `head(trunk(x))`: `trunk` maps images to features, `head` is the final
nn.Linear, which the specialists replace (their classes plus a dustbin).

`net.name` is one of the built-in nets (`mlp`, `cnn`, `resnet`), `torchvision:<builder>` (any
classification model of torchvision.models, built with `num_classes` and `net.kwargs`), or
`<module.path>:<callable>`, a factory called as `factory(num_classes=..., input_shape=(C, H, W),
**kwargs)` that returns an nn.Module. For a model that is not built in, the head is the nn.Linear whose
output is the model's output (found by running it once), or the one `net.head` names; the trunk is the
model with that layer replaced by nn.Identity.

A net's trunk is a sequence of blocks, the unit `specialists.branch_at` shares: an MLP's hidden layers, the
CNN's four stages, the ResNet's three (the stem with the first); any other model's whole trunk is one block,
and it can be cut after a named module instead (`split_at`: `layer3` of a torchvision ResNet).
`front(x, k)` runs the first k blocks (or the trunk up to module k), `back(h, k)` the rest and the head:
back(front(x, k), k) = net(x).

Inputs are float images in [0, 1], shaped (N, C, H, W); each net normalises them with per-channel
statistics of its training data, kept as buffers so that saved weights are self-contained. Gray images
(one channel) into a model whose first convolution takes more are repeated over its channels after
normalisation: what a gray photograph looks like to an RGB model, and the pretrained filters unchanged.
"""
from __future__ import annotations

import difflib
import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import fx, nn

from .config import DataConfig, NetConfig
from .data import Images, channel_stats, image_batches, load_data
from .rundir import load_tensors

BUILT_IN = ("mlp", "cnn", "resnet")


class Net(nn.Module):
    """A trunk and a linear head; `forward` gives logits. `model_channels` (default: the images'): the
    channels the trunk's first layer takes, when the images are gray and it takes more. `head_path`: for
    a model that is not built in, where the model kept its head (its own weight files name it so).
    `block_ends`: where each block of an nn.Sequential trunk ends (default: the whole trunk is one)."""

    def __init__(self, trunk: nn.Module, head: nn.Linear, in_channels: int, model_channels: int | None = None,
                 head_path: str | None = None, block_ends: tuple[int, ...] | None = None):
        super().__init__()
        self.register_buffer("input_mean", torch.full((1, in_channels, 1, 1), 0.5))
        self.register_buffer("input_std", torch.full((1, in_channels, 1, 1), 0.5))
        self.trunk = trunk
        self.head = head
        self.model_channels = model_channels or in_channels
        self.head_path = head_path
        self.block_ends = block_ends
        self._splits: dict[str, tuple[nn.Module, nn.Module]] = {}  # split_at's graphs, by module name

    @property
    def num_blocks(self) -> int:
        return 1 if self.block_ends is None else len(self.block_ends)

    def blocks(self, k: int | str) -> tuple[nn.Module, nn.Module]:
        """The trunk's first `k` blocks and the rest, as two modules (sharing this net's layers). A name
        `k` cuts a net that is not built in after that module of its model (`split_at`)."""
        if isinstance(k, str):
            if self.block_ends is not None:
                raise ValueError(f"a built-in net is cut after a number of blocks (0 to {self.num_blocks}), not "
                                 f"after a module name ({k!r})")
            if k not in self._splits:
                self._splits[k] = split_at(self.trunk, k)
            return self._splits[k]
        if not 0 <= k <= self.num_blocks:
            raise ValueError(f"this net has {self.num_blocks} blocks; {k} asked for")
        if self.block_ends is None:
            return (nn.Identity(), self.trunk) if k == 0 else (self.trunk, nn.Identity())
        end = self.block_ends[k - 1] if k else 0
        return self.trunk[:end], self.trunk[end:]

    def front(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """The first `k` blocks on images `x` (the input normalisation is part of the first)."""
        return self.blocks(k)[0](self._normalised(x))

    def back(self, h: torch.Tensor, k: int) -> torch.Tensor:
        """The logits from `front(x, k)`: the blocks after the first `k`, then the head."""
        return self.head(self.blocks(k)[1](h))

    def _apply(self, fn, recurse=True):
        """.to(), .half() and the like, after which `split_at`'s graphs are traced again: a graph keeps the
        tensors it reads by attribute as they were."""
        self._splits.clear()
        return super()._apply(fn, recurse)

    def _normalised(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.input_mean) / self.input_std
        if x.shape[1] != self.model_channels:  # gray into an RGB model: the same image in every channel
            x = x.expand(-1, self.model_channels, -1, -1)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(self._normalised(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def set_input_stats(self, images: Images) -> None:
        """Set the normalisation from uint8 training images (N, C, H, W): all of them in memory, a
        sample of a streamed set (`channel_stats`)."""
        mean, std = channel_stats(images)
        self.input_mean.copy_(mean)
        self.input_std.copy_(std.clamp_min(1e-3))


def split_at(model: nn.Module, path: str) -> tuple[nn.Module, nn.Module]:
    """`model` cut after its module `path` (a name of `named_modules()`) into two torch.fx graphs that share
    its layers: the model up to that module's output, and the rest, which takes that output. A ValueError
    where there is no such module, it does not run exactly once, the model cannot be traced, or a layer
    after it also reads something computed before it (a skip connection across the cut)."""
    names = [name for name, _ in model.named_modules() if name]
    if path not in names:
        close = difflib.get_close_matches(path, names, n=3)
        raise ValueError(f"the model has no module {path!r}" + (f" (did you mean {', '.join(close)}?)" if close
                                                                else f" (its modules: {', '.join(names[:8])}, ...)"))

    class Tracer(fx.Tracer):  # the module at `path` stays one call, whatever it holds
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return qualname == path or super().is_leaf_module(m, qualname)

    try:
        graph = Tracer().trace(model)
    except Exception as e:
        raise ValueError(f"the model cannot be cut: torch.fx cannot trace it ({type(e).__name__}: {e})") from None
    nodes = list(graph.nodes)
    calls = [n for n in nodes if n.op == "call_module" and n.target == path]
    if len(calls) != 1:
        raise ValueError(f"{path} runs {len(calls)} times in the model's forward pass; a cut needs a module that "
                         "runs once")
    cut = nodes.index(calls[0])
    before = set(nodes[:cut])
    for node in nodes[cut + 1:]:
        early = [a for a in node.all_input_nodes if a in before and a.op != "get_attr"]
        if early:
            raise ValueError(f"{path} is not a place to cut the model: {node.target} after it also reads "
                             f"{early[0].target}, from before it")
    front, back = fx.Graph(), fx.Graph()
    copied: dict[fx.Node, fx.Node] = {}
    for node in nodes[:cut + 1]:
        copied[node] = front.node_copy(node, copied.__getitem__)
    front.output(copied[calls[0]])
    later: dict[fx.Node, fx.Node] = {calls[0]: back.placeholder("h")}

    def arg(node: fx.Node) -> fx.Node:  # a parameter read by attribute before the cut is read again after it
        if node not in later:
            later[node] = back.node_copy(node)
        return later[node]

    for node in nodes[cut + 1:]:
        later[node] = back.node_copy(node, arg)
    return fx.GraphModule(model, front, "Front"), fx.GraphModule(model, back, "Back")


def build_net(cfg: NetConfig, input_shape: tuple[int, int, int], num_classes: int, key: str = "net") -> Net:
    """The network `cfg.name`, freshly initialised, for inputs of `input_shape` (C, H, W) and
    `num_classes` outputs. A net that cannot be built is a ValueError naming the config `key`."""
    if cfg.name in BUILT_IN:
        if cfg.kwargs or cfg.head:
            raise ValueError(f"{key}: the built-in net {cfg.name} takes width, depth and dropout; kwargs and head "
                             "are for torchvision builders and factories")
        trunk, dim, ends = {"mlp": _mlp, "cnn": _cnn, "resnet": _resnet}[cfg.name](cfg, input_shape)
        return Net(trunk, nn.Linear(dim, num_classes), in_channels=input_shape[0], block_ends=ends)
    model = _model(cfg, input_shape, num_classes, key)
    channels = _first_conv_channels(model) or input_shape[0]
    if channels != input_shape[0] and input_shape[0] != 1:
        raise ValueError(f"{key}.name: {cfg.name}'s first convolution takes {channels} channels, the images "
                         f"have {input_shape[0]} (only gray images are adapted, by repeating them)")
    path = cfg.head or find_head(model, (channels, *input_shape[1:]), num_classes, key, cfg.name)
    head = _linear_at(model, path, num_classes, key)
    model.set_submodule(path, nn.Identity())
    return Net(model, head, in_channels=input_shape[0], model_channels=channels, head_path=path)


def _model(cfg: NetConfig, input_shape: tuple[int, int, int], num_classes: int, key: str) -> nn.Module:
    """The model of a torchvision builder or a user's factory, with `num_classes` outputs."""
    kind, sep, name = cfg.name.partition(":")
    if not sep or not kind or not name:
        raise ValueError(f"{key}.name: {cfg.name!r} is not a built-in net ({', '.join(BUILT_IN)}), "
                         f"'torchvision:<builder>' or '<module.path>:<callable>'")
    if kind == "torchvision":
        builder, kwargs = torchvision_builder(name, key), {"num_classes": num_classes, **cfg.kwargs}
    else:
        builder, kwargs = _factory(kind, name, key), {"num_classes": num_classes, "input_shape": tuple(input_shape),
                                                     **cfg.kwargs}
    try:
        model = builder(**kwargs)
    except Exception as e:
        raise ValueError(f"{key}.name: {cfg.name}(**{kwargs}) raised {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"{key}.name: {cfg.name} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def torchvision_builder(name: str, key: str = "net") -> Callable[..., nn.Module]:
    """torchvision's classification model builder `name`; an unknown one is a ValueError with the closest
    names."""
    import torchvision.models

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else f" (known: {', '.join(sorted(known)[:12])}, ...)"
        raise ValueError(f"{key}.name: torchvision has no classification model {name!r}{hint}")
    return torchvision.models.get_model_builder(name)


def _factory(module: str, attribute: str, key: str) -> Callable[..., nn.Module]:
    """The callable `attribute` of `module`, imported from the working directory or the installed
    packages."""
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        found = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"{key}.name: cannot import module {module!r} ({e}); it must be importable from "
                         f"the working directory or the installed packages") from None
    factory = getattr(found, attribute, None)
    if not callable(factory):
        raise ValueError(f"{key}.name: module {module} has no callable {attribute!r}")
    return factory


def _first_conv_channels(model: nn.Module) -> int | None:
    """The input channels of the model's first convolution (None if it has none)."""
    conv = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    return None if conv is None else conv.in_channels


@torch.no_grad()
def find_head(model: nn.Module, input_shape: tuple[int, int, int], num_classes: int, key: str = "net",
              name: str = "the model") -> str:
    """The path (as in `named_modules`) of the nn.Linear whose output is the model's output, found by
    running the model once on a blank batch of two; a ValueError asking for `net.head` if there is none."""
    outputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda m, i, o, path=path: outputs.__setitem__(path, o))
             for path, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    training = model.training
    try:
        model.eval()
        out = model(torch.zeros(2, *input_shape))
    except Exception as e:
        raise ValueError(f"{key}.name: {name} fails on images of shape {tuple(input_shape)}: "
                         f"{type(e).__name__}: {e}") from None
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
    heads = [path for path, o in outputs.items() if isinstance(out, torch.Tensor) and o is out]
    if not heads:
        raise ValueError(f"{key}.head: no nn.Linear of {name} produces its {num_classes} class logits as its "
                         f"output; name the final linear layer with {key}.head (a path of named_modules())")
    return heads[-1]


def _linear_at(model: nn.Module, path: str, num_classes: int, key: str) -> nn.Linear:
    """The nn.Linear at `path` in `model`, with `num_classes` outputs."""
    try:
        layer = model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"{key}.head: the model has no submodule {path!r}") from None
    if not isinstance(layer, nn.Linear):
        raise ValueError(f"{key}.head: {path} is a {type(layer).__name__}, not an nn.Linear")
    if layer.out_features != num_classes:
        raise ValueError(f"{key}.head: {path} gives {layer.out_features} outputs, not the {num_classes} classes")
    return layer


def is_conv(net: nn.Module) -> bool:
    """Whether the net has 2-D convolutions (and so gains from the channels_last memory format)."""
    return any(isinstance(m, nn.Conv2d) for m in net.modules())


def block_count(cfg: NetConfig) -> int:
    """How many blocks the net `cfg` has (see `Net.blocks`): an MLP's hidden layers, the CNN's 4 stages,
    the ResNet's 3; any other model is one."""
    return {"mlp": cfg.depth, "cnn": 4, "resnet": 3}.get(cfg.name, 1)


def _mlp(cfg: NetConfig, shape: tuple[int, int, int]) -> tuple[nn.Module, int, tuple[int, ...]]:
    """The paper's MNIST nets: `depth` hidden layers of `width` ReLU units (2x800, 2x1200 + dropout), one
    block each."""
    layers: list[nn.Module] = [nn.Flatten()]
    dim = shape[0] * shape[1] * shape[2]
    ends = []
    for _ in range(cfg.depth):
        layers += [nn.Linear(dim, cfg.width), nn.ReLU(inplace=True), nn.Dropout(cfg.dropout)]
        dim = cfg.width
        ends.append(len(layers))
    return nn.Sequential(*layers), dim, tuple(ends)


def _conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def _cnn(cfg: NetConfig, shape: tuple[int, int, int]) -> tuple[nn.Module, int, tuple[int, ...]]:
    """A small CNN for 28x28: four stages of `depth` 3x3 conv-BN-ReLU (width w, 2w, 4w, 8w) with 2x2
    max-pooling between them (28 -> 14 -> 7 -> 3, so the last stage sees the whole image), global
    average pooling, dropout. A block is a stage (the pooling before it included, the last one's after)."""
    layers: list[nn.Module] = []
    c_in = shape[0]
    ends = []
    for stage, c_out in enumerate((cfg.width, 2 * cfg.width, 4 * cfg.width, 8 * cfg.width)):
        if stage:
            ends.append(len(layers))
            layers.append(nn.MaxPool2d(2))
        for _ in range(cfg.depth):
            layers += _conv_bn(c_in, c_out)
            c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(cfg.dropout)]
    return nn.Sequential(*layers), c_in, (*ends, len(layers))


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


def _resnet(cfg: NetConfig, shape: tuple[int, int, int]) -> tuple[nn.Module, int, tuple[int, ...]]:
    """A CIFAR-style ResNet for 32x32 and up: a 3x3 stem, three stages of `depth` basic blocks
    (width w, 2w, 4w; ResNet-20 is width 16, depth 3), global average pooling, dropout. A block (of
    `Net.blocks`) is a stage, the stem with the first and the pooling with the last."""
    layers: list[nn.Module] = _conv_bn(shape[0], cfg.width)
    c_in = cfg.width
    ends = []
    for stage, c_out in enumerate((cfg.width, 2 * cfg.width, 4 * cfg.width)):
        if stage:
            ends.append(len(layers))
        for block in range(cfg.depth):
            layers.append(_Block(c_in, c_out, stride=2 if stage and not block else 1))
            c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(cfg.dropout)]
    return nn.Sequential(*layers), c_in, (*ends, len(layers))


def load_net(cfg: NetConfig, input_shape: tuple[int, int, int], num_classes: int,
             weights: Path | dict[str, torch.Tensor], what: str,
             adapt: Callable[[Net], nn.Module] | None = None) -> nn.Module:
    """The net `cfg` for `input_shape` and `num_classes` outputs, made into `adapt(net)` if given (a
    specialist's own head), with `weights`: a weights file (`read_weights`) or a state dict, of the Net
    or, for a model that is not built in, of the model itself. Weights that do not fit are a ValueError
    naming `what` ("the generalist's weights") and the first tensor that differs, with both shapes."""
    net = build_net(cfg, input_shape, num_classes)
    net = adapt(net) if adapt is not None else net
    if not isinstance(weights, dict):
        what, weights = f"{what} {weights}", read_weights(weights, what)
    load_weights(net, weights, what)
    return net


def start_net(cfg: NetConfig, input_shape: tuple[int, int, int], num_classes: int, images: Images,
              key: str = "net") -> Net:
    """A net to train: `cfg` freshly built, its input normalisation set from the uint8 training `images`,
    started from `cfg.weights` if given (a file, or `torchvision`: the builder's default pretrained
    weights). A head of another number of classes in those weights is left out: the head starts fresh."""
    net = build_net(cfg, input_shape, num_classes, key)
    net.set_input_stats(images)
    if cfg.weights is not None:
        what = f"{key}.weights"
        state = torchvision_weights(cfg.name, key) if cfg.weights == "torchvision" else read_weights(
            Path(cfg.weights), what)
        load_weights(net, state, f"{what} {cfg.weights}", new_head=True)
    return net


def check_net(cfg: NetConfig, key: str, data: DataConfig) -> None:
    """Build `cfg` for the images of `data`, load its `weights` and run it once in training mode, so that
    a net that cannot be built, started or trained fails before any stage runs, with its config `key`.
    Built-in nets without weights always build: they are not tried (and the data is not loaded)."""
    if cfg.name in BUILT_IN and cfg.weights is None:
        return
    loaded = load_data(data)
    images, num_classes = next(image_batches(loaded.x_train, 2)), loaded.num_classes
    net = start_net(cfg, loaded.input_shape, num_classes, images, key).train()
    try:
        out = net(images.float() / 255)
    except Exception as e:  # GoogLeNet and Inception return a tuple of logits in training mode
        raise ValueError(f"{key}.name: {cfg.name} fails in training mode: {type(e).__name__}: {e} (a model "
                         "with auxiliary outputs needs net.kwargs {aux_logits: false})") from None
    if out.shape != (2, num_classes):
        raise ValueError(f"{key}.name: {cfg.name} gives outputs of shape {tuple(out.shape)} in training mode, "
                         f"not (batch, {num_classes})")


def torchvision_weights(name: str, key: str = "net") -> dict[str, torch.Tensor]:
    """The default pretrained weights of torchvision builder `name` (torchvision:<builder>), through its
    weights API: downloaded once into torch's hub cache ($TORCH_HOME/hub/checkpoints), loaded with
    weights_only=True."""
    from torchvision.models import get_model_weights

    kind, _, builder = name.partition(":")
    if kind != "torchvision":
        raise ValueError(f"{key}.weights: 'torchvision' takes the pretrained weights of a torchvision:<builder> "
                         f"net, not of {name}")
    torchvision_builder(builder, key)
    try:
        weights = get_model_weights(builder).DEFAULT
    except (ValueError, AttributeError, KeyError):
        raise ValueError(f"{key}.weights: torchvision has no pretrained weights for {builder}") from None
    try:
        return weights.get_state_dict(progress=True, weights_only=True)
    except OSError as e:  # no network, a full disk: say what was being fetched, and where from
        raise ValueError(f"{key}.weights: could not fetch torchvision's pretrained weights for {builder} from "
                         f"{weights.url} ({e}); put the file in $TORCH_HOME/hub/checkpoints or give a path") from None


def read_weights(path: Path, what: str = "weights") -> dict[str, torch.Tensor]:
    """A weights file: safetensors, or a PyTorch state dict (a mapping of names to tensors, or one under
    'state_dict' or 'model') loaded with weights_only=True, so that loading it runs no code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    if path.suffix != ".safetensors":
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            state = None
        if isinstance(state, dict):
            state = next((state[k] for k in ("state_dict", "model") if isinstance(state.get(k), dict)), state)
            if state and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
                return state
    try:
        return load_tensors(path)
    except ValueError:
        raise ValueError(f"{what}: {path} is neither a safetensors file nor a PyTorch state dict of tensors") from None


def load_weights(net: nn.Module, state: dict[str, torch.Tensor], what: str, new_head: bool = False) -> None:
    """Load `state` into `net` in place: the Net's own keys (a file this project saved), or for a model
    that is not built in its keys as the model names them (its trunk's and its head's; the input
    normalisation then stays the net's). With `new_head`, head tensors of another shape are left out."""
    head_path = getattr(net, "head_path", None)  # None: built in, or not a Net
    if "input_mean" not in state and head_path is not None:
        state = {("head." + k[len(head_path) + 1:] if k.startswith(head_path + ".") else "trunk." + k): v
                 for k, v in state.items()} | {k: v for k, v in net.state_dict().items() if k.startswith("input_")}
    expected = net.state_dict()
    state = {k: expected[k] for k in expected if k.endswith("num_batches_tracked")} | state  # older files lack them
    if new_head:
        skipped = [k for k, v in state.items() if k.startswith("head.") and k in expected
                   and tuple(v.shape) != tuple(expected[k].shape)]
        if skipped:
            print(f"{what}: its head {tuple(state[skipped[0]].shape)} is for another number of classes: the "
                  f"head starts fresh", flush=True)
        state = {k: v for k, v in state.items() if k not in skipped} | {k: expected[k] for k in skipped}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{what} do not fit the configured net: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]} (were they trained with another net config?)")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise ValueError(f"{what} do not fit the configured net: {key} has shape "
                             f"{tuple(state[key].shape)}, the net expects {tuple(tensor.shape)} (were they "
                             f"trained with another net config or number of classes?)")
    net.load_state_dict(state)
