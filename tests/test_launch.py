"""The launcher's placement on Ray: GPUs per task by default, waiting for an autoscaling cluster to add a
node (and failing at once where it cannot), and the shared inputs' arrays read in place from the node's
object store by every task on it."""
import json
import sys
import threading
import time
import warnings
from dataclasses import dataclass

import pytest
import ray
import torch

from ensemble.config import LaunchConfig
from ensemble.launch import (
    Group,
    Scaling,
    cluster_scaling,
    from_shared,
    resolve_num_gpus,
    run_tasks,
    scaling_of,
    to_shared,
    wait_for_node,
)

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import a test module


@dataclass(frozen=True)
class _Job:
    name: str


@dataclass(frozen=True)
class _Images:
    """Like `ensemble.data.Data`: tensors, and fields that are not."""

    x: torch.Tensor
    y: torch.Tensor
    names: list[str]
    groups: torch.Tensor | None = None


def _run(fn, jobs, shared, launch, tmp_path):
    """Each job's result from `run_tasks`."""
    results = {}
    run_tasks(fn, [_Job(j) for j in jobs], shared, launch, lambda job, r: results.update({job.name: r}),
              checkpoints=tmp_path, device=torch.device("cpu"))
    return results


def _resources(job, checkpoint, store, device):
    """What Ray gave the task."""
    return {"gpu_ids": ray.get_gpu_ids(), "assigned": ray.get_runtime_context().get_assigned_resources(),
            "node": ray.get_runtime_context().get_node_id()}


@pytest.fixture
def gpu_cluster():
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def cpu_cluster():
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_num_gpus_defaults_to_one_where_there_are_gpus_and_an_explicit_value_is_kept():
    def default(cpu_chosen=False, gpu_node=False, adds_gpus=False):
        return resolve_num_gpus(None, cpu_chosen=cpu_chosen, gpu_node=gpu_node, adds_gpus=adds_gpus)

    assert default(gpu_node=True) == 1 and default(adds_gpus=True) == 1
    assert default() == 0  # no node has a GPU a task could use (a GPU on a head without Ray CPUs is none)
    assert default(cpu_chosen=True, gpu_node=True, adds_gpus=True) == 0  # `device: cpu` on a CUDA machine
    assert resolve_num_gpus(0.5, cpu_chosen=True, gpu_node=True, adds_gpus=True) == 0.5
    assert resolve_num_gpus(0, cpu_chosen=False, gpu_node=True, adds_gpus=True) == 0


def test_tasks_get_a_gpu_each_by_default_on_a_gpu_cluster(gpu_cluster, tmp_path, capsys):
    """Ray's GPUs are logical: the local cluster schedules like a machine with two GPUs."""
    default = _run(_resources, ["a", "b"], (), LaunchConfig(backend="ray"), tmp_path / "default")
    assert all(len(r["gpu_ids"]) == 1 and r["assigned"] == {"CPU": 1.0, "GPU": 1.0} for r in default.values())
    assert "tasks: 2 tasks on Ray (1 node, 2 CPUs, 2 GPUs), each with 1 CPU and 1 GPU\n" in capsys.readouterr().out
    half = _run(_resources, ["a"], (), LaunchConfig(backend="ray", num_gpus=0.5), tmp_path / "half")
    assert half["a"]["assigned"] == {"CPU": 1.0, "GPU": 0.5} and half["a"]["gpu_ids"]
    none = _run(_resources, ["a"], (), LaunchConfig(backend="ray", num_gpus=0), tmp_path / "none")
    assert none["a"]["gpu_ids"] == [] and "GPU" not in none["a"]["assigned"]
    assert "each with 1 CPU, on the CPU (launch.num_gpus: 0)" in capsys.readouterr().out


def test_tasks_stay_on_the_cpu_by_default_without_gpus(cpu_cluster, tmp_path, capsys):
    results = _run(_resources, ["a", "b"], (), LaunchConfig(backend="ray"), tmp_path)
    assert all(r["gpu_ids"] == [] and r["assigned"] == {"CPU": 1.0} for r in results.values())
    assert "tasks: 2 tasks on Ray (1 node, 2 CPUs, 0 GPUs), each with 1 CPU, on the CPU (no node has a GPU for them)" \
        in capsys.readouterr().out


def test_inline_says_where_it_runs(tmp_path, capsys):
    _run(lambda *a: None, ["a", "b"], (), LaunchConfig(backend="inline"), tmp_path)
    assert "tasks: 2 tasks inline in this process on cpu\n" in capsys.readouterr().out


