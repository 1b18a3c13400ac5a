"""On a real two-node Ray cluster on this machine (`ray start --head` and `ray start --address` on
loopback, token authentication on): the pipeline submitted through the Jobs API runs its specialists on
both nodes and its generalist on a training worker on each, and every process the test started is gone
afterwards."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import SPECIALISTS_TINY

BIN = Path(sys.executable).parent
JOB = [*SPECIALISTS_TINY, "launch.backend=ray", "launch.num_cpus=1", "cluster.num_subsets=4",
       "specialists.train.epochs=15", "distill_back.train.epochs=1", "generalist.train.workers=2",
       "baselines.budgets=[]"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_processes(marker: str) -> list[int]:
    """Pids of the processes whose command line names `marker` (the cluster's temp dir)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def _wait_for(condition, what: str, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(1)


@pytest.fixture(scope="module")
def cluster():
    """A head node (1 CPU, dashboard with the Jobs API on loopback) and a second node (1 CPU) that joins
    it, each `ray start --block` in its own process group; the environment a client needs."""
    temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths must stay < 108 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard = _free_port(), _free_port()
    common = ["--node-ip-address=127.0.0.1", f"--temp-dir={temp}", "--num-cpus=1", "--disable-usage-stats",
              "--block"]
    log = (temp / "nodes.log").open("w")
    nodes = [subprocess.Popen([BIN / "ray", "start", "--head", f"--port={gcs}", "--include-dashboard=true",
                               "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", *common],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)]
    address = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for(lambda: _alive_nodes(address, env) >= 1, "the head node")
        nodes.append(subprocess.Popen([BIN / "ray", "start", f"--address=127.0.0.1:{gcs}",
                                       "--dashboard-agent-listen-port=0", *common],
                                      env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        _wait_for(lambda: _alive_nodes(address, env) == 2, "the second node")
        yield address, env, temp
    finally:
        for node in reversed(nodes):
            _stop(node)
        left = _ray_processes(str(temp))
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"processes left behind by the Ray nodes: {left}"


def _alive_nodes(address: str, env: dict) -> int:
    """Alive nodes, asked through the dashboard as a client with the cluster's token would."""
    code = ("import sys; from ray.util.state import list_nodes; "
            f"print(sum(n.state == 'ALIVE' for n in list_nodes(address={address!r}, raise_on_missing_output=False)))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    return int(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip().isdigit() else 0


def _stop(node: subprocess.Popen) -> None:
    """SIGTERM to the node's process group (`ray start --block` and the processes it started), then SIGKILL."""
    for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(node.pid, sig)
        except ProcessLookupError:
            return
        try:
            node.wait(timeout=grace)
            time.sleep(2)  # its children get the signal too; give them a moment
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.mark.slow
def test_submitted_pipeline_runs_specialists_and_training_workers_on_both_nodes(cluster, tmp_path):
    address, env, _ = cluster
    project = tmp_path / "project"  # what a user submits: a folder with their config
    project.mkdir()
    (project / "tiny.yaml").write_text(yaml.safe_dump(_nested(JOB)))
    runs = tmp_path / "runs"
    done = subprocess.run([BIN / "ensemble", "submit", "--address", address, "--config", "tiny.yaml",
                           f"runs_dir={runs}", "name=job"], cwd=project, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "submitted job" in done.stdout and f"run directory (on the node that runs the job's driver): {runs}/job" \
        in done.stdout
    manifest = json.loads((runs / "job" / "manifest.json").read_text())
    assert all(manifest["stages"][s]["status"] == "done"
               for s in ("generalist", "cluster", "specialists", "baselines", "combiner", "distill_back"))
    # 2 training workers of 1 CPU each on nodes of 1 CPU each: one on each node
    assert json.loads((runs / "job" / "generalist" / "metrics.json").read_text())["train_workers"] == 2
    assert "generalist: 2 training workers (generalist.train.workers) on Ray (2 nodes, 2 CPUs" in done.stdout
    metrics = [json.loads(p.read_text()) for p in sorted((runs / "job" / "specialists").glob("m*/metrics.json"))]
    assert len(metrics) == 4
    assert len({m["provenance"]["node_id"] for m in metrics}) == 2, [m["provenance"]["node_id"] for m in metrics]


def test_a_client_without_the_token_is_turned_away(cluster, tmp_path):
    address, env, _ = cluster
    code = f"from ray.job_submission import JobSubmissionClient; JobSubmissionClient({address!r}).list_jobs()"
    no_token = {k: v for k, v in env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    no_token["HOME"] = str(tmp_path)  # and no ~/.ray/auth_token to fall back on
    out = subprocess.run([sys.executable, "-c", code], env=no_token, capture_output=True, text=True, timeout=60)
    said = out.stdout + out.stderr
    assert out.returncode != 0 and ("401" in said or "Authentication" in said), said[-2000:]


def _nested(overrides: list[str]) -> dict:
    """key=value overrides as a nested YAML mapping."""
    tree: dict = {}
    for item in overrides:
        key, value = item.split("=", 1)
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return tree


LISTENING = """
import os, subprocess, sys
from ensemble.config import LaunchConfig
from ensemble.launch import ray_session
import ray

with ray_session(LaunchConfig()):
    ray.get(ray.remote(lambda: 1).remote())  # a worker is up too
    children = {}
    for stat in os.listdir("/proc"):
        try:
            ppid = open(f"/proc/{stat}/stat").read().rsplit(")", 1)[1].split()[1]
        except (OSError, IndexError):
            continue
        children.setdefault(ppid, []).append(stat)
    tree, todo = set(), [str(os.getpid())]
    while todo:
        pid = todo.pop()
        tree.add(pid)
        todo += children.get(pid, [])
    for family in ("-4", "-6"):
        for line in subprocess.run(["ss", "-ltnpH", family], capture_output=True, text=True).stdout.splitlines():
            if any(f"pid={pid}," in line for pid in tree):
                print(line.split()[3])
    import urllib.error, urllib.request
    url = ray._private.worker.global_worker.node.address_info["webui_url"]
    try:
        print("status", urllib.request.urlopen(f"http://{url}/api/jobs/").status)  # no token sent
    except urllib.error.HTTPError as e:
        print("status", e.code)
"""


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2) to list listening sockets")
def test_the_local_mode_starts_its_own_cluster_on_loopback_only():
    """`ensemble run` with no Ray address starts a cluster on this machine, even where an earlier
    `ray start` left its (here dead) address behind, none of its servers (GCS, raylet, workers,
    agents, the dashboard) listens beyond loopback, and token authentication is on: the dashboard's
    Jobs API turns away a request without the token."""
    temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths must stay < 108 bytes
    (temp / "ray").mkdir()
    (temp / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")
    env = {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")},
           "RAY_TMPDIR": str(temp)}
    try:
        out = subprocess.run([sys.executable, "-c", LISTENING], env=env, capture_output=True, text=True,
                             timeout=180)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-3000:]
    *addresses, status = out.stdout.split("\n")[:-1]
    assert status == "status 401", out.stdout
    assert len(addresses) >= 3, out.stdout  # the GCS, the raylet, the driver at least
    loopback = ("127.0.0.1:", "[::1]:", "[::ffff:127.0.0.1]:")
    assert all(a.startswith(loopback) for a in addresses), addresses


def test_submit_rejects_a_config_outside_the_working_dir_and_an_unreachable_cluster(tmp_path):
    """Both before anything is uploaded, each with an error that says what to do."""
    project = tmp_path / "project"
    project.mkdir()
    (tmp_path / "outside.yaml").write_text("name: x\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    outside = subprocess.run([BIN / "ensemble", "submit", "--config", str(tmp_path / "outside.yaml")], cwd=project,
                             env=env, capture_output=True, text=True, timeout=120)
    assert outside.returncode == 2 and "outside the working directory" in outside.stderr, outside.stderr
    nobody = subprocess.run([BIN / "ensemble", "submit", "--address", f"http://127.0.0.1:{_free_port()}"],
                            cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert nobody.returncode == 2 and "Is a Ray cluster running there" in nobody.stderr, nobody.stderr[-2000:]
