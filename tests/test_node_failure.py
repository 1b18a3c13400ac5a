"""A worker node of a multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`, real Ray
processes) dies while specialists train on it: the stage ends with every specialist, the lost one resumed
from its last checkpoint on the surviving node, and the manifest says which."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import ray
from conftest import specialists_run

from ensemble.launch import store_name
from ensemble.pipeline import run_pipeline


@pytest.fixture
def nodes():
    """A head without CPUs (the driver and the checkpoint store live there) and two 1-CPU workers."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_a_dead_node_loses_no_specialist(nodes, upstream, tmp_path):
    cluster, workers = nodes
    cfg = specialists_run(upstream, tmp_path, "specialists.train.epochs=40", "specialists.train.batch_size=8",
                          "launch.backend=ray", f"launch.address={cluster.address}")
    out = tmp_path / "r" / "specialists"
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(run_pipeline(cfg, only="specialists")), daemon=True)
    thread.start()
    victim, lost = None, None
    deadline = time.monotonic() + 300  # workers start slowly on a busy machine
    while victim is None and time.monotonic() < deadline and thread.is_alive():
        try:
            progress = ray.get(ray.get_actor(store_name(out)).progress.remote())
        except ValueError:  # the store is not up yet
            progress = {}
        for name, p in progress.items():  # a specialist surely still training, and the node it runs on
            if p["epoch"] >= 2 and not (out / name / "metrics.json").exists():
                try:
                    raylet = _parent(p["pid"])
                except OSError:
                    continue
                victim = next((w for w in workers if w.all_processes["raylet"][0].process.pid == raylet), None)
                lost = name
                if victim is not None:
                    break
        time.sleep(0.05)
    if victim is not None:
        cluster.remove_node(victim, allow_graceful=False)
    thread.join(timeout=600)  # before the fixture shuts Ray down under the stage
    assert victim is not None, "no specialist was seen training"
    assert outcome, "the stage did not finish"

    metrics = {m: json.loads((out / m / "metrics.json").read_text()) for m in ("m000", "m001", "m002")}
    assert all(m["epochs"] == 40 for m in metrics.values())
    provenance = metrics[lost]["provenance"]
    assert provenance["resumed_from_epoch"] >= 2 and provenance["node_id"] != victim.node_id
    summary = json.loads((tmp_path / "r" / "manifest.json").read_text())["stages"]["specialists"]["summary"]
    assert summary["restarts"].get(lost, 0) >= 1 and lost in summary["resumed"]
