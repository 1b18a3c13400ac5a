"""The stages in order, and the logic that skips a done stage and reruns a changed one.

A stage's fingerprint hashes the config sections it reads and the content hashes of its input stages'
outputs. A stage is done when the manifest records it done under the current fingerprint and every
output it recorded is still there with the same hash. A stage whose fingerprint changed starts from an
empty folder; a stage interrupted under the same fingerprint keeps its folder and resumes from its
checkpoints. Since outputs feed the fingerprints after them, rerunning a stage reruns everything after
it whose inputs changed.
"""
from __future__ import annotations

import os
import shutil
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import baselines
import cluster
import combiner
import distill_back
import generalist
import specialists

from .config import Config, config_hash, to_dict
from .data import check as check_data
from .data import data_fingerprint, fingerprints_held, load_data
from .launch import held_sessions, set_up_process
from .layout import STAGE_NAMES, RunDir
from .rundir import Manifest, file_hash, output_hashes, write_run_files


@dataclass(frozen=True)
class Stage:
    """A function of the run directory, the config sections it reads, and the stages it reads from."""

    name: str
    run: Callable[[Path, Config], dict]
    reads: Callable[[Config], Any]
    after: tuple[str, ...] = ()
    metric: str = ""  # the summary key `ensemble status` shows
    check: Callable[[Config], None] = lambda cfg: None  # raises on bad settings, before any stage runs


STAGES: tuple[Stage, ...] = (
    Stage("generalist", generalist.run, lambda c: (c.seed, c.generalist, data_fingerprint(c.data),
                                                   *_weight_files(c.generalist.checkpoint, c.generalist.net.weights)),
          metric="test_top1", check=generalist.check),
    Stage("cluster", cluster.run, lambda c: (c.seed, c.cluster, data_fingerprint(c.data)), after=("generalist",),
          metric="confusion_capture", check=cluster.check),
    Stage("specialists", specialists.run, lambda c: (c.seed, c.generalist.net, c.specialists, _subsets_file(c),
                                                     data_fingerprint(c.data)),
          after=("generalist", "cluster"), metric="conditional_gain", check=specialists.check),
    Stage("baselines", baselines.run, lambda c: (c.seed, c.generalist, c.baselines, data_fingerprint(c.data),
                                                 *_weight_files(c.generalist.net.weights)),
          after=("generalist", "specialists"), metric="compute_top1", check=baselines.check),
    Stage("combiner", combiner.run, lambda c: (c.combine, data_fingerprint(c.data)),
          after=("generalist", "specialists", "baselines"), metric="ensemble_top1"),
    Stage("distill_back", distill_back.run, lambda c: (c.seed, c.generalist, c.combine, c.distill_back,
                                                       data_fingerprint(c.data),
                                                       *_weight_files(getattr(c.distill_back.net, "weights", None))),
          after=("generalist", "specialists", "baselines", "combiner"), metric="student_top1",
          check=distill_back.check),
)
assert tuple(s.name for s in STAGES) == STAGE_NAMES  # the layout's folders are the stages'


def _weight_files(*paths: str | None) -> tuple[str, ...]:
    """What the weight files a stage starts from hold: their content hashes (the config hashes no path:
    a moved file is the same input), `torchvision` for torchvision's pretrained weights (fixed by name),
    a marker for a file that is gone (its stage cannot be verified: stale). Nothing for none, so that the
    runs made before these settings keep their fingerprints."""
    return tuple("torchvision" if p == "torchvision" else file_hash(Path(p)) if Path(p).is_file() else f"missing {p}"
                 for p in paths if p is not None)


def _subsets_file(cfg: Config) -> str | None:
    """The content hash of a user's subsets file (the specialists read it instead of the cluster's)."""
    path = cfg.specialists.subsets
    if path is None:
        return None
    if not Path(path).is_file():
        raise FileNotFoundError(f"specialists.subsets: {path} does not exist")
    return file_hash(Path(path))


