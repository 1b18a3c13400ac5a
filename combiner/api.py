"""`Combiner`: a generalist and its specialists used as one classifier, from Python.

    from combiner import Combiner
    ensemble = Combiner.from_run("runs/default")
    probs = ensemble.predict_proba(images)   # uint8 (N, C, H, W), or floats in [0, 1]
    labels = ensemble.predict(images)
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ensemble.config import Config, run_config
from ensemble.layout import RunDir
from ensemble.metrics import active_table
from ensemble.nets import Net, load_net
from ensemble.rundir import read_json
from ensemble.train import exact_float32, resolve_device
from specialists import branch_costs, ensemble_multiply_adds, ensemble_parameters, load_specialists, own_net, shared_blocks

from .solver import MAX_ITER, Cells, Method, Outputs, _cells, _check_subsets, _combine


def _softmax(logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """softmax(logits) in `dtype`; float64 as four passes: torch's own float64 softmax kernel is about
    twice as slow on a CPU (1,000 classes) as subtracting the maximum, exp, sum and divide."""
    if dtype != torch.float64:
        return logits.softmax(dim=1).to(dtype)
    p = logits.double()
    p -= p.amax(dim=1, keepdim=True)
    p.exp_()
    p /= p.sum(dim=1, keepdim=True)
    return p


class Combiner:
    """Runs the generalist on a batch, picks each example's active specialists (those whose subset
    holds one of its `top_n` most probable classes), runs each specialist only on the examples that
    need it, and returns the combiner's q (see `combine`). Specialists that branch off the generalist
    after its first `shared_blocks` blocks (`specialists.branch_at`) start from the generalist's output
    of those blocks, computed once per example."""

    def __init__(self, generalist: nn.Module, specialists: Sequence[nn.Module], subsets: Sequence[Sequence[int]],
                 *, top_n: int | None = 1, method: Method = "fixed_point", device: str | torch.device = "cpu",
                 input_shape: tuple[int, int, int] | None = None, shared_blocks: int | str = 0):
        """`input_shape`: the (C, H, W) of the images the nets were trained on, which `predict_proba`
        checks its inputs against (`from_run` knows it). `shared_blocks`: how many of the generalist's
        blocks every specialist holds unchanged, or the module of a torchvision or factory net up to which
        they do (`specialists.branch_at`; a ValueError where one does not)."""
        if len(specialists) != len(subsets):
            raise ValueError(f"{len(specialists)} specialists but {len(subsets)} subsets")
        self.input_shape = None if input_shape is None else tuple(input_shape)
        self.device = resolve_device(str(device))
        self.generalist = generalist.to(self.device).eval()
        self.specialists = [net.to(self.device).eval() for net in specialists]
        self.shared_blocks = shared_blocks
        if shared_blocks:
            _check_shared(self.generalist, self.specialists, shared_blocks)
        self.subsets = [torch.as_tensor(list(s), dtype=torch.int64, device=self.device) for s in subsets]
        self.top_n, self.method = top_n, method
        self._checked: int | None = None  # the number of classes the subsets were checked against
        self._cells: dict[torch.dtype, Cells] = {}  # the subsets' cells, for the KL combiner
        self._costs: dict[tuple[int, ...], tuple[int, list[int]]] = {}  # `branch_costs` per input shape

    @classmethod
    def from_run(cls, run_dir: str | Path, **kwargs) -> Combiner:
        """The generalist and specialists a run directory holds (its specialists stage must be done),
        combined as its config says (the first `combine.top_n`, `combine.method`) unless `kwargs` say
        otherwise."""
        cfg = run_config(run_dir)
        if "method" not in kwargs:
            kwargs["method"] = combine_method(run_dir, cfg)
        kwargs = {"top_n": cfg.combine.top_n[0], **kwargs}
        ensemble = load_ensemble(run_dir, cfg)
        return cls(ensemble.generalist, ensemble.specialists, ensemble.subsets, input_shape=ensemble.input_shape,
                   shared_blocks=ensemble.shared_blocks, **kwargs)

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """q (N, C) in float32 for images `x`: uint8 (N, C, H, W), or floats in [0, 1]; anything else is
        a ValueError that says what was expected. Combined in float64 or float32 (see `outputs`)."""
        p_general, outputs = self.outputs(x)
        return self.combine(p_general, outputs, overwrite=True).float()

    def combine(self, p_general: torch.Tensor, outputs: Outputs, method: Method | None = None,
                overwrite: bool = False) -> torch.Tensor:
        """q for what `outputs` returned, by `method` (default the Combiner's): `combine_active` without
        checking its inputs again, the subsets' cells computed once per dtype (at 100,000 classes that
        takes longer than combining a batch)."""
        if p_general.dtype not in self._cells:
            self._cells[p_general.dtype] = _cells(self.subsets, p_general)
        return _combine(p_general, outputs, self.subsets, method or self.method, None, MAX_ITER, overwrite=overwrite,
                        cells=self._cells[p_general.dtype])

    @torch.no_grad()
    def outputs(self, x: torch.Tensor, top_n: int | None | str = "own", dtype: torch.dtype | None = None
                ) -> tuple[torch.Tensor, Outputs]:
        """The generalist's probabilities (N, C) for images `x`, and each specialist's on the examples it
        is active for (`top_n`, by default the Combiner's): (rows, probabilities) as `combine_active`
        takes them. The ensemble's inference: the generalist on every example, a specialist only where
        it is active.

        The nets run in float32 (no TF32 on a GPU, as the evaluation's predictions); their softmaxes in
        `dtype`, by default float64 for the KL combiner, which divides by a subset's outside mass
        (probabilities far below float32's 1e-38 keep their ratios), and float32 for the within-subset
        rule, which moves mass only inside active subsets (each holding a top class: at least 1/C of
        the mass) and so computes nothing float32 cannot hold."""
        if dtype is None:
            dtype = torch.float32 if self.method == "within_subset" else torch.float64
        x = self._images(x).to(self.device)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        k = self.shared_blocks
        with exact_float32(self.device):
            h = self.generalist.front(x, k) if k else x  # the shared blocks, once per example
            logits = self.generalist.back(h, k) if k else self.generalist(x)
            if self._checked != logits.shape[1]:  # the subsets against the generalist's classes, once
                _check_subsets(self.subsets, logits)
                self._checked = logits.shape[1]
            top_n = self.top_n if top_n == "own" else top_n
            active = active_table(logits, self.subsets, top_n).bool()  # the top classes: those of the probabilities
            outputs = []
            for net, subset, needed in zip(self.specialists, self.subsets, active):
                rows = needed.nonzero()[:, 0]
                if not len(rows):
                    outputs.append((rows, logits.new_zeros(0, len(subset) + 1, dtype=dtype)))
                    continue
                outputs.append((rows, _softmax(net.back(h[rows], k) if k else net(x[rows]), dtype)))
        return _softmax(logits, dtype), outputs

    def parameter_count(self) -> int:
        """The ensemble's parameters: the generalist's and each specialist's own (the shared blocks once)."""
        return ensemble_parameters(self.generalist, self.specialists, self.shared_blocks)

    def multiply_adds(self, active_share: Sequence[float], input_shape: tuple[int, int, int] | None = None) -> float:
        """The ensemble's multiply-adds per example where specialist m is active for a share
        `active_share[m]` of the examples (`ensemble_multiply_adds`; the nets counted once per shape)."""
        shape = tuple(input_shape or self.input_shape or ())
        if not shape:
            raise ValueError("multiply_adds needs the images' input_shape (C, H, W)")
        if shape not in self._costs:
            self._costs[shape] = branch_costs(self.generalist, self.specialists, self.shared_blocks, shape)
        return ensemble_multiply_adds(self._costs[shape], active_share)

    def _images(self, x: torch.Tensor) -> torch.Tensor:
        """`x` if it is a batch of images the nets can take, else a ValueError saying what they take."""
        x = torch.as_tensor(x)
        expected = "(N, C, H, W)" if self.input_shape is None else f"(N, {', '.join(map(str, self.input_shape))})"
        if x.dim() != 4:
            raise ValueError(f"images must be a batch {expected} (channels first), got shape {tuple(x.shape)}")
        if self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"the ensemble was trained on images of shape {expected} (channels first), "
                             f"got {tuple(x.shape)}: resize them to it")
        if x.dtype != torch.uint8 and not x.is_floating_point():
            raise ValueError(f"images must be uint8 (0..255) or floats in [0, 1], got {x.dtype}")
        if x.is_floating_point() and x.numel() and not (x.min() >= 0 and x.max() <= 1):
            raise ValueError(f"float images must lie in [0, 1], got values in [{x.min().item():g}, "
                             f"{x.max().item():g}]: divide them by 255, or pass uint8")
        return x

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The most probable class of each image under q."""
        return self.predict_proba(x).argmax(dim=1)


def combine_method(run_dir: Path, cfg: Config) -> Method:
    """The run's combiner: `combine.method`, or for `auto` the one its combiner stage chose on validation."""
    if cfg.combine.method != "auto":
        return cfg.combine.method
    path = RunDir(run_dir).evaluation
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} uses combine.method=auto, which its combiner stage resolves: run "
                                f"`ensemble run` or `ensemble stage combiner` for it first")
    return read_json(path)["method"]


