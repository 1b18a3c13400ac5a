"""Where a task's checkpoints live: on the driver's machine, so a task started again resumes on any node.

No shared filesystem is assumed. After every epoch a task hands its checkpoint to the store, which
writes it into the run directory (`<folder>/<name>/checkpoint.pt`). When the launcher starts a task
(afresh, after its worker died, or in a rerun of the stage) it passes the task the checkpoint the store
holds. Inline, the store is a plain object; on Ray it is an actor on the driver's node, and tasks send
it their checkpoints without waiting (a Ray task blocked on a result lends its CPU to other tasks).
"""
from __future__ import annotations

import time
from pathlib import Path

from ensemble.rundir import CHECKPOINT, atomic_path


class CheckpointStore:
    """The latest checkpoint per task name, kept under `folder`, and each task's progress."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._progress: dict[str, dict] = {}

    def load(self, name: str) -> bytes | None:
        """The task's last checkpoint, or None if it has none yet."""
        path = self.folder / name / CHECKPOINT
        return path.read_bytes() if path.is_file() else None

    def save(self, name: str, checkpoint: bytes, epoch: int, pid: int) -> None:
        """Keep the checkpoint written after `epoch` by process `pid`, atomically."""
        with atomic_path(self.folder / name / CHECKPOINT) as tmp:
            tmp.write_bytes(checkpoint)
        self._progress[name] = {"epoch": epoch, "pid": pid, "time": time.time()}

    def progress(self) -> dict[str, dict]:
        """Per task: the last epoch saved, the process that saved it, and when."""
        return dict(self._progress)