def stage_named(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise ValueError(f"unknown stage {name!r}; stages: {[s.name for s in STAGES]}")


def run_pipeline(cfg: Config, only: str | None = None) -> dict[str, dict]:
    """Run every stage (or only the one named), skipping those already done. Returns their summaries."""
    set_up_process()
    stages = STAGES if only is None else (stage_named(only),)
    check_data(cfg.data)  # bad settings stop the run before it writes anything
    for stage in stages:
        stage.check(cfg)
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    write_run_files(run_dir, to_dict(cfg))
    manifest = Manifest(run_dir)
    summaries = {}
    if cfg.data.download:
        load_data(cfg.data)  # fetched before the data's fingerprint lists its files
    with held_sessions(), fingerprints_held():  # the stages that use Ray share one cluster
        for stage in stages:
            for up in stage.after:
                if state(stage_named(up), cfg, manifest) != "done":
                    raise ValueError(f"stage {stage.name} needs stage {up} done first: run `ensemble run` "
                                     f"or `ensemble stage {up}` with the same config")
            summaries[stage.name] = run_stage(stage, cfg, manifest)
    return summaries


def run_stage(stage: Stage, cfg: Config, manifest: Manifest) -> dict:
    """Run one stage unless it is done; record status, fingerprint, inputs, outputs and timing."""
    run_dir = cfg.run_dir
    folder = RunDir(run_dir).stage(stage.name)
    fp, inputs = fingerprint(stage, cfg, manifest)
    entry = manifest.get(stage.name)
    if state(stage, cfg, manifest) == "done":
        print(f"[{stage.name}] done already (fingerprint {fp}): skipped", flush=True)
        return entry["summary"]
    if entry.get("fingerprint") != fp and folder.exists():
        shutil.rmtree(folder)  # outputs and checkpoints of another config or other inputs
    print(f"[{stage.name}] running", flush=True)
    started = time.time()
    manifest.set(stage.name, status="running", fingerprint=fp, seed=cfg.seed, inputs=inputs,
                 started=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)), pid=os.getpid(),
                 host=socket.gethostname())
    try:
        summary = stage.run(run_dir, cfg)
    except KeyboardInterrupt:
        manifest.update(stage.name, status="interrupted")
        raise
    except Exception as e:
        manifest.update(stage.name, status="failed", error="".join(traceback.format_exception_only(e)).strip())
        raise
    manifest.update(stage.name, status="done", outputs=output_hashes(folder), summary=summary,
                    finished=time.strftime("%Y-%m-%dT%H:%M:%S"), seconds=round(time.time() - started, 2))
    return summary


def fingerprint(stage: Stage, cfg: Config, manifest: Manifest) -> tuple[str, dict[str, str]]:
    """The stage's fingerprint, and the hashed input files it was computed from."""
    inputs = {f"{up}/{path}": h for up in stage.after for path, h in manifest.get(up).get("outputs", {}).items()}
    return config_hash(stage.reads(cfg), inputs), inputs


def state(stage: Stage, cfg: Config, manifest: Manifest) -> str:
    """'done', 'stale' (done under another config or inputs, or outputs changed since), the recorded
    status ('running', 'interrupted', 'failed'), 'died' (recorded running, but its process on this host
    is gone: killed), or 'not started'."""
    entry = manifest.get(stage.name)
    if not entry:
        return "not started"
    if entry["status"] == "running" and not _process_alive(entry):
        return "died"
    if entry["status"] != "done":
        return entry["status"]
    if entry["fingerprint"] != fingerprint(stage, cfg, manifest)[0]:
        return "stale"
    if output_hashes(RunDir(cfg.run_dir).stage(stage.name)) != entry["outputs"]:
        return "stale"
    return "done"


def _process_alive(entry: dict) -> bool:
    """Whether the process a manifest entry records is still running; on another host it cannot be told,
    and counts as alive."""
    if entry.get("host") != socket.gethostname() or "pid" not in entry:
        return True
    try:
        os.kill(entry["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        pass
    return True