def _check_shared(generalist: nn.Module, specialists: Sequence[nn.Module], k: int | str) -> None:
    """Every specialist's first `k` blocks (or its layers up to module `k`) and input normalisation hold the
    generalist's tensors: a ValueError naming the first specialist and tensor that differ."""
    if not isinstance(generalist, Net) or isinstance(k, int) and not 0 <= k <= generalist.num_blocks:
        raise ValueError(f"shared_blocks={k}: the generalist has no such blocks (an ensemble.nets.Net with "
                         f"{getattr(generalist, 'num_blocks', 0)} blocks shares at most that many)")
    try:
        own = _front_state(generalist, k)
    except ValueError as e:
        raise ValueError(f"shared_blocks={k!r}: {e}") from None
    shared = f"first {k} blocks" if isinstance(k, int) else f"layers up to {k}"
    for m, specialist in enumerate(specialists):
        theirs = _front_state(own_net(specialist), k)
        for name, tensor in own.items():
            if name not in theirs or not torch.equal(theirs[name], tensor):
                raise ValueError(f"specialist {m} does not share the generalist's {shared}: its {name} differs")


def _front_state(net: Net, k: int | str) -> dict[str, torch.Tensor]:
    """The tensors `net.front(x, k)` computes with."""
    return {"input_mean": net.input_mean, "input_std": net.input_std,
            **{f"trunk.{name}": t for name, t in net.blocks(k)[0].state_dict().items()}}


@dataclass(frozen=True)
class Ensemble:
    """A run's generalist and specialists (with their subsets), the image shape they take, and how many
    of the generalist's blocks the specialists share."""

    generalist: nn.Module
    specialists: list[nn.Module]
    subsets: list[list[int]]
    input_shape: tuple[int, int, int]
    shared_blocks: int | str


def load_ensemble(run_dir: Path, cfg: Config) -> Ensemble:
    """The generalist, the specialists and their subsets, as a run's specialists stage left them."""
    specialists = load_specialists(run_dir, cfg)
    generalist = load_net(cfg.generalist.net, specialists.input_shape, specialists.num_classes,
                          RunDir(run_dir).generalist.weights, "the generalist's weights")
    return Ensemble(generalist, specialists.nets, specialists.subsets, specialists.input_shape,
                    shared_blocks(cfg.specialists, cfg.generalist.net))
