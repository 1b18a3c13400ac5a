"""Stage `baselines`: the generalist's net trained from scratch for as long as the ensemble trained, so
that the ensemble's gain is not just more training.

- `compute`: as much training compute as the generalist and all the specialists together;
- `wall_clock`: as much as the generalist and the longest specialist, the ensemble's training time when
  every specialist has a worker of its own;
- `inference`: the generalist's net widened (or, where a width step overshoots, deepened) until its
  multiply-adds per example reach the ensemble's, measured on the validation set (the generalist, then
  the specialists active there past their shared blocks), trained for the `compute` budget's
  multiply-adds: the single network a user could afford instead of the ensemble at inference.

With an imported generalist (`generalist.checkpoint`) its own training compute is unknown, and the
question is another: specialists, or more training? Each baseline is then that generalist trained on,
with its recipe, for the specialists' compute (`compute`: all of theirs; `wall_clock`: the longest one's).

The baselines are independent: the launcher trains them in parallel, as it does the specialists, each
resuming from its last checkpoint; a baseline whose `metrics.json` exists is done.

Compute is counted in training examples, weighted by each net's multiply-adds per example relative to
the generalist's. A specialist's forward passes outside its training steps count too, each a third of a
training example (forward and backward): they are a large share where specialists train on few
examples (Omniglot). A budget is rounded up to whole epochs of the examples an epoch trains on (the last
partial batch is dropped), so a baseline never trains for less.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ensemble.config import Config, NetConfig, from_dict, specialist_net_config
from ensemble.cost import multiply_adds
from ensemble.data import Data, load_data
from ensemble.launch import Store, run_tasks, task_folder
from ensemble.layout import RunDir
from ensemble.metrics import classification_metrics
from ensemble.nets import BUILT_IN, build_net, load_net
from ensemble.parallel import check_workers, train_storage
from ensemble.rundir import load_tensors, read_json, read_trained, save_tensors, save_trained, trained_metrics, write_json
from ensemble.train import predict_logits, resolve_device
from generalist import train_generalist
from specialists import (active_shares, branch_costs, ensemble_multiply_adds, front_macs, load_specialists, make_head,
                         shared_blocks, widen)

FORWARD_SHARE = 1 / 3  # a forward pass is about a third of a training step (backward costs twice forward)
TITLES = {"compute": "equal-compute generalist", "wall_clock": "equal-wall-clock generalist",
          "inference": "equal-inference-cost generalist"}
TRAINED_ON = {"compute": "generalist trained on for the specialists' compute",
              "wall_clock": "generalist trained on for the longest specialist's compute",
              "inference": "generalist widened to the ensemble's inference cost, trained on for the specialists' compute"}
DEEPER = 2  # the equal-inference-cost net may have up to this many more layers per stage than the generalist
OVERSHOOT = 1.1  # ... where widening alone would overshoot the ensemble's multiply-adds by more than this factor


@dataclass(frozen=True)
class Budget:
    """One baseline: the budget it matches, the epochs it trains for, what it is called, and its net."""

    name: str
    epochs: int
    title: str
    net: NetConfig


def run(run_dir: Path, cfg: Config) -> dict:
    """Train one generalist per `baselines.budgets` on the launcher; write each one's weights, test
    predictions and metrics, and `report.json` with the budgets in epochs."""
    paths = RunDir(run_dir)
    data = load_data(cfg.data)
    general, specialists = training_compute(run_dir, cfg, data)
    epochs = budgets(general, specialists, epoch_examples(cfg, data))
    imported = cfg.generalist.checkpoint is not None
    titles = TRAINED_ON if imported else TITLES
    start = load_tensors(paths.generalist.weights) if imported else None
    nets = {name: cfg.generalist.net for name in epochs}
    sizing = {}
    if "inference" in trained_budgets(cfg):
        target, base = inference_target(run_dir, cfg, data)
        nets["inference"], macs = equal_inference_net(cfg.generalist.net, data.input_shape, data.num_classes, target,
                                                      deeper=0 if imported else DEEPER)
        epochs["inference"] = epochs["compute"] * base / macs  # the compute budget's multiply-adds
        sizing = {"ensemble_multiply_adds": target, "inference_multiply_adds": macs,
                  "inference_net": dataclasses.asdict(nets["inference"])}
    jobs = [Budget(name, max(1, math.ceil(epochs[name] - 1e-9)), titles[name], nets[name])
            for name in trained_budgets(cfg)]
    todo = [job for job in jobs if trained_metrics(paths.baseline(job.name), job.title) is None]
    started = time.time()
    run_tasks(train_baseline, todo, (data, cfg, start, train_storage(cfg, "baselines")), cfg.launch,
              lambda job, row: _save(paths, job, row), checkpoints=paths.stage("baselines"),
              device=resolve_device(cfg.device), desc="baselines", in_driver=cfg.generalist.train.workers > 1)
    rows = [{**read_trained(paths.baseline(job.name)), "budget_epochs": epochs[job.name]} for job in jobs]
    for row in rows:
        print(f"{row['system']}: {row['epochs']} epochs, test top-1 {row['test_top1']:.4f}", flush=True)
    write_json(paths.baselines_report, {"budget_epochs": epochs, "baselines": rows, **sizing,
                                        "wall_seconds": round(time.time() - started, 2)})
    return {f"{r['budget']}_top1": r["test_top1"] for r in rows} | {f"{k}_epochs": v for k, v in epochs.items()}


def train_baseline(job: Budget, checkpoint: bytes | None, store: Store, device: torch.device, data: Data,
                   cfg: Config, start: dict[str, torch.Tensor] | None, storage: str) -> dict:
    """A launcher task: the generalist's net trained for `job.epochs` with the generalist's recipe (on its
    Ray Train workers, checkpoints in `storage`), afresh or on from `start` (an imported generalist's
    weights); returns its weights, history, test predictions and metrics. A budget is a number of epochs:
    under the generalist's `epochs: auto` a baseline runs them all, its schedule spanning them, and under
    `schedule: plateau` it keeps its best epoch on validation, as the generalist does."""
    data.check_readable()
    train = dataclasses.replace(cfg.generalist.train, epochs=job.epochs)
    shape, classes = data.input_shape, data.num_classes
    if start is not None and job.net != cfg.generalist.net:  # the imported generalist, with room to grow
        start = widen(load_net(cfg.generalist.net, shape, classes, start, "the generalist's weights"),
                      build_net(job.net, shape, classes)).state_dict()
    own = dataclasses.replace(cfg, generalist=dataclasses.replace(cfg.generalist, net=job.net))
    with task_folder(job.name, checkpoint, store) as folder:
        net, history = train_generalist(own, data, train, folder.folder, device, job.title,
                                        on_epoch=folder.on_epoch, start=start, storage=storage)
    logits = predict_logits(net, data.x_test, device=device, batch_size=train.eval_batch_size,
                            channels_last=train.channels_last)
    metrics = {"budget": job.name, "system": job.title, "epochs": job.epochs, "net": dataclasses.asdict(job.net),
               "multiply_adds": multiply_adds(net, shape),
               **classification_metrics(logits, data.y_test, "test_"),
               "train_seconds": round(sum(r["seconds"] for r in history), 2), "device": str(device)}
    return {"weights": {k: v.detach().cpu() for k, v in net.state_dict().items()}, "history": history,
            "test_pred": logits.argmax(dim=1), "metrics": metrics}


def _save(paths: RunDir, job: Budget, result: dict) -> None:
    """Write a finished baseline: its test predictions, then weights, history and metrics (last: they
    mark it done)."""
    folder = paths.baseline(job.name)
    save_tensors(folder.predictions, {"test_pred": result["test_pred"]})
    save_trained(folder, result["weights"], result["history"], result["metrics"])


def check(cfg: Config) -> None:
    """`baselines.budgets` names each budget once (the config checks the names); the generalist's
    `train.workers`, with which they train, can run."""
    names = cfg.baselines.budgets
    if len(set(names)) != len(names):
        raise ValueError(f"baselines.budgets must be distinct, got {names}")
    if len(trained_budgets(cfg)) < len(names):
        print(f"warning: baselines.budgets: inference widens the generalist's net, which is defined for the built-in "
              f"nets ({', '.join(BUILT_IN)}), not for {cfg.generalist.net.name}: that rival is left out (set "
              "baselines.budgets=[compute,wall_clock] to say so)", file=sys.stderr, flush=True)
    if names:
        check_workers(cfg.generalist.train, "generalist.train", cfg.launch)


def trained_budgets(cfg: Config) -> list[str]:
    """`baselines.budgets` without `inference` where the generalist's net is not built in (no width to widen)."""
    return [b for b in cfg.baselines.budgets if b != "inference" or cfg.generalist.net.name in BUILT_IN]


