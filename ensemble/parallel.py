"""Data-parallel training: the one training loop, `ensemble.train.fit`, on `train.workers` Ray Train
workers (a `TorchTrainer`: DistributedDataParallel over gloo on CPUs, NCCL on GPUs).

Every worker runs `fit`, which takes its rank from the process group Ray Train sets up and trains on
its share of each global batch. After each epoch rank 0's checkpoint goes to Ray Train's storage
(`ray.train.report`); a worker that dies restarts the whole group from it, up to `launch.max_retries`
times, and a driver started again with the same storage resumes from it too. At the end the driver
loads the last checkpoint and writes it, with the metrics, into the run directory, as a training in
this process would: every later stage reads the same files.

Storage is `launch.storage_path` (a folder every node mounts, or a URI: s3://, gs://), or on one machine
the stage's `.ray_train` folder in the run directory, emptied with the stage when its inputs change.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import Config, LaunchConfig, TrainConfig, config_hash
from .data import Images
from .launch import (USER_ERRORS, TasksFailed, from_shared, one_line, place, ray_session, set_up_process, to_shared,
                     usable_cpus)
from .layout import CHECKPOINT, HISTORY, TRAIN_STORAGE, RunDir
from .rundir import Manifest, atomic_path, write_history
from .train import LossFn, Sampler, Targets, finished_history, fit, training_key


def fit_parallel(model: nn.Module, x: Images, targets: Targets, cfg: TrainConfig, workdir: Path, *, seed: int,
                 device: torch.device, launch: LaunchConfig, storage: str, section: str,
                 loss_fn: LossFn | None = None, sampler: Sampler | None = None,
                 val: tuple[Images, torch.Tensor] | None = None, desc: str = "train",
                 on_epoch: Callable[[list[dict]], None] | None = None, clean_images: bool = False) -> list[dict]:
    """`fit(model, x, targets, cfg, workdir, ...)`: in this process where `cfg.workers` is 1, else on that
    many Ray Train workers keeping their checkpoints in `storage` (`train_storage`), with the same
    outcome: `model` holds the trained weights, `workdir` the last checkpoint and `metrics.jsonl`, and
    the history is returned; `on_epoch(history)` then runs once, at the end. `section` names the
    config section (`generalist.train`) in messages."""
    if cfg.workers == 1:
        return fit(model, x, targets, cfg, workdir, seed=seed, device=device, loss_fn=loss_fn, sampler=sampler,
                   val=val, desc=desc, on_epoch=on_epoch, clean_images=clean_images)
    key = training_key(cfg, seed, len(x), targets)
    path = Path(workdir) / CHECKPOINT
    history = finished_history(model, path, key, cfg)  # a finished training starts no workers
    if history is None:
        start = path.read_bytes() if path.is_file() else None  # fit resumes it if it is this training's
        with ray_session(launch):
            last = _train_on_workers(
                (model, x, targets, val), {"cfg": cfg, "seed": seed, "loss_fn": loss_fn, "sampler": sampler,
                                           "desc": desc, "clean_images": clean_images},
                start, launch=launch, storage=storage, name=_run_name(desc, key), device=device, section=section)
        with atomic_path(path) as tmp:
            tmp.write_bytes(last)
        history = finished_history(model, path, key, cfg)
        if history is None:
            raise RuntimeError(f"{desc}: the training workers ended without a checkpoint of a finished training")
    write_history(Path(workdir) / HISTORY, history)
    if on_epoch is not None:
        on_epoch(history)
    return history


def train_storage(cfg: Config, stage: str) -> str:
    """Where a stage's data-parallel trainings keep their checkpoints: the stage's `.ray_train` folder, or
    with `launch.storage_path` a folder of it for this run directory and the stage's fingerprint (a stage
    whose inputs changed starts afresh there as in its own folder)."""
    if cfg.launch.storage_path is None:
        return str((RunDir(cfg.run_dir).stage(stage) / TRAIN_STORAGE).resolve())
    fingerprint = Manifest(cfg.run_dir).get(stage).get("fingerprint", "unrecorded")
    run = f"{cfg.name}-{config_hash(str(cfg.run_dir.resolve()))[:8]}"
    return f"{cfg.launch.storage_path.rstrip('/')}/{run}/{stage}-{fingerprint}"


def check_workers(train: TrainConfig, section: str, launch: LaunchConfig) -> None:
    """Before any stage: `train.workers` above 1 needs Ray (not `launch.backend: inline`), and on the local
    Ray cluster no more CPUs than this machine has."""
    if train.workers == 1:
        return
    if launch.backend == "inline":
        raise ValueError(f"{section}.workers={train.workers} trains on Ray Train workers, which "
                         f"launch.backend=inline does not start: set launch.backend=ray or {section}.workers=1")
    cpus = usable_cpus()
    local = not (launch.address or os.environ.get("RAY_ADDRESS"))
    if local and train.workers * launch.num_cpus > cpus:
        raise ValueError(f"{section}.workers={train.workers} workers of launch.num_cpus={launch.num_cpus:g} CPUs "
                         f"need {train.workers * launch.num_cpus:g} CPUs; this machine, the local Ray cluster, has {cpus}")


def _train_on_workers(shared: tuple, config: dict[str, Any], start: bytes | None, *, launch: LaunchConfig,
                      storage: str, name: str, device: torch.device, section: str) -> bytes:
    """Run `_worker` on `config["cfg"].workers` Ray Train workers; the last checkpoint's bytes."""
    import ray
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg, desc = config["cfg"], config["desc"]
    if launch.storage_path is None and not _one_machine(ray.nodes(), ray.util.get_node_ip_address()):
        raise ValueError(f"{section}.workers={cfg.workers} on a Ray cluster of several machines needs "
                         "launch.storage_path: a folder every node mounts or a URI (s3://, gs://) for the "
                         "training's checkpoints")
    gpus = place(launch, cfg.workers, desc, device, workers=cfg.workers, key=f"{section}.workers")
    resources = {"CPU": launch.num_cpus, **({"GPU": gpus} if gpus else {})}
    trainer = TorchTrainer(
        _worker,
        train_loop_config={**config, "shared": ray.put(to_shared(shared)), "num_cpus": launch.num_cpus,
                           "use_gpu": gpus > 0, "start": None if start is None else ray.put(start)},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=gpus > 0, resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=launch.max_retries),
                             checkpoint_config=CheckpointConfig(num_to_keep=1),
                             logging_config=LoggingConfig(log_level="WARNING")))
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise _failure(desc, e) from None
    if result.checkpoint is None:
        raise RuntimeError(f"{desc}: the training workers reported no checkpoint")
    with result.checkpoint.as_directory() as folder:
        return (Path(folder) / CHECKPOINT).read_bytes()


