"""The launcher: runs one task function over many jobs, inline or as Ray tasks. It only decides where a
task runs; what the task computes does not depend on it.

A task is `fn(job, checkpoint, store, device, *shared)`. `shared` (weights, the data, the config) goes
to the workers once, through Ray's object store; `checkpoint` is the job's last checkpoint (None at
first) and `store` takes its new ones (`CheckpointStore`), on the driver's machine; the task returns
its result to the driver, which calls `on_done(job, result)` to write it into the run directory. The
launcher restarts a task whose worker or node died, up to `launch.max_retries` times, from its last
checkpoint. A task trains in a `task_folder`, which resumes from the checkpoint and hands each new one
to the store.

On Ray each task asks for `launch.num_cpus` CPUs and `launch.num_gpus` GPUs (null: one when the cluster
has GPUs or its autoscaler can add nodes with them). When no node can run a task, a cluster that can
scale is asked for one and given `launch.resource_timeout` seconds; one that cannot is an error at once.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
from tqdm.auto import tqdm

from .config import LaunchConfig
from .layout import CHECKPOINT, NetDir
from .rundir import atomic_path, load_checkpoint


class TasksFailed(RuntimeError):
    """Some of the launcher's tasks failed; the message has one line for each."""


class Job(Protocol):
    name: str


class Store(Protocol):
    def save(self, name: str, checkpoint: bytes, epoch: int, pid: int) -> None: ...


TaskFn = Callable[..., Any]
OnDone = Callable[[Any, Any], None]


def run_tasks(fn: TaskFn, jobs: Sequence[Job], shared: tuple, launch: LaunchConfig, on_done: OnDone, *,
              checkpoints: Path, device: torch.device, desc: str = "tasks", in_driver: bool = False) -> dict:
    """Run `fn` for every job on the configured backend; `on_done` each result as it arrives. A job that
    fails does not stop the others: the failures are raised together at the end. Returns the launcher's
    own costs: seconds to start or join Ray, seconds to put `shared` in the object store, and the time
    the tasks were submitted. `in_driver`: the jobs run one after another in this process, as inline,
    each training on Ray Train workers of its own (a Ray task waiting for them would hold a CPU they need)."""
    if launch.backend == "inline" or in_driver:
        where = "one after another in this process, each on Ray Train workers" if in_driver else f"inline in this process on {device}"
        print(f"{desc}: {_count(len(jobs), 'task')} {where}", flush=True)
        store = CheckpointStore(checkpoints)
        submitted = time.time()
        with tqdm(total=len(jobs), desc=desc, unit="task", file=sys.stderr, disable=None) as bar:
            for job in jobs:
                on_done(job, fn(job, store.load(job.name), store, device, *shared))
                bar.update()
        return {"backend": "inline", "startup_seconds": 0.0, "transfer_seconds": 0.0, "submitted": submitted}
    t0 = time.perf_counter()
    with ray_session(launch):
        startup = time.perf_counter() - t0
        costs = _run_ray(fn, jobs, shared, launch, on_done, checkpoints, desc, device)
    return {"backend": "ray", "startup_seconds": startup, **costs}