def test_a_cluster_that_cannot_scale_fails_at_once(cpu_cluster, tmp_path):
    """A cluster `ray.init` starts has no cluster config: the node types in its autoscaler's report are
    the read-only `node_<id>` ones, so a GPU task is an error before any wait."""
    from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
    from ray.experimental.internal_kv import _internal_kv_get

    def report():
        raw = _internal_kv_get(DEBUG_AUTOSCALING_STATUS)
        return raw and json.loads(raw).get("autoscaler_report")

    deadline = time.monotonic() + 60
    while not report() and time.monotonic() < deadline:
        time.sleep(0.2)  # the monitor's first report comes a few seconds after the start
    assert report()["active_nodes"]
    assert cluster_scaling() == Scaling(can_add_nodes=False, adds_gpus=False)
    with pytest.raises(ValueError, match="no node of the Ray cluster can run a task that asks for 1 CPUs and 1 GPUs"):
        _run(_resources, ["a"], (), LaunchConfig(backend="ray", num_gpus=1, resource_timeout=600), tmp_path)


def test_scaling_from_published_node_groups_or_the_status_node_types():
    gpu = {"resources": {"CPU": 4, "GPU": 1}, "min_count": 0, "max_count": 4}
    cpu = {"resources": {"CPU": 8}, "min_count": 0, "max_count": -1}
    fixed = {"resources": {"CPU": 4, "GPU": 1}, "min_count": 2, "max_count": 2}
    assert scaling_of([gpu, cpu], []) == Scaling(True, True)
    assert scaling_of([cpu, fixed], []) == Scaling(True, False)
    assert scaling_of([fixed], ["head_gpu", "worker_gpu"]) == Scaling(False, False)  # the published groups decide
    assert scaling_of([], []) == Scaling(False, False)
    assert scaling_of(None, ["head_gpu", "worker_gpu"]) == Scaling(True, False)  # `ray up`: types, not resources
    assert scaling_of(None, ["node_1ecfb1fa1e25cec2152fb50190a86f17768e1c3870c29160482aa6f8", ""]) \
        == Scaling(False, False)
    assert scaling_of(None, []) == Scaling(False, False)


class _Clock:
    """A clock that moves only when slept on."""

    def __init__(self):
        self.now = 0.0
        self.sleeps = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _node(cpus, gpus, alive=True):
    return {"Alive": alive, "Resources": {"CPU": cpus, "GPU": gpus}}


def test_the_wait_returns_once_a_node_that_fits_is_alive():
    clock = _Clock()
    head = _node(0, 1)
    answers = iter([[head], [head, _node(4, 1, alive=False)], [head, _node(4, 1)]])
    wait_for_node(lambda: next(answers), Group(1, 1), timeout=600, clock=clock, sleep=clock.sleep, every=5)
    assert clock.sleeps == [5, 5]


def test_the_wait_ends_at_the_timeout_with_one_line_naming_the_keys():
    clock = _Clock()
    with pytest.raises(ValueError) as raised:
        wait_for_node(lambda: [_node(0, 1), _node(2, 0)], Group(1, 1), timeout=12, clock=clock, sleep=clock.sleep, every=5)
    assert clock.sleeps == [5, 5, 2] and clock.now == 12
    assert str(raised.value) == (
        "no node of the Ray cluster can run a task that asks for 1 CPUs and 1 GPUs (launch.num_cpus, "
        "launch.num_gpus), and the autoscaler added none in 12 s (launch.resource_timeout); its nodes have: "
        "0 CPUs and 1 GPUs, 2 CPUs and 0 GPUs")


@pytest.fixture
def autoscaling():
    """A head with a CPU and no GPU, which says through the GCS, as an autoscaler would, that it can add
    nodes with a CPU and a GPU; the test plays the autoscaler."""
    from ray.cluster_utils import Cluster
    from ray.core.generated import autoscaler_pb2
    from ray.experimental.internal_kv import internal_kv_get_gcs_client

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    ray.init(address=cluster.address, log_to_driver=False)
    config = autoscaler_pb2.ClusterConfig()
    group = config.node_group_configs.add(name="worker_gpu", min_count=0, max_count=2)
    group.resources.update({"CPU": 1, "GPU": 1})
    internal_kv_get_gcs_client().report_cluster_config(config.SerializeToString())
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _requested() -> list[dict] | None:
    """The bundles the driver last asked the autoscaler for (`request_resources`, autoscaler v1)."""
    from ray.autoscaler._private.constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
    return None if raw is None else json.loads(raw)


