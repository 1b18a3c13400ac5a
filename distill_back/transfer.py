"""The transfer set and its soft targets: the teacher's log-probabilities for every input (all of them, or
its top-k and a tail bucket), computed once, streamed to disk and memory-mapped."""
from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ensemble.data import Data, Images, image_batches
from ensemble.rundir import file_hash, write_json
from ensemble.train import augment

from .loss import UNLABELLED


def transfer_set(data: Data, copies: int, seed: int, batch_size: int = 4096) -> tuple[Images, torch.Tensor]:
    """uint8 images and labels: the training set, then `copies` passes over it under random affine maps
    (rotation, scale, shear, shift), labelled UNLABELLED: soft targets need no labels. Copies are of
    in-memory images (`distill_back.check` refuses them for a streamed set)."""
    if copies == 0:
        return data.x_train, data.y_train
    gen = torch.Generator().manual_seed(seed)
    images, labels = [data.x_train], [data.y_train]
    for _ in range(copies):
        for start in range(0, len(data.x_train), batch_size):
            x = data.x_train[start:start + batch_size].float().div_(255)
            images.append(augment(x, "affine", gen).mul_(255).round_().clamp_(0, 255).to(torch.uint8))
        labels.append(torch.full_like(data.y_train, UNLABELLED))
    return torch.cat(images), torch.cat(labels)


@dataclass(frozen=True)
class SoftTargets:
    """A teacher's targets on the transfer set, memory-mapped from their folder: log q (N, C) over every
    class, or each example's top-k log q with their class ids (most probable first) and the tail bucket,
    log Σ_{c not kept} q_c^{1/T}: the mass of the classes not kept at the distillation's temperature."""

    log_q: torch.Tensor
    ids: torch.Tensor | None = None
    log_tail: torch.Tensor | None = None

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """As `fit` takes targets (with the labels after them) and `distillation_loss` the teacher."""
        return (self.log_q,) if self.ids is None else (self.ids, self.log_q, self.log_tail)


FILES = ("log_q", "ids", "log_tail")


def soft_targets(folder: Path, key: str, predict_proba: Callable[[torch.Tensor], torch.Tensor], x: Images,
                 batch_size: int, top_k: int | None, temperature: float, desc: str = "soft targets") -> SoftTargets:
    """The teacher's soft targets for uint8 images `x`, streamed to `folder` batch by batch (`top_k`
    classes and the tail bucket per example; None, or top_k ≥ C: every class) as .npy files filled in
    place, with `progress.json` recording the rows written under `key` (what the targets depend on).
    A rerun with the same key goes on from the last batch written; a finished set whose files no longer
    match their recorded hashes, or another key's, is made again (with a warning for the former).
    Probabilities are clamped at float32's tiny, so that log q of the combiner stays finite."""
    progress = _progress(folder, key)
    if progress is not None and progress.get("done"):
        if all(file_hash(folder / f"{name}.npy") == digest for name, digest in progress["sha256"].items()):
            return _open(folder, progress)
        print(f"warning: the soft targets in {folder} do not match their recorded hashes: making them again",
              file=sys.stderr, flush=True)
        progress = None
    start = 0 if progress is None else progress["rows"]
    arrays: dict[str, np.ndarray] | None = None if progress is None else _arrays(folder, progress, "r+")
    tiny = torch.finfo(torch.float32).tiny
    batches = image_batches(x[start:] if start else x, batch_size)
    for xb in tqdm(batches, total=-(-(len(x) - start) // batch_size), desc=desc, leave=False, disable=None):
        q = predict_proba(xb).float().cpu()
        if not torch.isfinite(q).all():
            raise ValueError(f"the teacher's probabilities are not finite for inputs {start}..{start + len(q) - 1}")
        log_q = q.clamp_min_(tiny).log_()
        if arrays is None:
            classes = log_q.shape[1]
            k = classes if top_k is None or top_k >= classes else top_k
            progress = {"key": key, "rows": 0, "examples": len(x), "classes": classes, "k": k}
            arrays = _arrays(folder, progress, "w+")
        rows = slice(start, start + len(log_q))
        if progress["k"] == progress["classes"]:
            arrays["log_q"][rows] = log_q.numpy()
        else:
            top = log_q.topk(progress["k"], dim=1)
            arrays["log_q"][rows] = top.values.numpy()
            arrays["ids"][rows] = top.indices.int().numpy()
            arrays["log_tail"][rows] = (log_q / temperature).scatter_(1, top.indices, -torch.inf).logsumexp(dim=1).numpy()
        for array in arrays.values():
            array.flush()
        start += len(log_q)
        _write_progress(folder, {**progress, "rows": start})
    del arrays  # unmapped: the hashes read what is on disk
    names = FILES[:1] if progress["k"] == progress["classes"] else FILES
    progress = {**progress, "rows": start, "done": True, "sha256": {n: file_hash(folder / f"{n}.npy") for n in names}}
    _write_progress(folder, progress)
    return _open(folder, progress)


def _progress(folder: Path, key: str) -> dict | None:
    """progress.json if it records soft targets made under `key` whose files are there, else None."""
    try:
        progress = json.loads((folder / "progress.json").read_text())
    except (OSError, ValueError):
        return None
    names = FILES[:1] if progress.get("k") == progress.get("classes") else FILES
    if progress.get("key") != key or not all((folder / f"{n}.npy").is_file() for n in names):
        return None
    return progress


def _arrays(folder: Path, progress: dict, mode: str) -> dict[str, np.ndarray]:
    """The .npy files of a progress record, memory-mapped: created (`w+`), or opened to write (`r+`) or
    copy-on-write (`c`: pages read as a batch needs them, never written back)."""
    n, k = progress["examples"], progress["k"]
    shapes = {"log_q": ((n, k), np.float32)}
    if k < progress["classes"]:
        shapes.update(ids=((n, k), np.int32), log_tail=((n,), np.float32))
    folder.mkdir(parents=True, exist_ok=True)
    if mode == "w+":
        return {name: np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
                for name, (shape, dtype) in shapes.items()}
    arrays = {name: np.load(folder / f"{name}.npy", mmap_mode=mode, allow_pickle=False) for name in shapes}
    for name, (shape, dtype) in shapes.items():
        if arrays[name].shape != shape or arrays[name].dtype != dtype:
            raise ValueError(f"{folder / name}.npy holds {arrays[name].dtype} {arrays[name].shape}, expected "
                             f"{np.dtype(dtype)} {shape}: delete {folder} to make the soft targets again")
    return arrays


def _open(folder: Path, progress: dict) -> SoftTargets:
    arrays = {name: torch.from_numpy(a) for name, a in _arrays(folder, progress, "c").items()}
    return SoftTargets(arrays["log_q"], arrays.get("ids"), arrays.get("log_tail"))


def _write_progress(folder: Path, progress: dict) -> None:
    write_json(folder / "progress.json", progress)
