"""`Combiner`: a generalist and its specialists used as one classifier, from Python.

    from combiner import Combiner
    ensemble = Combiner.from_run("runs/default")
    probs = ensemble.predict_proba(images)   # uint8 (N, C, H, W), or floats in [0, 1]
    labels = ensemble.predict(images)
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ensemble.config import Config, run_config
from ensemble.layout import RunDir
from ensemble.nets import load_net
from ensemble.rundir import read_json
from ensemble.train import resolve_device
from specialists import load_specialists
from specialists.heads import collapse

from .solver import Method, active_specialists, combine


class Combiner:
    """Runs the generalist on a batch, picks each example's active specialists (those whose subset
    holds one of its `top_n` most probable classes), runs each specialist only on the examples that
    need it, and returns the combiner's q (see `combine`)."""

    def __init__(self, generalist: nn.Module, specialists: Sequence[nn.Module], subsets: Sequence[Sequence[int]],
                 *, top_n: int | None = 1, method: Method = "fixed_point", device: str | torch.device = "cpu"):
        if len(specialists) != len(subsets):
            raise ValueError(f"{len(specialists)} specialists but {len(subsets)} subsets")
        self.device = resolve_device(str(device))
        self.generalist = generalist.to(self.device).eval()
        self.specialists = [net.to(self.device).eval() for net in specialists]
        self.subsets = [torch.as_tensor(list(s), dtype=torch.int64, device=self.device) for s in subsets]
        self.top_n, self.method = top_n, method

    @classmethod
    def from_run(cls, run_dir: str | Path, **kwargs) -> Combiner:
        """The generalist and specialists a run directory holds (its specialists stage must be done),
        combined as its config says (the first `combine.top_n`, `combine.method`) unless `kwargs` say
        otherwise."""
        cfg = run_config(run_dir)
        if "method" not in kwargs:
            kwargs["method"] = combine_method(run_dir, cfg)
        kwargs = {"top_n": cfg.combine.top_n[0], **kwargs}
        return cls(*load_ensemble(run_dir, cfg), **kwargs)

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """q (N, C) in float32 for images `x`: uint8 (N, C, H, W), or floats in [0, 1].

        The nets run in float32; their softmaxes and the combiner in float64 (probabilities far below
        float32's 1e-38 keep their ratios; the combiner costs little beside the nets)."""
        x = x.to(self.device)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        p_general = self.generalist(x).double().softmax(dim=1)
        active = active_specialists(p_general, self.subsets, self.top_n)  # (M, N) bool
        probs = []
        for net, subset, needed in zip(self.specialists, self.subsets, active):
            p = collapse(p_general, subset)  # stands in where the specialist is not active: ignored
            rows = needed.nonzero()[:, 0]
            if len(rows):
                p[rows] = net(x[rows]).double().softmax(dim=1)
            probs.append(p)
        return combine(p_general, probs, self.subsets, top_n=self.top_n, method=self.method).float()

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


def load_ensemble(run_dir: Path, cfg: Config) -> tuple[nn.Module, list[nn.Module], list[list[int]]]:
    """The generalist, the specialists and their subsets, as a run's specialists stage left them."""
    specialists = load_specialists(run_dir, cfg)
    generalist = load_net(cfg.generalist.net, specialists.input_shape, specialists.num_classes,
                          RunDir(run_dir).generalist.weights, "the generalist's weights")
    return generalist, specialists.nets, specialists.subsets