def budgets(general: float, specialists: list[float], per_epoch: int) -> dict[str, float]:
    """Each budget in epochs of `per_epoch` examples, from the training compute of the generalist and of
    each specialist (in examples at the generalist's cost): all the specialists' for `compute`, the
    largest one's for `wall_clock`."""
    return {"compute": (general + sum(specialists)) / per_epoch,
            "wall_clock": (general + max(specialists, default=0)) / per_epoch}


def inference_target(run_dir: Path, cfg: Config, data: Data) -> tuple[float, int]:
    """The ensemble's multiply-adds per example on the validation set (the generalist's, then each
    specialist's own blocks where it is active at the first `combine.top_n`), and the generalist's."""
    specialists = load_specialists(run_dir, cfg)
    generalist = load_net(cfg.generalist.net, data.input_shape, data.num_classes, RunDir(run_dir).generalist.weights,
                          "the generalist's weights")
    shares = active_shares(generalist, specialists.subsets, cfg.combine.top_n[0], data.x_val,
                           device=resolve_device(cfg.device), batch_size=cfg.generalist.train.eval_batch_size,
                           channels_last=cfg.generalist.train.channels_last)
    costs = branch_costs(generalist, specialists.nets, shared_blocks(cfg.specialists, cfg.generalist.net),
                         data.input_shape)
    return ensemble_multiply_adds(costs, shares), costs[0]


