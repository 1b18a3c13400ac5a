"""Stage `baselines`: the generalist's net trained from scratch for as long as the ensemble trained, so
that the ensemble's gain is not just more training.

- `compute`: as much training compute as the generalist and all the specialists together;
- `wall_clock`: as much as the generalist and the longest specialist, the ensemble's training time when
  every specialist has a worker of its own.

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
from pathlib import Path

from ensemble.config import Config, specialist_net_config
from ensemble.cost import multiply_adds
from ensemble.data import Data, load_data
from ensemble.nets import Net, build_net, load_weights
from ensemble.rundir import load_tensors, read_json, save_tensors, write_json
from ensemble.train import classification_metrics, predict_logits, resolve_device
from specialists import task
from specialists.combiner import load_ensemble

from .stage import train_generalist

NAME = "baselines"
FORWARD_SHARE = 1 / 3  # a forward pass is about a third of a training step (backward costs twice forward)
TITLES = {"compute": "equal-compute generalist", "wall_clock": "equal-wall-clock generalist"}


def run(run_dir: Path, cfg: Config) -> dict:
    """Train one generalist per `baselines.budgets`; write each one's weights and test predictions, and
    `report.json` with the budgets in epochs."""
    run_dir = Path(run_dir)
    out = run_dir / NAME
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(cfg.data)
    device = resolve_device(cfg.device)
    general, specialists = training_compute(run_dir, cfg, data)
    epochs = budgets(general, specialists, epoch_examples(cfg, data))
    rows = []
    for name in cfg.baselines.budgets:
        train = dataclasses.replace(cfg.generalist.train, epochs=math.ceil(epochs[name] - 1e-9))
        net, history = train_generalist(cfg, data, train, out / name, device, TITLES[name])
        save_tensors(out / name / "model.safetensors", net.state_dict())
        logits = predict_logits(net, data.x_test, device=device, batch_size=train.eval_batch_size,
                                channels_last=train.channels_last)
        save_tensors(out / name / "predictions.safetensors", {"test_pred": logits.argmax(dim=1)})
        rows.append({"budget": name, "system": TITLES[name], "epochs": train.epochs, "budget_epochs": epochs[name],
                     **classification_metrics(logits, data.y_test, "test_"),
                     "train_seconds": round(sum(r["seconds"] for r in history), 2)})
        print(f"{TITLES[name]}: {train.epochs} epochs, test top-1 {rows[-1]['test_top1']:.4f}", flush=True)
    write_json(out / "report.json", {"budget_epochs": epochs, "baselines": rows})
    return {f"{r['budget']}_top1": r["test_top1"] for r in rows} | {f"{k}_epochs": v for k, v in epochs.items()}


def check(cfg: Config) -> None:
    """`baselines.budgets` names each budget once (the config checks the names)."""
    budgets = cfg.baselines.budgets
    if len(set(budgets)) != len(budgets):
        raise ValueError(f"baselines.budgets must be distinct, got {budgets}")


def budgets(general: float, specialists: list[float], per_epoch: int) -> dict[str, float]:
    """Each budget in epochs of `per_epoch` examples, from the training compute of the generalist and of
    each specialist (in examples at the generalist's cost): all the specialists' for `compute`, the
    largest one's for `wall_clock`."""
    return {"compute": (general + sum(specialists)) / per_epoch,
            "wall_clock": (general + max(specialists, default=0)) / per_epoch}


def epoch_examples(cfg: Config, data: Data) -> int:
    """The training examples a generalist epoch trains on (the last partial batch is dropped)."""
    batch = cfg.generalist.train.batch_size
    return len(data.x_train) // batch * batch


def training_compute(run_dir: Path, cfg: Config, data: Data) -> tuple[int, list[float]]:
    """The training compute in examples at the generalist's cost: the generalist's training examples,
    and each specialist's, weighted by its multiply-adds per example relative to the generalist's, with
    its forward passes besides:
    - the start: the generalist's (widened to the specialist's width) over a sample of the training
      set to fit the dustbin row or, with `specialists.head: full`, the plain generalist's over the
      whole training set for the soft targets;
    - its trained net's and its start's over the validation set (the choice between them, the dustbin
      correction, its report).
    Left out as small: the dustbin row's own fit and diagnostics on the sample's features, and with
    `combine.method: auto` the combine stage's pass of each specialist over the validation set."""
    general, specialists = training_examples(run_dir)
    generalist, nets, _ = load_ensemble(run_dir, cfg)
    base = multiply_adds(generalist, data.input_shape)
    n = len(data.x_train)
    if cfg.specialists.head == "full":
        start = n
    else:
        widened = build_net(specialist_net_config(cfg), data.input_shape, data.num_classes)
        start = min(task.DUSTBIN_SAMPLE, n) * multiply_adds(widened, data.input_shape) / base
    return general, [(e + FORWARD_SHARE * 2 * len(data.x_val)) * multiply_adds(net, data.input_shape) / base
                     + FORWARD_SHARE * start for e, net in zip(specialists, nets, strict=True)]


def training_examples(run_dir: Path) -> tuple[int, list[int]]:
    """The training examples the generalist and each specialist processed (their `metrics.jsonl`), the
    specialists in head order."""
    run_dir = Path(run_dir)
    count = len(read_json(run_dir / "specialists" / "subsets.json")["subsets"])
    return (examples(run_dir / "generalist" / "metrics.jsonl"),
            [examples(run_dir / "specialists" / f"m{m:03d}" / "metrics.jsonl") for m in range(count)])


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
    rows = read_json(Path(run_dir) / NAME / "report.json")["baselines"]
    return sorted(rows, key=lambda r: (r["epochs"], r["budget"] == "compute"))


def load_baseline(run_dir: Path, cfg: Config, data: Data, budget: str) -> Net:
    """A trained baseline of a run, rebuilt from its config and weights."""
    net = build_net(cfg.generalist.net, data.input_shape, data.num_classes)
    path = Path(run_dir) / NAME / budget / "model.safetensors"
    load_weights(net, load_tensors(path), f"the {TITLES[budget]}'s weights {path}")
    return net
