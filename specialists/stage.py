"""Stage 3: one specialist per class subset, trained in parallel by the launcher (inline or Ray).

Writes `specialists/subsets.json` (the subsets, in head order), per specialist `mNNN/model.safetensors`
(dustbin corrected), `mNNN/metrics.json` (its metrics, and where and when it trained), `mNNN/metrics.jsonl`,
its last checkpoint, and for the stage `report.json` and `specialists.png`. A specialist whose
`metrics.json` exists is done: a rerun of an interrupted stage trains only the others, resuming each from
its last checkpoint. `load_specialists` gives later stages the trained specialists.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ensemble.config import Config, TrainConfig, specialist_net_config
from ensemble.data import Images, load_data
from ensemble.launch import run_tasks
from ensemble.layout import NetDir, RunDir
from ensemble.metrics import conditional_hits
from ensemble.nets import BUILT_IN, load_net
from ensemble.rundir import load_tensors, read_json, read_trained, save_trained, trained_metrics, write_json
from ensemble.train import logit_batches, resolve_device

from .branches import check_split
from .heads import make_head
from .plots import plot_specialists
from .sampling import in_subset_count
from .subsets import load_subsets, subsets_path
from .task import Job, Trained, train_specialist


def run(run_dir: Path, cfg: Config) -> dict:
    """Train every specialist not yet done; write each one's weights and metrics, then the stage report."""
    paths = RunDir(run_dir)
    out = paths.stage("specialists")
    data = load_data(cfg.data)
    subsets, skipped = skip_largest(load_subsets(subsets_path(cfg, run_dir), data.class_names),
                                    cfg.specialists.skip_largest)
    write_json(paths.specialists_subsets, {
        "num_classes": data.num_classes, "input_shape": data.input_shape,
        "subsets": [{"id": m, "classes": s, "names": [data.class_names[i] for i in s]} for m, s in enumerate(subsets)],
        "skipped": skipped})

    generalist_state = load_tensors(paths.generalist.weights)
    generalist = load_net(cfg.generalist.net, data.input_shape, data.num_classes, generalist_state,
                          f"the generalist's weights {paths.generalist.weights}")  # fail here, before any task starts

    jobs = [Job(m, tuple(s)) for m, s in enumerate(subsets)]
    todo = [job for job in jobs if trained_metrics(paths.specialist(job.index), f"specialist {job.name}") is None]
    todo.sort(key=lambda job: -len(job.classes))  # largest first, so the last to finish are short
    print(f"specialists: {len(jobs)} subsets; {len(jobs) - len(todo)} trained in an earlier run", flush=True)
    started = time.time()
    launch = run_tasks(train_specialist, todo, (generalist_state, data, cfg), cfg.launch,
                       lambda job, result: _save(paths.specialist(job.index), result), checkpoints=out,
                       device=resolve_device(cfg.device), desc="specialists")
    launch["wall_seconds"] = time.time() - started

    general = generalist_conditional_top1(generalist, [torch.tensor(job.classes) for job in jobs], data.x_test,
                                          data.y_test, resolve_device(cfg.device), cfg.generalist.train)
    rows = [_row(job, read_trained(paths.specialist(job.index)), g) for job, g in zip(jobs, general)]
    summary = {**_summary(rows), "restarts": launch.get("restarts", {})}
    trained = [r for r in rows if r["specialist"] in {job.name for job in todo}]
    if trained:  # from submission to the first task's start: worker start-up and fetching the inputs
        launch["first_task_latency"] = min(r["started"] for r in trained) - launch["submitted"]
    write_json(paths.specialists_report, {**summary, "launch": {**launch, "trained": len(todo)}, "specialists": rows})
    plot_specialists(out / "specialists.png", rows)
    print(_table(rows), flush=True)
    print(f"specialists: conditional top-1 {summary['conditional_top1']:.4f} vs the generalist's "
          f"{summary['generalist_conditional_top1']:.4f}; {summary['specialists_at_least_generalist']} of "
          f"{len(rows)} specialists at least as good as the generalist on their subset; "
          f"{summary['specialists_kept_trained']} kept their trained weights"
          + ("" if summary["specialists_kept_trained"] == len(rows) else ", the others beat their start (the "
             "generalist's weights) on no more validation examples and stay there"), flush=True)
    return summary


def check(cfg: Config) -> None:
    """The stage's settings, checked before the pipeline starts any stage."""
    width = cfg.specialists.width
    if width is not None and cfg.generalist.net.name not in BUILT_IN:
        raise ValueError(f"specialists.width: widening is defined for the built-in nets ({', '.join(BUILT_IN)}), "
                         f"not for {cfg.generalist.net.name}; leave it null")
    if width is not None and width < cfg.generalist.net.width:
        raise ValueError(f"specialists.width {width} is below the generalist's width {cfg.generalist.net.width}: "
                         "specialists start as the generalist, widened")
    check_split(cfg)
    in_subset_count(cfg.specialists.in_subset_fraction, cfg.specialists.train.batch_size)
    if cfg.specialists.train.workers != 1:
        raise ValueError(f"specialists.train.workers must be 1, got {cfg.specialists.train.workers}: the specialists "
                         "train in parallel as Ray tasks, one process each (launch.num_cpus, launch.num_gpus)")