def equal_inference_net(net: NetConfig, input_shape: tuple[int, int, int], num_classes: int, target: float,
                        deeper: int = DEEPER) -> tuple[NetConfig, int]:
    """`net` made wider until its multiply-adds per example reach `target`, and those multiply-adds: the
    narrowest width that does, where it stays within OVERSHOOT of the target (a widened net can start
    from the generalist's weights); else the cheapest that reaches it at up to `deeper` more layers per
    stage (a width step costs about 2/width: 25% at width 8 for a CNN). Built-in nets only (`check`)."""
    def cost(width: int, depth: int) -> int:
        return multiply_adds(build_net(dataclasses.replace(net, width=width, depth=depth), input_shape, num_classes),
                             input_shape)

    def narrowest(depth: int) -> tuple[int, NetConfig]:
        low, high = net.width, net.width
        while cost(high, depth) < target:  # double, then bisect for the narrowest width that reaches it
            low, high = high, high * 2
        while low < high:
            mid = (low + high) // 2
            low, high = (mid + 1, high) if cost(mid, depth) < target else (low, mid)
        return cost(high, depth), dataclasses.replace(net, width=high, depth=depth)

    macs, wide = narrowest(net.depth)
    if macs <= OVERSHOOT * target:
        return wide, macs
    macs, best = min((narrowest(d) for d in range(net.depth, net.depth + deeper + 1)), key=lambda c: c[0])
    return best, macs