def test_an_autoscaling_cluster_is_given_time_to_add_a_gpu_node(autoscaling, tmp_path, capsys):
    """The default asks for a GPU, which no node has yet: the run asks the autoscaler for a node that
    fits a task and waits; the test, as the autoscaler, adds one, and the task runs there. Where no node
    comes, the wait ends at launch.resource_timeout. Either way the request is withdrawn afterwards."""
    assert cluster_scaling() == Scaling(can_add_nodes=True, adds_gpus=True)
    with pytest.raises(ValueError, match=r"the autoscaler added none in 0.5 s \(launch.resource_timeout\); its "
                                         r"nodes have: 1 CPUs and 0 GPUs$"):
        _run(_resources, ["a"], (), LaunchConfig(backend="ray", resource_timeout=0.5), tmp_path / "none")
    assert _requested() == []

    outcome = {}

    def launch():
        try:
            outcome.update(_run(_resources, ["a"], (), LaunchConfig(backend="ray", resource_timeout=120),
                                tmp_path / "added"))
        except Exception as e:  # noqa: BLE001 -- reported by the assertion below
            outcome["error"] = e

    runner = threading.Thread(target=launch, daemon=True)
    runner.start()
    deadline = time.monotonic() + 60
    while _requested() != [{"CPU": 1.0, "GPU": 1.0}] and time.monotonic() < deadline and runner.is_alive():
        time.sleep(0.1)
    assert _requested() == [{"CPU": 1.0, "GPU": 1.0}], outcome
    node = autoscaling.add_node(num_cpus=1, num_gpus=1)  # Ray's test cluster adds nodes from the main thread only
    runner.join(timeout=120)
    assert "a" in outcome, outcome
    assert outcome["a"]["gpu_ids"] and outcome["a"]["node"] == node.node_id
    assert _requested() == []
    out = capsys.readouterr().out
    assert "tasks: 1 task on Ray (1 node, 1 CPU, 0 GPUs; it can add nodes), each with 1 CPU and 1 GPU\n" in out
    assert "tasks: waiting up to 120 s for the autoscaler to add a node with 1 CPU and 1 GPU " \
           "(launch.resource_timeout)\n" in out


def _mapping(address: int) -> tuple[str, str]:
    """The permissions and the file of this process's memory mapping that holds `address`."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            low, high = (int(a, 16) for a in fields[0].split("-"))
            if low <= address < high:
                return fields[1], fields[5].strip() if len(fields) > 5 else ""
    raise LookupError(hex(address))


def test_tensor_fields_round_trip_and_other_values_pass_as_they_are():
    images = _Images(torch.arange(24, dtype=torch.uint8).view(2, 3, 2, 2), torch.tensor([3, 1]), ["a", "b"])
    back = from_shared(to_shared(images))
    assert type(back) is _Images and back.names is images.names and back.groups is None
    assert torch.equal(back.x, images.x) and back.x.dtype == torch.uint8 and torch.equal(back.y, images.y)
    weights = {"w": torch.ones(3)}
    assert to_shared(weights) is weights and from_shared(weights) is weights
    config = LaunchConfig()  # a dataclass without tensors
    assert to_shared(config) is config
    plain = (torch.arange(5), (torch.ones(2, 2), "text"))  # tensors of their own, in tuples: a training's targets
    back = from_shared(to_shared(plain))
    assert torch.equal(back[0], plain[0]) and torch.equal(back[1][0], plain[1][0]) and back[1][1] == "text"
    assert back[0].data_ptr() == plain[0].data_ptr()  # the same memory, not a copy


def test_a_task_reads_the_shared_arrays_in_place_from_the_object_store(cpu_cluster, tmp_path):
    """The images of a dataclass among the shared inputs lie in the node's shared object store (a shared
    mapping of Ray's plasma file) in every task, and come back equal; a dict's tensor is the task's own
    copy (private memory). Turning the store's read-only arrays into tensors warns nowhere."""
    images = _Images(torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8), torch.arange(64), ["a"])

    def look(job, checkpoint, store, device, images, weights):
        return {"x": _mapping(images.x.data_ptr()), "weights": _mapping(weights["w"].data_ptr()),
                "x_sum": int(images.x.sum()), "y": images.y.tolist(), "type": type(images.x).__name__}

    results = _run(look, ["a", "b"], (images, {"w": torch.ones(1000)}), LaunchConfig(backend="ray"), tmp_path)
    for r in results.values():
        assert r["x"][0][3] == "s" and "plasma" in r["x"][1], r["x"]
        assert r["weights"][0][3] == "p", r["weights"]
        assert r["type"] == "Tensor" and r["x_sum"] == int(images.x.sum()) and r["y"] == list(range(64))

    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        back = from_shared(ray.get(ray.put(to_shared(images))))  # read-only arrays, as a task gets them
    assert torch.equal(back.x, images.x) and not warned


def test_an_inner_held_block_leaves_the_outer_session_open():
    """`held_sessions` within `held_sessions` (a pipeline run inside a caller's session): the inner block
    shuts down nothing it did not open; the outer one shuts down its own session."""
    from ensemble.launch import held_sessions, ray_session

    with held_sessions(), ray_session(LaunchConfig()):
        with held_sessions(), ray_session(LaunchConfig()):
            pass
        assert ray.is_initialized()
    assert not ray.is_initialized()
