"""The launcher: runs one task function over many jobs, inline or as Ray tasks. It only decides where a
task runs; what the task computes does not depend on it.

A task is `fn(job, checkpoint, store, device, *shared)`. `shared` (weights, the data, the config) goes
to the workers once, through Ray's object store; `checkpoint` is the job's last checkpoint (None at
first) and `store` takes its new ones (`CheckpointStore`), on the driver's machine; the task returns
its result to the driver, which calls `on_done(job, result)` to write it into the run directory. The
launcher restarts a task whose worker or node died, up to `launch.max_retries` times, from its last
checkpoint. A task trains in a `task_folder`, which resumes from the checkpoint and hands each new one
to the store.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

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
              checkpoints: Path, device: torch.device, desc: str = "tasks") -> dict:
    """Run `fn` for every job on the configured backend; `on_done` each result as it arrives. A job that
    fails does not stop the others: the failures are raised together at the end. Returns the launcher's
    own costs: seconds to start or join Ray, seconds to put `shared` in the object store, and the time
    the tasks were submitted."""
    if launch.backend == "inline":
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
        costs = _run_ray(fn, jobs, shared, launch, on_done, checkpoints, desc)
    return {"backend": "ray", "startup_seconds": startup, **costs}


@contextmanager
def ray_session(launch: LaunchConfig) -> Iterator[None]:
    """Use the Ray session already open in this process, or connect to `launch.address` / $RAY_ADDRESS,
    or start a local Ray cluster on this machine, on loopback only, for the duration (the local
    multi-process mode)."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # show every task's progress lines (read when ray is imported)
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
    instead of starting one each."""
    _held["holding"] = True
    try:
        yield
    finally:
        _held["holding"] = False
        if _held["opened"]:
            import ray

            _held["opened"] = False
            ray.shutdown()


def _init_on_loopback() -> None:
    """Start a Ray cluster for this machine alone, every server bound to 127.0.0.1, without a dashboard.
    Ray 2.60 binds its gRPC servers to all interfaces unless its node address is loopback, and picks the
    machine's address unless its multi-node mode (ray_constants.ENABLE_RAY_CLUSTER, read at each call;
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 at import) is off: off for this call only."""
    import ray
    from ray._private import ray_constants

    multi_node = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        # "local": a new cluster, never the one the last `ray start` on this machine left its address for
        ray.init(address="local", include_dashboard=False, log_to_driver=True, _node_ip_address="127.0.0.1")
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = multi_node


def check_resources(nodes: list[dict], num_cpus: float, num_gpus: float) -> None:
    """Raise if no alive node of the cluster (`ray.nodes()`) has the CPUs and GPUs one task asks for:
    Ray would wait for such a node for ever."""
    alive = [n["Resources"] for n in nodes if n.get("Alive")]
    if any(r.get("CPU", 0) >= num_cpus and r.get("GPU", 0) >= num_gpus for r in alive):
        return
    have = ", ".join(f"{r.get('CPU', 0):g} CPUs and {r.get('GPU', 0):g} GPUs" for r in alive) or "no alive nodes"
    raise ValueError(f"no node of the Ray cluster can run a task that asks for {num_cpus:g} CPUs and "
                     f"{num_gpus:g} GPUs (launch.num_cpus, launch.num_gpus); its nodes have: {have}")


def _run_ray(fn: TaskFn, jobs: Sequence[Job], shared: tuple, launch: LaunchConfig, on_done: OnDone,
             checkpoints: Path, desc: str) -> dict:
    import ray
    from ray.exceptions import RayError, RayTaskError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    check_resources(ray.nodes(), launch.num_cpus, launch.num_gpus)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    store = ray.remote(CheckpointStore).options(
        name=store_name(checkpoints), num_cpus=0, scheduling_strategy=here).remote(checkpoints)
    local = CheckpointStore(checkpoints)  # the same folder, read by the driver
    t0 = time.perf_counter()
    shared_refs = [ray.put(x) for x in shared]  # once, whatever the number of tasks
    transfer = time.perf_counter() - t0
    task = ray.remote(_ray_task)

    def submit(job: Job):
        return task.options(name=f"{desc} {job.name}", num_cpus=launch.num_cpus, num_gpus=launch.num_gpus,
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


USER_ERRORS = (ValueError, FileNotFoundError, ConnectionError)  # bad settings, files, data, an unreachable cluster


def one_line(error: BaseException) -> str:
    """An error as one line: its message's first line, with its type unless it is one a user causes."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    user_made = isinstance(error, USER_ERRORS)
    return message if user_made and message else f"{type(error).__name__}: {message}".rstrip(": ")


def store_name(checkpoints: Path) -> str:
    """The name of the store actor of a run's stage folder; a second driver on the same folder fails."""
    return f"checkpoints:{Path(checkpoints).resolve()}"


class _ActorStore:
    """The `CheckpointStore.save` of a Ray actor, for the tasks: sent without waiting for it."""

    def __init__(self, actor):
        self.actor = actor

    def save(self, name: str, checkpoint: bytes, epoch: int, pid: int) -> None:
        self.actor.save.remote(name, checkpoint, epoch, pid)


def _ray_task(fn: TaskFn, job: Job, checkpoint: bytes | None, store: _ActorStore, num_cpus: float,
              *shared: Any) -> Any:
    """Inside a Ray worker: as many torch threads as CPUs reserved; the GPU Ray assigned, if any (a
    logical GPU on a machine without CUDA leaves the task on the CPU, and says so)."""
    import ray

    set_up_process(threads=max(1, int(num_cpus)))
    gpus = ray.get_gpu_ids()
    device = torch.device("cuda" if gpus and torch.cuda.is_available() else "cpu")
    if gpus and device.type == "cpu":
        print(f"{job.name}: Ray assigned GPU {gpus} but CUDA is not available here: training on the CPU", flush=True)
    return fn(job, checkpoint, store, device, *shared)
