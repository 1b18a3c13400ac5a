"""Where a task's checkpoints live: on the driver's machine, so a retried task resumes on any node.

No shared filesystem is assumed. After every epoch a task hands its checkpoint to the store, which
writes it into the run directory (`<folder>/<name>/checkpoint.pt`, with `metrics.jsonl`); a task
started again (after its worker died, or in a rerun of the stage) fetches it from the store first.
Inline, the store is a plain object; on Ray it is an actor pinned to the driver's node.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ensemble.rundir import CHECKPOINT, atomic_path, write_text


class CheckpointStore:
    """Latest checkpoint and metric history per task name, kept under `folder`, plus live progress."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._progress: dict[str, dict] = {}

    def load(self, name: str) -> bytes | None:
        """The task's last checkpoint, or None if it has none yet."""
        path = self.folder / name / CHECKPOINT
        return path.read_bytes() if path.is_file() else None

    def save(self, name: str, checkpoint: bytes, history: list[dict], pid: int) -> None:
        """Keep the checkpoint written after the epoch `len(history)`, atomically."""
        with atomic_path(self.folder / name / CHECKPOINT) as tmp:
            tmp.write_bytes(checkpoint)
        write_text(self.folder / name / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
        self._progress[name] = {"epoch": len(history), "pid": pid, "time": time.time()}

    def progress(self) -> dict[str, dict]:
        """Per task: the last epoch saved, the process that saved it, and when."""
        return dict(self._progress)
