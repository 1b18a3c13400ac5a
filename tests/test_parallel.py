"""Data-parallel training on Ray Train workers (`ensemble.parallel`): the same loop as one process on the
global batch, a killed worker that resumes, the pipeline with workers, and the bad settings."""
from __future__ import annotations

import dataclasses
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from ensemble.config import LaunchConfig, TrainConfig, load_config
from ensemble.data import shard_positions
from ensemble.launch import held_sessions, ray_session
from ensemble.layout import CHECKPOINT, HISTORY, TRAIN_STORAGE
from ensemble.parallel import fit_parallel
from ensemble.rundir import load_checkpoint
from ensemble.train import fit

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def local_ray():
    """The local Ray cluster `ensemble run` starts (loopback, this machine's CPUs), shared by the tests."""
    with held_sessions(), ray_session(LaunchConfig()):
        yield


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))


def _data(n: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=g), torch.randint(0, 4, (n,), generator=g)


def _parallel(model, x, y, cfg, tmp_path: Path, name: str, **kwargs):
    return fit_parallel(model, x, y, cfg, tmp_path / name, seed=0, device=CPU, launch=LaunchConfig(),
                        storage=str(tmp_path / "storage"), section="test.train", desc=name, **kwargs)


def test_shards_are_disjoint_and_make_up_the_global_batches():
    n, batch, world = 50, 4, 3  # 4 global batches of 12; the last 2 examples dropped
    shards = [shard_positions(n, batch, rank, world) for rank in range(world)]
    assert all(len(s) == 16 for s in shards)
    steps = torch.stack([s.view(4, batch) for s in shards], dim=1).reshape(4, batch * world)
    assert torch.equal(steps, torch.arange(48).view(4, 12))