@contextmanager
def ray_session(launch: LaunchConfig) -> Iterator[None]:
    """Use the Ray session already open in this process, or connect to `launch.address` / $RAY_ADDRESS,
    or start a local Ray cluster on this machine, on loopback only, for the duration (the local
    multi-process mode)."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # show every task's progress lines (read when ray is imported)
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")  # Ray Train's workers stay in the driver's working
    #   directory, as tasks do: a user's relative paths and modules resolve the same
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # a worker's lines reach the driver once, not
    #   also through the logger Ray Train copies them to
    import ray

    if ray.is_initialized():
        yield
        return
    address = launch.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        _init_on_loopback()
    if _held["holding"]:
        _held["opened"] = True  # `held_sessions` shuts it down
        yield
        return
    try:
        yield
    finally:
        ray.shutdown()


_held = {"holding": False, "opened": False}  # the state of `held_sessions`


@contextmanager
def held_sessions() -> Iterator[None]:
    """Within the block, a Ray session that `ray_session` opens stays open for the next `ray_session`,
    and is shut down when the block ends: the pipeline's stages share one cluster and its warm workers
    instead of starting one each. Within an outer block it shuts down only a session it opened itself."""
    outer = dict(_held)
    _held.update(holding=True, opened=False)
    try:
        yield
    finally:
        opened = _held["opened"]
        _held.update(outer)
        if opened:
            import ray

            ray.shutdown()


def _init_on_loopback() -> None:
    """Start a Ray cluster for this machine alone, every server bound to 127.0.0.1, the dashboard too (Ray
    Train's state queries go through it), with token authentication (Ray's default for a new local
    cluster unless $RAY_AUTH_MODE says otherwise; the token is ~/.ray/auth_token, made if missing):
    another user of the machine cannot reach it.
    Ray 2.60 binds its gRPC servers to all interfaces unless its node address is loopback, and picks the
    machine's address unless its multi-node mode (ray_constants.ENABLE_RAY_CLUSTER, read at each call;
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 at import) is off: off for this call only."""
    import ray
    from ray._private import ray_constants

    multi_node = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        # "local": a new cluster, never the one the last `ray start` on this machine left its address for
        ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True,
                 _node_ip_address="127.0.0.1")
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = multi_node


@dataclass(frozen=True)
class Group:
    """What must run at once: `count` processes of `num_cpus` CPUs and `num_gpus` GPUs each (one task, or
    the workers of a data-parallel training, whose count is the config key `key`)."""

    num_cpus: float
    num_gpus: float
    count: int = 1
    key: str = ""


def fits(nodes: list[dict], group: Group) -> bool:
    """Whether the alive nodes of the cluster (`ray.nodes()`) have room for every process of `group` at once."""
    def room(resources: dict) -> float:
        return min(resources.get("CPU", 0) // group.num_cpus if group.num_cpus else math.inf,
                   resources.get("GPU", 0) // group.num_gpus if group.num_gpus else math.inf)

    return sum(room(n["Resources"]) for n in nodes if n.get("Alive")) >= group.count


def check_resources(nodes: list[dict], group: Group) -> None:
    """Raise if the alive nodes of the cluster (`ray.nodes()`) cannot run `group`: Ray would wait for
    such nodes for ever."""
    if not fits(nodes, group):
        raise ValueError(f"{_no_node(group)}; its nodes have: {_have(nodes)}")


def wait_for_node(nodes: Callable[[], list[dict]], group: Group, timeout: float, *,
                  clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                  every: float = 2.0) -> None:
    """Ask `nodes()` every `every` seconds until the alive nodes can run `group`, for an autoscaler adding
    nodes; raise if they cannot after `timeout` seconds."""
    deadline = clock() + timeout
    while not fits(current := nodes(), group):
        if clock() >= deadline:
            raise ValueError(f"{_no_node(group)}, and the autoscaler added none in {timeout:g} s "
                             f"(launch.resource_timeout); its nodes have: {_have(current)}")
        sleep(min(every, max(0.0, deadline - clock())))


def _no_node(group: Group) -> str:
    """The start of the error for a group the cluster cannot run, naming the keys that ask for too much."""
    each = f"{group.num_cpus:g} CPUs and {group.num_gpus:g} GPUs"
    if group.count == 1:
        return f"no node of the Ray cluster can run a task that asks for {each} (launch.num_cpus, launch.num_gpus)"
    return (f"the Ray cluster cannot run {group.count} training workers at once that ask for {each} each "
            f"({group.key}, launch.num_cpus, launch.num_gpus)")


def _have(nodes: list[dict]) -> str:
    """What the alive nodes have, for an error that says why none fits."""
    alive = [n["Resources"] for n in nodes if n.get("Alive")]
    return ", ".join(f"{r.get('CPU', 0):g} CPUs and {r.get('GPU', 0):g} GPUs" for r in alive) or "no alive nodes"


class Scaling(NamedTuple):
    """What the autoscaler of a Ray cluster can do: add nodes at all, and add nodes that have GPUs."""

    can_add_nodes: bool
    adds_gpus: bool


READ_ONLY_NODE_TYPE = re.compile(r"node_[0-9a-f]+")  # Ray's name for a node no cluster config describes


def scaling_of(node_groups: list[dict] | None, node_types: Iterable[str]) -> Scaling:
    """A cluster's `Scaling`, from the node groups its autoscaler published (`resources`, `min_count`,
    `max_count`, -1 for no limit; None where it published none) or else from the node types its status
    names: those of a cluster config (`ray up`, KubeRay's autoscaler) can grow, the read-only `node_<id>`
    types Ray gives the nodes of a cluster without one (`ray start`, `ray.init`) cannot, and which of a
    config's types have GPUs the status does not say."""
    if node_groups is not None:
        growing = [g for g in node_groups
                   if g["resources"] and (g["max_count"] == -1 or g["max_count"] > g["min_count"])]
        return Scaling(bool(growing), any(g["resources"].get("GPU", 0) > 0 for g in growing))
    return Scaling(any(t and not READ_ONLY_NODE_TYPE.fullmatch(t) for t in node_types), False)


def cluster_scaling() -> Scaling:
    """The connected Ray cluster's `Scaling`, from what its autoscaler keeps in the GCS: the node groups
    of its cluster config where it publishes them (`ray._private.state.state.get_cluster_config()`, read
    by Ray Data the same way), else the node types of the status `ray status` shows."""
    import ray

    config = ray._private.state.state.get_cluster_config()
    if config is not None:
        groups = [{"resources": dict(g.resources), "min_count": g.min_count, "max_count": g.max_count}
                  for g in config.node_group_configs]
        return scaling_of(groups, [])
    return scaling_of(None, _autoscaler_node_types())


def _autoscaler_node_types() -> list[str]:
    """The node types in the autoscaler's status (autoscaler v2: the GCS's cluster status; v1: the
    monitor's report in the GCS's key-value store); none before its first report."""
    import ray
    from ray._private import ray_constants
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get

    if is_autoscaler_v2(fetch_from_server=True):
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address)
        nodes = status.active_nodes + status.idle_nodes + status.pending_nodes + status.failed_nodes
        launches = status.pending_launches + status.failed_launches
        return [n.ray_node_type_name for n in nodes] + [launch.ray_node_type_name for launch in launches]
    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    report = (json.loads(raw).get("autoscaler_report") if raw else None) or {}
    return [*(report.get("active_nodes") or {}), *(report.get("pending_launches") or {}),
            *(report.get("node_type_mapping") or {}).values()]