def epoch_examples(cfg: Config, data: Data) -> int:
    """The training examples a generalist epoch trains on (the last partial batch is dropped)."""
    batch = cfg.generalist.train.batch_size
    return len(data.x_train) // batch * batch


def training_compute(run_dir: Path, cfg: Config, data: Data) -> tuple[int, list[float]]:
    """The training compute in examples at the generalist's cost: the generalist's training examples,
    and each specialist's, weighted by its multiply-adds per example relative to the generalist's, with
    its forward passes besides:
    - its start (`start_macs` of its head): the generalist's (widened to the specialist's width) over
      a sample of the training set to fit the dustbin row or, with `specialists.head: full`, the plain
      generalist's over the whole training set for the soft targets;
    - its trained net's and its start's over the validation set (the choice between them, the dustbin
      correction, its report).
    A specialist that shares the generalist's first blocks (`branch_at`, `freeze_trunk`) runs them
    forward only in its training steps: they count a third. Left out as small: the dustbin row's own fit
    and diagnostics on the sample's features, the per-epoch validation of `epochs: auto`, and with
    `combine.method: auto` the combiner stage's pass of each specialist over the validation set."""
    general, examples = training_examples(run_dir)
    shape = data.input_shape
    generalist = load_net(cfg.generalist.net, shape, data.num_classes, RunDir(run_dir).generalist.weights,
                          "the generalist's weights")
    base = multiply_adds(generalist, shape)
    widened = multiply_adds(build_net(specialist_net_config(cfg), shape, data.num_classes), shape)
    front = front_macs(generalist, shared_blocks(cfg.specialists, cfg.generalist.net), shape)
    specialists = load_specialists(run_dir, cfg)
    n = len(data.x_train)
    costs = []
    for e, net, subset in zip(examples, specialists.nets, specialists.subsets, strict=True):
        macs = multiply_adds(net, shape)
        costs.append((e * (macs - (1 - FORWARD_SHARE) * front) + FORWARD_SHARE * 2 * len(data.x_val) * macs
                      + FORWARD_SHARE * make_head(cfg.specialists, subset).start_macs(n, base, widened)) / base)
    return general, costs


def training_examples(run_dir: Path) -> tuple[int, list[int]]:
    """The training examples the generalist and each specialist processed (their `metrics.jsonl`), the
    specialists in head order."""
    paths = RunDir(run_dir)
    count = len(read_json(paths.specialists_subsets)["subsets"])
    return examples(paths.generalist.history), [examples(paths.specialist(m).history) for m in range(count)]


def examples(history: Path) -> int:
    """The training examples a `metrics.jsonl` records."""
    rows = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
    if any("examples" not in r for r in rows):
        raise ValueError(f"{history} does not count its training examples (an older version wrote it): "
                         f"rerun that stage")
    return sum(r["examples"] for r in rows)


def baseline_rows(run_dir: Path) -> list[dict]:
    """The baselines stage's report rows, shortest training first; on a tie the equal-compute one last,
    as the bar the verdict names."""
    rows = read_json(RunDir(run_dir).baselines_report)["baselines"]
    return sorted(rows, key=lambda r: (r["epochs"], r["budget"] == "compute"))


def baseline_title(row: dict) -> str:
    """A baseline as the reports name it: what it is, its net where it is not the generalist's, its epochs."""
    net = row.get("net")
    shape = f"{net['name']} width {net['width']} depth {net['depth']}, " if row["budget"] == "inference" else ""
    return f"{row['system']} ({shape}{row['epochs']} epochs)"


def load_baseline(run_dir: Path, cfg: Config, data: Data, budget: str) -> torch.nn.Module:
    """A trained baseline of a run, rebuilt from its net (its metrics name it) and weights."""
    folder = RunDir(run_dir).baseline(budget)
    net = read_json(folder.metrics).get("net")
    net = cfg.generalist.net if net is None else from_dict(NetConfig, net)
    return load_net(net, data.input_shape, data.num_classes, folder.weights, f"the {budget} baseline's weights")