def _worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: `fit` on its shard, from the group's last checkpoint (a restart) or the
    driver's (a resumed run); rank 0 reports each epoch's checkpoint, the others only the metrics
    (`ray.train.report` is collective)."""
    import ray
    import ray.train
    import ray.train.torch

    set_up_process(threads=max(1, int(config["num_cpus"])))
    model, x, targets, val = from_shared(ray.get(config["shared"]))
    device = ray.train.torch.get_device() if config["use_gpu"] and torch.cuda.is_available() else torch.device("cpu")
    rank = ray.train.get_context().get_world_rank()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / CHECKPOINT
        latest = ray.train.get_checkpoint()
        if latest is not None:
            with latest.as_directory() as folder:
                shutil.copyfile(Path(folder) / CHECKPOINT, path)
        elif config["start"] is not None:
            path.write_bytes(ray.get(config["start"]))

        def report(history: list[dict]) -> None:
            if rank != 0:
                ray.train.report(history[-1])
                return
            with tempfile.TemporaryDirectory() as out:
                shutil.copyfile(path, Path(out) / CHECKPOINT)
                ray.train.report(history[-1], checkpoint=ray.train.Checkpoint.from_directory(out))

        fit(model, x, targets, config["cfg"], Path(tmp), seed=config["seed"], device=device,
            loss_fn=config["loss_fn"], sampler=config["sampler"], val=val, desc=config["desc"], on_epoch=report,
            clean_images=config["clean_images"])


def _one_machine(nodes: list[dict], here: str) -> bool:
    """Whether every alive node of the cluster (`ray.nodes()`) is at `here`, the driver's address: all on
    this machine, which sees the run directory."""
    return all(n["NodeManagerAddress"] == here for n in nodes if n.get("Alive"))


def _run_name(desc: str, key: str) -> str:
    """A training's name in storage: what it is, and the key of its settings, seed and data sizes."""
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', desc).strip('-')}-{key}"


def _failure(desc: str, error: Exception) -> Exception:
    """A failed training as one error: the first failed worker's own error (a user's error stays one),
    else Ray Train's."""
    failures = getattr(error, "worker_failures", None) or {}
    if not failures:
        return TasksFailed(f"{desc}: {one_line(error)}")
    rank, cause = min(failures.items())
    cause = getattr(cause, "cause", None) or cause
    message = f"{desc}: training worker {rank} failed: {one_line(cause)}"
    return ValueError(message) if isinstance(cause, USER_ERRORS) else TasksFailed(message)