def resolve_num_gpus(num_gpus: float | None, *, cpu_chosen: bool, gpu_node: bool, adds_gpus: bool) -> float:
    """GPUs per task: `launch.num_gpus` if set; else none where the driver chose the CPU with CUDA at
    hand (`device: cpu`), one where a node can run a task with a GPU or the autoscaler can add nodes with
    GPUs, none otherwise."""
    if num_gpus is not None:
        return num_gpus
    return 1.0 if not cpu_chosen and (gpu_node or adds_gpus) else 0.0


def _scaling() -> Scaling:
    """`cluster_scaling()`, or a cluster that cannot scale where Ray's internal state cannot be read
    (another Ray version, a client connection): a warning, and the errors of a fixed cluster."""
    try:
        return cluster_scaling()
    except Exception as e:  # noqa: BLE001 (private Ray APIs: any failure means "unknown")
        print(f"warning: cannot tell whether the Ray cluster can add nodes ({one_line(e)}): taken as fixed",
              file=sys.stderr, flush=True)
        return Scaling(False, False)


def _count(n: float, unit: str) -> str:
    """`n` units in words: 1 GPU, 0.5 GPU, 2 GPUs."""
    return f"{n:g} {unit}{'' if 0 < n <= 1 else 's'}"


def place(launch: LaunchConfig, tasks: int, desc: str, device: torch.device, *, workers: int = 1,
          key: str = "") -> float:
    """The GPUs per task (or per training worker); says where the tasks run, and sees that the cluster can
    run one, or `workers` at once (a data-parallel training, `key` its config key): nodes there are,
    nodes the autoscaler adds within `launch.resource_timeout`, or an error at once where it can add
    none. The autoscaler's state is read only where the nodes would not do."""
    import ray

    total, nodes = ray.cluster_resources(), ray.nodes()
    cpus, scaling = launch.num_cpus, None
    cpu_chosen = device.type == "cpu" and torch.cuda.is_available()
    gpu_node = fits(nodes, Group(cpus, 1))
    if launch.num_gpus is None and not cpu_chosen and not gpu_node:
        scaling = _scaling()
    gpus = resolve_num_gpus(launch.num_gpus, cpu_chosen=cpu_chosen, gpu_node=gpu_node,
                            adds_gpus=scaling is not None and scaling.adds_gpus)
    group = Group(cpus, gpus, workers, key)
    if tasks and not fits(nodes, group) and scaling is None:
        scaling = _scaling()
    cluster = (f"{_count(sum(bool(n.get('Alive')) for n in nodes), 'node')}, {_count(total.get('CPU', 0), 'CPU')}, "
               f"{_count(total.get('GPU', 0), 'GPU')}" + ("; it can add nodes" if scaling and scaling.can_add_nodes else ""))
    if gpus:
        each = f"{_count(cpus, 'CPU')} and {_count(gpus, 'GPU')}"
    else:
        why = ("launch.num_gpus: 0" if launch.num_gpus is not None else "device: cpu" if cpu_chosen
               else "no node has a GPU for them")
        each = f"{_count(cpus, 'CPU')}, on the CPU ({why})"
    what = _count(tasks, "task") if workers == 1 else f"{_count(workers, 'training worker')} ({key})"
    print(f"{desc}: {what} on Ray ({cluster}), each with {each}", flush=True)
    if not tasks or fits(nodes, group):
        return gpus
    if not scaling.can_add_nodes:
        check_resources(nodes, group)
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[{"CPU": cpus, "GPU": gpus}] * workers)
    room = "a node with" if workers == 1 else f"nodes for {workers} training workers of"
    print(f"{desc}: waiting up to {launch.resource_timeout:g} s for the autoscaler to add {room} "
          f"{_count(cpus, 'CPU')} and {_count(gpus, 'GPU')} (launch.resource_timeout)", flush=True)
    try:
        wait_for_node(ray.nodes, group, launch.resource_timeout)
    finally:
        request_resources(bundles=[])  # the tasks' own demand keeps the node; the cluster may shrink after them
    return gpus


