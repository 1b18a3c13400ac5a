"""The Ray backend on a local cluster with 2 CPUs and 1 logical GPU: GPU sharing, a worker killed in the
middle of a specialist, resources no node has."""
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

import pytest
import ray
import torch
from conftest import specialists_run

from ensemble.config import LaunchConfig
from ensemble.launch import run_tasks, store_name
from ensemble.pipeline import run_pipeline
from ensemble.rundir import load_tensors

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import a test module


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@dataclass(frozen=True)
class _Job:
    name: str


def test_half_gpu_tasks_share_the_one_gpu(cluster, tmp_path):
    """Two tasks that each wait (up to `patience` seconds) for the other to start: with num_gpus=0.5 both
    meet on the one GPU; with num_gpus=1 the first waits alone, as the second cannot start."""

    @ray.remote(num_cpus=0)
    class Meeting:
        def __init__(self):
            self.arrived = 0

        def arrive(self):
            self.arrived += 1

        def count(self):
            return self.arrived

    def meet(job, checkpoint, store, device, meeting, patience):
        ray.get(meeting.arrive.remote())
        deadline = time.monotonic() + patience
        while ray.get(meeting.count.remote()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        return {"met": ray.get(meeting.count.remote()) == 2, "gpus": ray.get_gpu_ids(), "device": str(device)}

    def launch(num_gpus, patience):
        results = {}
        run_tasks(meet, [_Job("a"), _Job("b")], (Meeting.remote(), patience),
                  LaunchConfig(backend="ray", num_cpus=1, num_gpus=num_gpus),
                  lambda job, r: results.update({job.name: r}), checkpoints=tmp_path / str(num_gpus),
                  device=torch.device("cpu"))
        return results

    shared = launch(0.5, patience=120)
    assert all(r["met"] for r in shared.values())
    assert all(r["gpus"] == [0] and r["device"] == "cpu" for r in shared.values())  # a logical GPU: no CUDA here
    whole = launch(1, patience=3)
    assert sorted(r["met"] for r in whole.values()) == [False, True]


def test_unsatisfiable_resources_fail_at_once(cluster, tmp_path):
    for cpus, gpus in ((1, 2), (3, 0)):
        with pytest.raises(ValueError, match="no node of the Ray cluster can run a task"):
            run_tasks(lambda *a: None, [_Job("a")], (), LaunchConfig(backend="ray", num_cpus=cpus, num_gpus=gpus),
                      lambda job, r: None, checkpoints=tmp_path, device=torch.device("cpu"))


def test_killed_worker_resumes_its_specialist(cluster, upstream, tmp_path):
    """SIGKILL the worker training m000 after its second epoch: Ray retries the task, which resumes from
    the checkpoint the store kept, and ends with the weights of an uninterrupted inline run."""
    longer = ["specialists.train.epochs=60", "specialists.train.batch_size=8"]
    cfg = specialists_run(upstream, tmp_path, *longer, "launch.backend=ray", "launch.num_gpus=0.5")
    out = tmp_path / "r" / "specialists"
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(run_pipeline(cfg, only="specialists")), daemon=True)
    thread.start()
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and time.monotonic() < deadline:
        try:
            progress = ray.get(ray.get_actor(store_name(out)).progress.remote())
        except ValueError:  # the store is not up yet
            progress = {}
        # the store can lag behind the task: kill only while m000 is surely still training
        if progress.get("m000", {}).get("epoch", 0) >= 2 and not (out / "m000" / "metrics.json").exists():
            killed = progress["m000"]
            os.kill(killed["pid"], signal.SIGKILL)
        time.sleep(0.02)
    thread.join(timeout=300)
    assert killed is not None and outcome, "the stage did not finish"

    metrics = {m: json.loads((out / m / "metrics.json").read_text()) for m in ("m000", "m001", "m002")}
    m000 = metrics["m000"]["provenance"]
    assert 2 <= killed["epoch"] <= m000["resumed_from_epoch"] < 60 and m000["pid"] != killed["pid"]
    assert all(m["epochs"] == 60 and m["provenance"]["device"] == "cpu" for m in metrics.values())

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the Ray task (1 CPU), so both compute in the same order
    try:
        run_pipeline(specialists_run(upstream, tmp_path, *longer, name="inline"), only="specialists")
    finally:
        torch.set_num_threads(threads)
    resumed = load_tensors(out / "m000" / "model.safetensors")
    inline = load_tensors(tmp_path / "inline" / "specialists" / "m000" / "model.safetensors")
    assert all(torch.equal(resumed[k], inline[k]) for k in inline)


def test_a_task_that_raises_is_one_line_per_task_and_the_others_are_kept(cluster, tmp_path):
    """Issue 21: an error inside a Ray task reached the terminal as the remote traceback."""
    from ensemble.launch import TasksFailed

    def task(job, checkpoint, store, device):
        if job.name == "good":
            return "kept"
        raise ValueError(f"subset {job.name} holds no class")

    kept = {}
    with pytest.raises(TasksFailed) as failed:
        run_tasks(task, [_Job("good"), _Job("bad")], (), LaunchConfig(backend="ray", num_cpus=1),
                  lambda job, r: kept.update({job.name: r}), checkpoints=tmp_path, device=torch.device("cpu"))
    assert str(failed.value) == "1 of 2 tasks failed (the others are saved):\nbad: subset bad holds no class"
    assert kept == {"good": "kept"}