def skip_largest(subsets: list[list[int]], k: int) -> tuple[list[list[int]], list[list[int]]]:
    """The subsets without the k largest (ties: the later ones go), and those k: their classes are left to
    the generalist."""
    if not 0 <= k < len(subsets):
        raise ValueError(f"specialists.skip_largest must be in [0, {len(subsets)}) for {len(subsets)} subsets, got {k}")
    drop = set(sorted(range(len(subsets)), key=lambda m: (-len(subsets[m]), -m))[:k])
    return [s for m, s in enumerate(subsets) if m not in drop], [s for m, s in enumerate(subsets) if m in drop]


@dataclass(frozen=True)
class Specialists:
    """A run's trained specialists as the combiner sees them (logits over their subset, then the
    dustbin), their subsets in head order, and the data's shape they were trained on."""

    nets: list[nn.Module]
    subsets: list[list[int]]
    input_shape: tuple[int, int, int]
    num_classes: int


def load_specialists(run_dir: Path, cfg: Config) -> Specialists:
    """The specialists a run's specialists stage left, rebuilt from its config and weights."""
    paths = RunDir(run_dir)
    if not paths.specialists_subsets.is_file():
        raise FileNotFoundError(f"{run_dir} holds no trained specialists (no {paths.specialists_subsets}): "
                                f"run `ensemble run` for it first")
    info = read_json(paths.specialists_subsets)
    subsets = [s["classes"] for s in info["subsets"]]
    shape, num_classes = tuple(info["input_shape"]), info["num_classes"]
    nets = []
    for m, subset in enumerate(subsets):
        weights = paths.specialist(m).weights
        if not weights.is_file():
            raise FileNotFoundError(f"specialist {m} of {run_dir} is missing ({weights}): rerun `ensemble run`")
        nets.append(make_head(cfg.specialists, subset).load(specialist_net_config(cfg), shape, num_classes, weights))
    return Specialists(nets, subsets, shape, num_classes)


def _save(folder: NetDir, result: Trained) -> None:
    """Write a finished specialist (its metrics last: they mark it done)."""
    save_trained(folder, result.weights, result.history, {**result.metrics, "provenance": result.provenance})


def generalist_conditional_top1(generalist: nn.Module, subsets: list[torch.Tensor], x: Images, y: torch.Tensor,
                                device: torch.device, train: TrainConfig) -> list[float]:
    """The generalist's conditional top-1 on each subset (`conditional_top1`) over the test images,
    batch by batch: the figure each specialist's is set against."""
    counts = torch.zeros(len(subsets), 2, dtype=torch.long)
    start = 0
    for (logits,) in logit_batches([generalist], x, device=device, batch_size=train.eval_batch_size,
                                   channels_last=train.channels_last):
        labels = y[start:start + len(logits)]
        start += len(logits)
        m, hit = conditional_hits(logits, labels, subsets)
        counts[:, 0] += torch.bincount(m[hit], minlength=len(subsets)).cpu()
        counts[:, 1] += torch.bincount(m, minlength=len(subsets)).cpu()
    return [hits / pairs if pairs else float("nan") for hits, pairs in counts.tolist()]


def _row(job: Job, recorded: dict, general: float) -> dict:
    """A specialist's line in the report: its metrics and provenance, and the generalist's conditional
    top-1 on the same subset."""
    metrics = {k: v for k, v in recorded.items() if k != "provenance"}
    return {"specialist": job.name, **metrics, **recorded["provenance"], "generalist_conditional_top1": general,
            "conditional_gain": metrics["conditional_top1"] - general}


def _summary(rows: list[dict]) -> dict:
    """Means weighted by each subset's test examples, and how many specialists beat the generalist."""
    n = sum(r["test_in_subset"] for r in rows)

    def weighted(key: str) -> float:
        return sum(r[key] * r["test_in_subset"] for r in rows) / n

    return {
        "num_specialists": len(rows),
        "conditional_top1": weighted("conditional_top1"),
        "generalist_conditional_top1": weighted("generalist_conditional_top1"),
        "conditional_gain": weighted("conditional_gain"),
        "specialists_at_least_generalist": sum(r["conditional_gain"] >= 0 for r in rows),
        "specialists_kept_trained": sum(r["kept"] == "trained" for r in rows),
        "dustbin_abs_error": sum(abs(r["dustbin_mean_prob"] - r["dustbin_true_share"]) for r in rows) / len(rows),
        "train_seconds": round(sum(r["train_seconds"] for r in rows), 2),
        "resumed": [r["specialist"] for r in rows if r["resumed_from_epoch"]],  # from a checkpoint
    }


def _table(rows: list[dict]) -> str:
    head = (f"{'spec.':<7}{'classes':>8}{'test':>7}{'generalist':>12}{'specialist':>12}{'gain':>8}"
            f"{'dustbin p':>11}{'true':>7}{'seconds':>9}  kept")
    lines = ["conditional top-1 on each subset's test examples; mean dustbin probability on the whole test set",
             head]
    for r in rows:
        lines.append(f"{r['specialist']:<7}{r['classes']:>8}{r['test_in_subset']:>7}"
                     f"{r['generalist_conditional_top1']:>12.4f}{r['conditional_top1']:>12.4f}"
                     f"{r['conditional_gain']:>+8.4f}{r['dustbin_mean_prob']:>11.4f}{r['dustbin_true_share']:>7.4f}"
                     f"{r['train_seconds']:>9.1f}  {r['kept']}")
    return "\n".join(lines)