def _run_ray(fn: TaskFn, jobs: Sequence[Job], shared: tuple, launch: LaunchConfig, on_done: OnDone,
             checkpoints: Path, desc: str, device: torch.device) -> dict:
    import ray
    from ray.exceptions import RayError, RayTaskError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    num_gpus = place(launch, len(jobs), desc, device)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    store = ray.remote(CheckpointStore).options(
        name=store_name(checkpoints), num_cpus=0, scheduling_strategy=here).remote(checkpoints)
    local = CheckpointStore(checkpoints)  # the same folder, read by the driver
    t0 = time.perf_counter()
    shared_refs = [ray.put(to_shared(x)) for x in shared]  # once, whatever the number of tasks
    transfer = time.perf_counter() - t0
    task = ray.remote(_ray_task)

    def submit(job: Job):
        return task.options(name=f"{desc} {job.name}", num_cpus=launch.num_cpus, num_gpus=num_gpus,
                            max_retries=0).remote(fn, job, local.load(job.name), _ActorStore(store),
                                                  launch.num_cpus, *shared_refs)

    submitted = time.time()
    pending = {submit(job): job for job in jobs}
    restarts: dict[str, int] = {}
    failures = []
    try:
        with tqdm(total=len(jobs), desc=desc, unit="task", file=sys.stderr, disable=None) as bar:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                job = pending.pop(ready[0])
                try:
                    result = ray.get(ready[0])
                except RayTaskError as e:  # the task itself raised: running it again would not help
                    failures.append(f"{job.name}: {one_line(e.cause or e)}")
                    bar.update()
                    continue
                except RayError as e:  # its worker or node died: start it again from its last checkpoint
                    restarts[job.name] = restarts.get(job.name, 0) + 1
                    if restarts[job.name] <= launch.max_retries:
                        print(f"{job.name}: {type(e).__name__}; restarting it from its last checkpoint "
                              f"({restarts[job.name]}/{launch.max_retries})", file=sys.stderr, flush=True)
                        pending[submit(job)] = job
                        continue
                    failures.append(f"{job.name}: {type(e).__name__} {launch.max_retries + 1} times: {one_line(e)}")
                    bar.update()
                    continue
                try:
                    on_done(job, result)
                except Exception as e:  # writing its result failed
                    failures.append(f"{job.name}: {one_line(e)}")
                bar.update()
    finally:
        for ref in pending:  # interrupted: stop the tasks still running; their checkpoints stay
            ray.cancel(ref, force=True)
        ray.kill(store)
    if failures:
        raise TasksFailed(f"{len(failures)} of {len(jobs)} tasks failed (the others are saved):\n"
                          + "\n".join(failures))
    return {"transfer_seconds": transfer, "submitted": submitted, "restarts": restarts}