def test_two_workers_train_as_one_process_on_the_global_batch(local_ray, tmp_path):
    """batch_size 8 on 2 workers against 16 in one process, the same seed: the same order, the same shifts
    (each worker takes its rows of the global batch's), gradients averaged: the same weights, to float32
    rounding; the metrics count every worker's examples."""
    x, y = _data()
    one = TrainConfig(epochs=3, batch_size=16, lr=0.01, warmup_epochs=0.5, augment="shift")
    two = dataclasses.replace(one, batch_size=8, workers=2)
    single, parallel = _mlp(), _mlp()
    h1 = fit(single, x, y, one, tmp_path / "one", seed=0, device=CPU, val=(x[:32], y[:32]))
    h2 = _parallel(parallel, x, y, two, tmp_path, "two", val=(x[:32], y[:32]))
    for (name, a), b in zip(single.state_dict().items(), parallel.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    assert [r["examples"] for r in h2] == [r["examples"] for r in h1] == [96] * 3
    for r1, r2 in zip(h1, h2):
        assert r2["train_loss"] == pytest.approx(r1["train_loss"], rel=1e-5)
        assert r2["val_top1"] == r1["val_top1"] and r2["lr"] == pytest.approx(r1["lr"])
    # the driver wrote what a training in this process writes
    assert load_checkpoint(tmp_path / "two" / CHECKPOINT)["epoch"] == 3
    assert len((tmp_path / "two" / HISTORY).read_text().splitlines()) == 3


def _logged_loss(log: Path, kill_rank_at: int, storage: Path):
    """Cross-entropy that appends each call's rank to `log`, and SIGKILLs rank 1's own process at its
    call number `kill_rank_at`, once (the log records it first), as soon as Ray Train's controller has
    registered a checkpoint of the training "killed" in `storage` (it collects reports every 2 s)."""
    calls = {"n": 0}

    def loss(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        import ray.train

        rank = ray.train.get_context().get_world_rank()
        calls["n"] += 1
        with open(log, "a") as f:
            f.write(f"{rank}\n")
        if rank == 1 and calls["n"] == kill_rank_at and "killed" not in log.read_text():
            for _ in range(600):
                if list(storage.glob("killed-*/checkpoint_manager_snapshot.json")):
                    break
                time.sleep(0.1)
            with open(log, "a") as f:
                f.write("killed\n")
            os.kill(os.getpid(), signal.SIGKILL)
        return nn.functional.cross_entropy(z, y)

    return loss


def test_a_killed_worker_restarts_the_group_from_the_last_checkpoint(local_ray, tmp_path):
    """Rank 1's process is SIGKILLed in epoch 2 (its 9th step of 6 an epoch): Ray Train restarts both
    workers from epoch 1's checkpoint, and the final weights are those of a run never interrupted (here
    one process on the global batch, which the test above shows equal to 2 workers)."""
    x, y = _data()
    cfg = TrainConfig(epochs=3, batch_size=8, lr=0.01, warmup_epochs=0.5, augment="shift", workers=2)
    whole, killed = _mlp(), _mlp()
    fit(whole, x, y, dataclasses.replace(cfg, batch_size=16, workers=1), tmp_path / "whole", seed=0, device=CPU)
    history = _parallel(killed, x, y, cfg, tmp_path, "killed",
                        loss_fn=_logged_loss(tmp_path / "killed.log", 9, tmp_path / "storage"))
    log = (tmp_path / "killed.log").read_text().split()
    assert "killed" in log
    # rank 0: 6 steps of epoch 1, 3 of epoch 2, then epochs 2 and 3 again: resumed, not started afresh
    assert log.count("0") == 6 + 3 + 12
    for (name, a), b in zip(whole.state_dict().items(), killed.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    assert [r["epoch"] for r in history] == [1, 2, 3]


@pytest.mark.slow
def test_the_pipeline_trains_its_generalist_baselines_and_student_on_two_workers(tmp_path, capfd):
    """`ensemble run` with generalist.train.workers=2 (the baselines follow it) and
    distill_back.train.workers=2 on the local Ray cluster: every stage done, the driver wrote each
    training's weights and metrics where a one-process run writes them, Ray Train's checkpoints are no
    output; a second run finds every stage done."""
    from conftest import SPECIALISTS_TINY

    from ensemble.layout import RunDir
    from ensemble.pipeline import STAGES, run_pipeline, state
    from ensemble.rundir import Manifest, read_json

    cfg = load_config(None, [*SPECIALISTS_TINY, "launch.backend=ray", "generalist.train.workers=2",
                             "distill_back.train.workers=2", "baselines.budgets=[compute]",
                             "distill_back.control=false", f"runs_dir={tmp_path}", "name=r"])
    run_pipeline(cfg)
    out = capfd.readouterr().out
    assert "generalist: 2 training workers (generalist.train.workers) on Ray" in out
    assert "student: 2 training workers (distill_back.train.workers) on Ray" in out
    paths, manifest = RunDir(cfg.run_dir), Manifest(cfg.run_dir)
    assert all(state(stage, cfg, manifest) == "done" for stage in STAGES)
    assert read_json(paths.generalist.metrics)["train_workers"] == 2
    general = paths.generalist.history.read_text().splitlines()
    assert len(general) == 3 and all('"val_top1"' in line for line in general)  # rank 0 validated
    assert load_checkpoint(paths.generalist.checkpoint)["epoch"] == 3
    assert read_json(paths.baseline("compute").metrics)["epochs"] >= 3
    assert len(paths.student.history.read_text().splitlines()) == 2 and paths.student.weights.is_file()
    for stage in ("generalist", "baselines", "distill_back"):
        assert list((paths.stage(stage) / TRAIN_STORAGE).glob("*/checkpoint_*/checkpoint.pt")), stage
        assert not any(TRAIN_STORAGE in name for name in manifest.get(stage)["outputs"])
    run_pipeline(cfg)
    assert capfd.readouterr().out.count("done already") == len(STAGES)
    # the generalist's weights and its checkpoint in the run directory lost: the stage is redone alone,
    # and its trainer resumes from Ray Train's storage (as after a driver killed mid-training) with
    # nothing left to train: the same weights
    weights = paths.generalist.weights.read_bytes()
    paths.generalist.weights.unlink()
    paths.generalist.checkpoint.unlink()
    run_pipeline(cfg)
    out = capfd.readouterr().out
    assert "resumed from" in out and "after epoch 3" in out and "generalist epoch" not in out
    assert out.count("done already") == len(STAGES) - 1 and paths.generalist.weights.read_bytes() == weights


def test_storage_is_the_stage_folder_or_a_folder_of_the_run_and_stage_under_storage_path(tmp_path):
    from ensemble.parallel import train_storage
    from ensemble.rundir import Manifest

    cfg = load_config(None, [f"runs_dir={tmp_path}", "name=r"])
    assert train_storage(cfg, "generalist") == str(tmp_path.resolve() / "r" / "generalist" / TRAIN_STORAGE)
    cfg = load_config(None, [f"runs_dir={tmp_path}", "name=r", "launch.storage_path=s3://bucket/ens/"])
    Manifest(cfg.run_dir).set("generalist", fingerprint="abc", status="running")
    first = train_storage(cfg, "generalist")
    assert first.startswith("s3://bucket/ens/r-") and first.endswith("/generalist-abc")
    other = load_config(None, [f"runs_dir={tmp_path / 'elsewhere'}", "name=r", "launch.storage_path=s3://bucket/ens"])
    Manifest(other.run_dir).set("generalist", fingerprint="abc", status="running")
    assert train_storage(other, "generalist") != first  # another run directory of the same name


def test_bad_worker_settings_are_one_line_errors_before_any_stage(tmp_path, capsys):
    from ensemble.cli import main

    run = ["run", f"runs_dir={tmp_path}", "data.source=digits"]
    assert main([*run, "generalist.train.workers=0"]) == 2
    assert capsys.readouterr().err == "error: config key 'generalist.train.workers' must be >= 1, got 0\n"
    assert main([*run, "generalist.train.workers=2", "launch.backend=inline"]) == 2
    assert capsys.readouterr().err.startswith("error: generalist.train.workers=2 trains on Ray Train workers, "
                                              "which launch.backend=inline does not start")
    from ensemble.launch import usable_cpus

    cpus = usable_cpus()
    assert main([*run, f"distill_back.train.workers={cpus + 1}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"distill_back.train.workers={cpus + 1} workers" in err and f"has {cpus}" in err
    assert main([*run, "specialists.train.workers=2"]) == 2
    assert capsys.readouterr().err.startswith("error: specialists.train.workers must be 1, got 2")
    assert not (tmp_path / "default").exists()  # nothing written


def test_a_cluster_without_room_for_every_worker_is_an_error_naming_the_keys():
    from ensemble.launch import Group, check_resources, fits

    nodes = [{"Alive": True, "Resources": {"CPU": 4, "GPU": 1}}, {"Alive": True, "Resources": {"CPU": 2, "GPU": 2}},
             {"Alive": False, "Resources": {"CPU": 64, "GPU": 8}}]
    assert fits(nodes, Group(1, 1, count=3)) and not fits(nodes, Group(1, 1, count=4))
    assert fits(nodes, Group(2, 0, count=3)) and not fits(nodes, Group(2, 0, count=4))
    assert fits(nodes, Group(1, 0.5, count=4)) and not fits(nodes, Group(1, 0.5, count=5))
    assert not fits(nodes, Group(3, 0, count=2))
    with pytest.raises(ValueError, match=r"cannot run 4 training workers at once that ask for 1 CPUs and 1 GPUs "
                                         r"each \(generalist\.train\.workers, launch\.num_cpus, launch\.num_gpus\); "
                                         r"its nodes have: 4 CPUs and 1 GPUs, 2 CPUs and 2 GPUs"):
        check_resources(nodes, Group(1, 1, count=4, key="generalist.train.workers"))


def test_storage_of_several_machines_must_be_shared():
    from ensemble.parallel import _one_machine

    here = [{"Alive": True, "NodeManagerAddress": "10.0.0.2"}, {"Alive": True, "NodeManagerAddress": "10.0.0.2"}]
    assert _one_machine(here, "10.0.0.2")  # two nodes on the driver's machine
    assert not _one_machine([*here, {"Alive": True, "NodeManagerAddress": "10.0.0.7"}], "10.0.0.2")
    assert _one_machine([*here, {"Alive": False, "NodeManagerAddress": "10.0.0.7"}], "10.0.0.2")
    assert not _one_machine(here, "10.0.0.7")  # a driver elsewhere


def test_an_error_in_a_worker_is_one_line_naming_it(local_ray, tmp_path):
    """A user's error raised in a training worker (here from the loss) comes back as that error, in one
    line, after `launch.max_retries` restarts (0 here)."""
    def bad_loss(z, y):
        raise ValueError("the targets do not fit the logits")

    x, y = _data()
    cfg = TrainConfig(epochs=1, batch_size=8, workers=2)
    with pytest.raises(ValueError) as raised:
        fit_parallel(_mlp(), x, y, cfg, tmp_path / "w", seed=0, device=CPU, launch=LaunchConfig(max_retries=0),
                     storage=str(tmp_path / "storage"), section="test.train", desc="bad", loss_fn=bad_loss)
    assert str(raised.value) in ("bad: training worker 0 failed: the targets do not fit the logits",
                                 "bad: training worker 1 failed: the targets do not fit the logits")


def test_more_workers_than_the_cluster_holds_fail_at_once(local_ray, tmp_path):
    """3 workers of 1 CPU on the local cluster of 2 CPUs (which cannot scale): an error naming the keys,
    before any worker starts, not a wait for ever."""
    import ray

    cpus = int(ray.cluster_resources()["CPU"])
    x, y = _data()
    cfg = TrainConfig(epochs=1, batch_size=8, workers=cpus + 1)
    with pytest.raises(ValueError, match=rf"cannot run {cpus + 1} training workers at once that ask for 1 CPUs "
                                         r"and 0 GPUs each \(test\.train\.workers, launch\.num_cpus, launch\.num_gpus\)"):
        _parallel(_mlp(), x, y, cfg, tmp_path, "too many")
    assert not (tmp_path / "storage").exists()
