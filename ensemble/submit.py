"""`ensemble submit`: the pipeline as a job on a running Ray cluster, through Ray's Jobs API.

The working directory (with the config file, which must lie inside it) is uploaded with the job; the
job's driver runs `ensemble run` on the cluster's head node, where the run directory lives. Its
`runs_dir` is made absolute here, so the run does not land in the job's temporary copy of the
working directory: give an absolute `runs_dir` on a shared filesystem, or fetch the run from the head
node afterwards. Token authentication: with RAY_AUTH_MODE=token (and RAY_AUTH_TOKEN or
~/.ray/auth_token) set here, the client sends the token.
"""
from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from pathlib import Path

from .config import load_config

DEFAULT_ADDRESS = "http://127.0.0.1:8265"  # the head node's dashboard, which serves the Jobs API
EXCLUDES = [".git", "runs", "bench/runs", "*.safetensors", "*.pt", "__pycache__", ".venv"]


def submit(address: str | None, config: Path | None, overrides: list[str], working_dir: Path,
           wait: bool = True) -> int:
    """Submit `ensemble run --config CONFIG OVERRIDES` from `working_dir`; print the job id, then (if
    `wait`) follow its logs to the end. Returns 0 if the job succeeded (or was only submitted), 1 if not."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    working_dir = working_dir.resolve()
    cfg = load_config(config, overrides)  # a bad key or value fails here, before anything is uploaded
    args = ["ensemble", "run"]
    if config is not None:
        config = Path(config).resolve()
        if not config.is_relative_to(working_dir):
            raise ValueError(f"--config {config} is outside the working directory {working_dir}, which is "
                             "what travels with the job: move it inside or pass --working-dir")
        args += ["--config", config.relative_to(working_dir).as_posix()]
    runs_dir = Path(cfg.runs_dir) if Path(cfg.runs_dir).is_absolute() else working_dir / cfg.runs_dir
    args += [*overrides, f"runs_dir={runs_dir}"]
    address = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    try:
        client = JobSubmissionClient(address)
    except ConnectionError as e:
        raise ConnectionError(f"{e} Is a Ray cluster running there (`ray start --head`), and is that its "
                              "dashboard's address?") from None
    job_id = _submit_job(client, entrypoint=shlex.join(args),
                         runtime_env={"working_dir": str(working_dir), "excludes": EXCLUDES})
    print(f"submitted job {job_id} to {address}: {shlex.join(args)}\n"
          f"run directory (on the node that runs the job's driver): {runs_dir / cfg.name}", flush=True)
    if not wait:
        print(f"follow it with: ray job logs --follow {job_id} --address {address}")
        return 0
    asyncio.run(_follow(client, job_id))
    status = client.get_job_status(job_id)
    print(f"job {job_id}: {status.value}", flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1


def _submit_job(client, agent_wait: float = 120, **job) -> str:
    """client.submit_job(**job), waiting up to `agent_wait` seconds for a cluster that has just started
    and whose job agent is not up yet (Ray answers 500 "No available agent" until it is)."""
    deadline = time.monotonic() + agent_wait
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            print("the cluster's job agent is not up yet: retrying", file=sys.stderr, flush=True)
            time.sleep(5)


async def _follow(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)
