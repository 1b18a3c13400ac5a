"""The generalist's predictions on a labelled split, kept sparse: per example its top-k probabilities,
their class ids and the mass of all the other classes, written in chunks as they are computed, so that
neither the generalist stage nor a reader ever holds the N × C matrix. Where k is at least half the
classes the dense form is smaller and is kept instead (with the logits, which only it can keep).

Files: `<folder>/<split>-00000.safetensors`, ... each holding up to CHUNK_ROWS examples: `probs`
(n, k) float32, most probable first, `ids` (n, k) int32 (sparse only), `rest` (n,) float32, `labels`
(n,) int64, and for the dense form `logits` (n, C) float32.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import sparse

from .rundir import load_tensors, save_tensors

CHUNK_ROWS = 16384  # examples per file: 16,384 × k × 8 bytes (sparse), or × C × 8 (dense, probs and logits)


@dataclass(frozen=True)
class Chunk:
    """Consecutive examples' predictions: `probs` over the classes `ids` (None: every class, in order),
    `rest` the probability of the classes not kept, `labels` the true classes, and `logits` where dense."""

    probs: torch.Tensor
    ids: torch.Tensor | None
    rest: torch.Tensor
    labels: torch.Tensor
    logits: torch.Tensor | None = None

    def csr(self, num_classes: int) -> sparse.csr_matrix:
        """The kept probabilities as an (n, C) sparse float64 matrix, 0 where not kept."""
        n, k = self.probs.shape
        ids = np.broadcast_to(np.arange(k), (n, k)) if self.ids is None else self.ids.numpy()
        return sparse.csr_matrix((self.probs.double().numpy().ravel(), ids.ravel().astype(np.int64),
                                  np.arange(n + 1) * k), shape=(n, num_classes))


def sparsify(logits: torch.Tensor, labels: torch.Tensor, k: int | None) -> Chunk:
    """The predictions of `logits` (n, C) kept as their top `k` probabilities (None, or k ≥ C/2: dense).
    `rest` sums the other classes' probabilities (never 1 - the kept ones, which cancels)."""
    probs = logits.double().softmax(dim=1)
    num_classes = logits.shape[1]
    if k is None or 2 * k >= num_classes:
        return Chunk(probs.float(), None, torch.zeros(len(probs)), labels, logits.float())
    top = probs.topk(k, dim=1)
    rest = probs.scatter(1, top.indices, 0).sum(dim=1)
    return Chunk(top.values.float(), top.indices.int(), rest.float(), labels)


def write_predictions(folder: Path, split: str, chunks: Iterable[Chunk]) -> int:
    """Write `chunks` (of any sizes) as files of CHUNK_ROWS examples; returns the examples written.
    Each file is written atomically; files of an earlier, longer write of this split are removed."""
    folder.mkdir(parents=True, exist_ok=True)
    held: list[Chunk] = []
    count = written = 0
    for chunk in chunks:
        held.append(chunk)
        count += len(chunk.labels)
        while count >= CHUNK_ROWS:
            whole = _joined(held)
            _save(folder, split, written // CHUNK_ROWS, _rows(whole, 0, CHUNK_ROWS))
            held, count, written = [_rows(whole, CHUNK_ROWS, None)], count - CHUNK_ROWS, written + CHUNK_ROWS
    if count or not written:
        _save(folder, split, written // CHUNK_ROWS, _joined(held) if held else None)
        written += count
    for stale in chunk_paths(folder, split)[-(-written // CHUNK_ROWS) or 1:]:
        stale.unlink()
    return written


def read_predictions(folder: Path, split: str) -> Iterator[Chunk]:
    """The chunks of one split, in order; a FileNotFoundError naming the folder if there are none."""
    paths = chunk_paths(folder, split)
    if not paths:
        raise FileNotFoundError(f"{folder} holds no {split} predictions ({split}-00000.safetensors): run the "
                                "generalist stage")
    for path in paths:
        t = load_tensors(path)
        yield Chunk(t["probs"], t.get("ids"), t["rest"], t["labels"], t.get("logits"))


def read_split(folder: Path, split: str) -> Chunk:
    """A whole split's predictions as one `Chunk` (for small sets: the tests, a look at a run)."""
    return _joined(list(read_predictions(folder, split)))


def chunk_paths(folder: Path, split: str) -> list[Path]:
    return sorted(Path(folder).glob(f"{split}-[0-9][0-9][0-9][0-9][0-9].safetensors"))


def prediction_matrix(folder: Path, split: str, num_classes: int) -> tuple[sparse.csr_matrix, np.ndarray]:
    """The kept probabilities of a split as one (N, C) sparse matrix (N·k entries), and the labels."""
    chunks = list(read_predictions(folder, split))
    return (sparse.vstack([c.csr(num_classes) for c in chunks], format="csr"),
            torch.cat([c.labels for c in chunks]).numpy())


def dense_logits(folder: Path, split: str) -> np.ndarray:
    """The logits (N, C) of a split kept in the dense form; a ValueError for the sparse form."""
    parts = [c.logits for c in read_predictions(folder, split)]
    if any(p is None for p in parts):
        raise ValueError(f"{folder} holds the generalist's top-k probabilities, not its logits: set "
                         "generalist.top_k=null to keep them dense, or cluster.inputs=probs")
    return torch.cat(parts).numpy()


def _save(folder: Path, split: str, index: int, chunk: Chunk | None) -> None:
    if chunk is None:
        chunk = Chunk(torch.zeros(0, 0), None, torch.zeros(0), torch.zeros(0, dtype=torch.long))
    tensors = {"probs": chunk.probs, "rest": chunk.rest, "labels": chunk.labels}
    if chunk.ids is not None:
        tensors["ids"] = chunk.ids
    if chunk.logits is not None:
        tensors["logits"] = chunk.logits
    save_tensors(folder / f"{split}-{index:05d}.safetensors", tensors)


def _joined(chunks: list[Chunk]) -> Chunk:
    def cat(name: str) -> torch.Tensor | None:
        parts = [getattr(c, name) for c in chunks]
        return None if parts[0] is None else torch.cat(parts)
    return Chunk(cat("probs"), cat("ids"), cat("rest"), cat("labels"), cat("logits"))


def _rows(chunk: Chunk, start: int, stop: int | None) -> Chunk:
    def part(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[start:stop]
    return Chunk(part(chunk.probs), part(chunk.ids), part(chunk.rest), part(chunk.labels), part(chunk.logits))
