"""Writing and reading the run directory (its layout is `layout.py`'s): atomic writes, safetensors and
checkpoints, content hashes, the manifest, the files that say what produced a run."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .layout import CHECKPOINT, STAGE_NAMES, NetDir, RunDir

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give them the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_png(fig: Any, path: Path, dpi: int = 110) -> None:
    """Lay out a matplotlib Figure and write it to `path` as PNG, atomically."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_history(path: Path, history: list[dict]) -> None:
    """A training's per-epoch metrics, one JSON object a line (metrics.jsonl)."""
    write_text(path, "".join(json.dumps(row) + "\n" for row in history))


def read_json(path: Path) -> Any:
    """A JSON file; a ValueError naming it if it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save tensors as safetensors (with string `metadata` in its header, if given), atomically."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def tensors_metadata(path: Path) -> dict[str, str]:
    """The string metadata in a safetensors file's header; a ValueError for an unreadable file."""
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from None


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file with a clear error for a missing or corrupt one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from None


def save_checkpoint(path: Path, state: dict) -> None:
    """Save a resumable state (tensors, numbers, strings only) atomically."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict | None:
    """A checkpoint loaded with `weights_only=True` (nothing in it can run code); None if there is none,
    or, with a one-line warning naming it, if it is corrupt (a kill while it was written elsewhere, a
    damaged disk): then what it would have resumed starts afresh."""
    if not Path(path).is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's own message suggests weights_only=False, which we never do
        print(f"warning: checkpoint {path} is corrupt or not ours ({type(e).__name__}): starting that training "
              "afresh", file=sys.stderr, flush=True)
        return None


def save_trained(folder: NetDir, weights: dict[str, torch.Tensor], history: list[dict], metrics: dict) -> None:
    """Write one trained net's folder: its weights and per-epoch history, then `metrics.json` with the
    weights' sha256. The metrics come last: their presence marks the net done, and the hash lets a
    rerun tell that the weights are still the ones trained (`trained_metrics`)."""
    save_tensors(folder.weights, weights)
    write_history(folder.history, history)
    write_json(folder.metrics, {**metrics, "weights_sha256": file_hash(folder.weights)})


def trained_metrics(folder: NetDir, what: str) -> dict | None:
    """The metrics of the net in `folder` (`what` names it in messages) if it was trained and its weights
    are still the ones it recorded; None if it was never finished, or (with a one-line warning) if its
    metrics are unreadable or its weights changed or went missing since: then it is trained again."""
    if not folder.metrics.is_file():
        return None
    try:
        metrics = json.loads(folder.metrics.read_text())
        intact = folder.weights.is_file() and metrics.get("weights_sha256") == file_hash(folder.weights)
    except (OSError, ValueError):
        intact = False
    if not intact:
        print(f"warning: {what}'s weights {folder.weights} are not the ones it trained (changed, unreadable or "
              "missing): training it again", file=sys.stderr, flush=True)
        return None
    return metrics


def read_trained(folder: NetDir) -> dict:
    """The metrics `save_trained` recorded for the net in `folder`, without the weights' hash."""
    return {k: v for k, v in read_json(folder.metrics).items() if k != "weights_sha256"}


def file_hash(path: Path) -> str:
    """sha256 of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def output_hashes(stage_dir: Path) -> dict[str, str]:
    """Content hash of every output file below a stage's folder (checkpoints, temp files and dot-folders
    such as Ray Train's storage excluded)."""
    out = {}
    for p in sorted(Path(stage_dir).rglob("*")):
        rel = p.relative_to(stage_dir)
        if p.is_file() and p.name != CHECKPOINT and not any(part.startswith(".") for part in rel.parts):
            out[rel.as_posix()] = file_hash(p)
    return out


class Manifest:
    """manifest.json: per stage its status, fingerprint, outputs with hashes, seed and timings. Each stage
    keeps a copy of its entry in its own folder, so that a manifest that cannot be read is rebuilt from
    them (and the outputs are verified against them as ever) instead of every stage being redone."""

    def __init__(self, run_dir: Path):
        self.paths = RunDir(run_dir)
        self.path = self.paths.manifest
        self.stages: dict[str, dict] = {}
        if self.path.exists():
            try:
                self.stages = read_json(self.path)["stages"]
            except (ValueError, KeyError, TypeError) as e:
                self.stages = self._rebuilt()
                write_json(self.path, {"stages": self.stages})
                print(f"warning: {self.path} is unreadable ({type(e).__name__}): rebuilt from the stages' own "
                      f"records ({', '.join(self.stages) or 'none found'}); the rest will be redone",
                      file=sys.stderr, flush=True)

    def get(self, stage: str) -> dict:
        return self.stages.get(stage, {})

    def set(self, stage: str, **entry: Any) -> None:
        self.stages[stage] = entry
        write_json(self.paths.stage_record(stage), entry)
        write_json(self.path, {"stages": self.stages})

    def update(self, stage: str, **fields: Any) -> None:
        self.set(stage, **{**self.get(stage), **fields})

    def _rebuilt(self) -> dict[str, dict]:
        """The entries of the stages whose folder holds a readable record."""
        entries = {}
        for name in STAGE_NAMES:
            try:
                entries[name] = read_json(self.paths.stage_record(name))
            except (OSError, ValueError):
                continue
        return entries


def write_run_files(run_dir: Path, config: dict) -> None:
    """config.yaml (the full resolved config) and env.json (versions, argv, host, git commit)."""
    paths = RunDir(run_dir)
    write_text(paths.config, yaml.safe_dump(config, sort_keys=False))
    write_json(paths.env, environment())


def environment() -> dict:
    """What produced a run: package versions, command line, host, git commit, time."""
    versions = {}
    for pkg in ("specialist-ensembles", "torch", "torchvision", "numpy", "scikit-learn", "ray", "safetensors"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "argv": sys.argv,
        "python": platform.python_version(),
        "versions": versions,
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "git_commit": _git_commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _git_commit() -> str | None:
    """The commit of the source tree this package runs from, if it is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