class CheckpointStore:
    """Where a task's checkpoints live: on the driver's machine, so a task started again resumes on any
    node, and no shared filesystem is assumed. The latest checkpoint per task name is kept in
    `<folder>/<name>/checkpoint.pt`, written atomically. Inline it is a plain object; on Ray an actor
    on the driver's node, to which tasks send their checkpoints without waiting (a Ray task blocked on
    a result lends its CPU to other tasks)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._progress: dict[str, dict] = {}

    def load(self, name: str) -> bytes | None:
        """The task's last checkpoint, or None if it has none yet or it is corrupt (a warning names it)."""
        path = NetDir(self.folder / name).checkpoint
        return path.read_bytes() if load_checkpoint(path) is not None else None

    def save(self, name: str, checkpoint: bytes, epoch: int, pid: int) -> None:
        """Keep the checkpoint written after `epoch` by process `pid`, atomically."""
        with atomic_path(NetDir(self.folder / name).checkpoint) as tmp:
            tmp.write_bytes(checkpoint)
        self._progress[name] = {"epoch": epoch, "pid": pid, "time": time.time()}

    def progress(self) -> dict[str, dict]:
        """Per task: the last epoch saved, the process that saved it, and when."""
        return dict(self._progress)


@dataclass(frozen=True)
class TaskFolder:
    """A task's training folder: `fit(..., workdir=folder, on_epoch=on_epoch)` resumes from the
    checkpoint it holds (saved after epoch `resumed_from`, 0 for none) and hands each new one to the store."""

    folder: Path
    resumed_from: int
    on_epoch: Callable[[list[dict]], None]


@contextmanager
def task_folder(name: str, checkpoint: bytes | None, store: Store) -> Iterator[TaskFolder]:
    """A temporary folder for task `name`'s training, holding `checkpoint` if there is one."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / CHECKPOINT
        resumed = 0
        if checkpoint is not None:  # the store checked it
            path.write_bytes(checkpoint)
            resumed = int(load_checkpoint(path)["epoch"])

        def on_epoch(history: list[dict]) -> None:
            store.save(name, path.read_bytes(), len(history), os.getpid())

        yield TaskFolder(Path(tmp), resumed, on_epoch)


def set_up_process(threads: int | None = None) -> None:
    """What a process that trains sets before it computes: `threads` torch threads if given, and denormal
    floats flushed to zero. The tiny gradients and Adam moments of the classes far from an input decay
    into denormals, and arithmetic on them costs many times the normal: without this the default run's
    epochs slow by a third as training goes on (its weights are the same, bit for bit). Threads torch
    starts afterwards inherit the setting."""
    if threads is not None:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity), which a local Ray cluster counts as its own."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


USER_ERRORS = (ValueError, FileNotFoundError, ConnectionError)  # bad settings, files, data, an unreachable cluster


def one_line(error: BaseException) -> str:
    """An error as one line: its message's first line, with its type unless it is one a user causes."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    user_made = isinstance(error, USER_ERRORS)
    return message if user_made and message else f"{type(error).__name__}: {message}".rstrip(": ")


def store_name(checkpoints: Path) -> str:
    """The name of the store actor of a run's stage folder; a second driver on the same folder fails."""
    return f"checkpoints:{Path(checkpoints).resolve()}"


@dataclass(frozen=True)
class _Array:
    """A tensor as `to_shared` sends it: a numpy array over the same memory."""

    array: Any


def to_shared(value: Any) -> Any:
    """`value` as it goes to Ray's object store: its CPU tensors (itself, in a tuple, or a dataclass
    instance's fields) as numpy arrays over the same memory, anything else as it is. Ray's workers read
    numpy arrays in place from their node's shared object store, one copy for every task on the node,
    where each task would get its own copy of a tensor."""
    if isinstance(value, torch.Tensor) and value.device.type == "cpu":
        return _Array(value.numpy())
    if isinstance(value, tuple):
        return tuple(to_shared(v) for v in value)
    return _with_fields(value, torch.Tensor, to_shared)


def from_shared(value: Any) -> Any:
    """What `to_shared` gave, with its tensors back as views of the arrays' memory: in a Ray task, the
    object store's read-only pages, shared by every task on the node, so nothing may write those tensors
    in place (torch cannot mark a tensor read-only; training reads its images into new float tensors)."""
    if isinstance(value, _Array):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
            return torch.from_numpy(value.array)
    if isinstance(value, tuple):
        return tuple(from_shared(v) for v in value)
    return _with_fields(value, _Array, from_shared)


def _with_fields(value: Any, kind: type, change: Callable[[Any], Any]) -> Any:
    """A copy of dataclass instance `value` with `change` applied to its fields of type `kind`; `value`
    itself where it is no dataclass instance or has no such field."""
    if not dataclasses.is_dataclass(value) or isinstance(value, type):
        return value
    names = [f.name for f in dataclasses.fields(value) if isinstance(getattr(value, f.name), kind)]
    if not names:
        return value
    changed = copy.copy(value)
    for name in names:
        object.__setattr__(changed, name, change(getattr(value, name)))
    return changed


class _ActorStore:
    """The `CheckpointStore.save` of a Ray actor, for the tasks: sent without waiting for it."""

    def __init__(self, actor):
        self.actor = actor

    def save(self, name: str, checkpoint: bytes, epoch: int, pid: int) -> None:
        self.actor.save.remote(name, checkpoint, epoch, pid)


def _ray_task(fn: TaskFn, job: Job, checkpoint: bytes | None, store: _ActorStore, num_cpus: float,
              *shared: Any) -> Any:
    """Inside a Ray worker: as many torch threads as CPUs reserved; the GPU Ray assigned, if any (a
    logical GPU on a machine without CUDA leaves the task on the CPU, and says so); the shared inputs'
    tensors read in place from the node's object store (`from_shared`)."""
    import ray

    set_up_process(threads=max(1, int(num_cpus)))
    gpus = ray.get_gpu_ids()
    device = torch.device("cuda" if gpus and torch.cuda.is_available() else "cpu")
    if gpus and device.type == "cpu":
        print(f"{job.name}: Ray assigned GPU {gpus} but CUDA is not available here: training on the CPU", flush=True)
    return fn(job, checkpoint, store, device, *(from_shared(x) for x in shared))
