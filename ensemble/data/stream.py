"""Image folders streamed from disk: memory holds the index (paths and labels), never the images.

`root/{train,test}/<class>/<image>` (and an optional `val/`) on a local path or any fsspec URI
(`s3://...`, `gs://...`) that every Ray node can read. Images are decoded per batch in DataLoader
worker processes, at their own resolution, through torchvision.transforms.v2: a random resized crop
and a flip for training (`data.train_transform`), resize and centre crop for everything else.
`image_batches` is the one way every stage reads images, streamed or in memory.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import PurePosixPath

import numpy as np
import torch
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

SAMPLE_SEED_RANGE = 2**62  # per-image augmentation seeds are drawn below this


@dataclass(frozen=True)
class ImageFiles:
    """A split of an image folder: files under `root` (relative paths, bytes) read as `channels` x `size`
    x `size` uint8 images. Indexing with a slice or an index array gives another `ImageFiles`, as a
    tensor's rows would; `image_batches` decodes them."""

    root: str
    files: np.ndarray  # relative paths, dtype S: compact to pickle into each worker, no Python objects
    size: int
    channels: int
    train_transform: str = "crop_flip"
    workers: int = 0

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.files), self.channels, self.size, self.size)

    def __getitem__(self, idx) -> ImageFiles:
        if isinstance(idx, torch.Tensor):
            idx = idx.numpy()
        rows = self.files[idx]
        return replace(self, files=rows if rows.ndim == 1 else rows[None])

    def path(self, i: int) -> str:
        return f"{self.root.rstrip('/')}/{self.files[i].decode()}"


Images = torch.Tensor | ImageFiles


def shard_positions(n: int, batch_size: int, rank: int, world: int) -> torch.Tensor:
    """The positions in an epoch's order of `n` examples that process `rank` of `world` trains on, in
    its order: step s's global batch is positions [s·G, (s+1)·G), G = batch_size·world, and `rank` takes
    its `rank`-th slice of batch_size; the last partial global batch is dropped. Disjoint across ranks,
    and together the global batches of one process training with batch size G."""
    steps = n // (batch_size * world)
    return torch.arange(steps * batch_size * world).view(steps, world, batch_size)[:, rank].reshape(-1)


def image_batches(x: Images, batch_size: int, *, order: torch.Tensor | None = None, train: bool = False,
                  gen: torch.Generator | None = None, pin: bool = False,
                  shard: tuple[int, int] = (0, 1)) -> Iterator[torch.Tensor]:
    """uint8 batches (B, C, H, W) of `x`'s images in `order` (default: as stored), full batches only
    when `order` is given (an epoch drops its last partial batch). Streamed images are decoded in
    `x.workers` processes with training augmentation if `train`, each image seeded from `gen` so that an
    epoch is the same whatever the number of workers; `pin` returns page-locked batches for a
    non-blocking copy to the GPU. `shard=(rank, world)` reads only process `rank`'s share of `order`
    (`shard_positions`), its images seeded as one process reading all of `order` would seed them."""
    full_only = order is not None
    order = torch.arange(len(x)) if order is None else order
    augment = not isinstance(x, torch.Tensor) and train and x.train_transform != "none"
    seeds = torch.randint(SAMPLE_SEED_RANGE, (len(order),), generator=gen) if augment else torch.zeros(
        len(order), dtype=torch.int64)
    if shard != (0, 1):
        positions = shard_positions(len(order), batch_size, *shard)
        order, seeds = order[positions], seeds[positions]
    starts = range(0, max(0, len(order) - batch_size + 1 if full_only else len(order)), batch_size)
    if isinstance(x, torch.Tensor):
        for start in starts:
            rows = x[order[start:start + batch_size]]
            yield rows.pin_memory() if pin and rows.device.type == "cpu" else rows
        return
    batches = [list(zip(order[start:start + batch_size].tolist(), seeds[start:start + batch_size].tolist()))
               for start in starts]
    loader = torch.utils.data.DataLoader(_Decoded(x, augment), batch_sampler=batches, num_workers=x.workers,
                                         multiprocessing_context=worker_start(x.workers), pin_memory=pin,
                                         generator=torch.Generator())  # not the global RNG
    try:
        yield from loader
    except ValueError as err:  # from a worker: its message is a traceback; the last line is ours
        raise ValueError(str(err).strip().splitlines()[-1].removeprefix("ValueError: ")) from None


def worker_start(workers: int) -> multiprocessing.context.BaseContext | None:
    """How DataLoader workers start: from a fork server that has imported torch and this module, never by
    forking the calling process, whose threads (torch's, Ray's) may hold a lock (the allocator's) that
    the child would inherit held (a worker then dies of heap corruption). None for no workers."""
    if workers == 0:
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", __name__])  # imported once, in the server
    return context


class _Decoded(torch.utils.data.Dataset):
    """The images of `files`, decoded one by one: item (i, seed) is image i, augmented from `seed` if
    `augment`. The torch RNG is used inside `fork_rng`, so a worker-less loader leaves the training's alone."""

    def __init__(self, files: ImageFiles, augment: bool):
        self.files, self.augment = files, augment
        size = files.size
        if augment:
            steps = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
        else:
            steps = [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
        self.transform = v2.Compose([*steps, v2.PILToTensor()])
        self._fs = None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, int]) -> torch.Tensor:
        i, seed = item
        image = read_image(self.fs, self.files.path(i), self.files.channels)
        if not self.augment:
            return self.transform(image)
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)  # the CPU's alone: torch.manual_seed seeds CUDA too
            return self.transform(image)

    @property
    def fs(self):
        if self._fs is None:  # opened in the worker process, not pickled into it
            self._fs = filesystem(self.files.root)[0]
        return self._fs


def read_image(fs, path: str, channels: int) -> Image.Image:
    """The image file at `path`, decoded and converted to grey (1 channel) or RGB (3), 16-bit images
    scaled to 8 bits (PIL's convert would clip them); one-line ValueError naming the file when it is not
    a readable image."""
    try:
        with fs.open(path, "rb") as f, Image.open(f) as image:
            if image.mode.startswith("I;16"):
                image = Image.fromarray((np.asarray(image, dtype=np.float32) / 257).round().astype(np.uint8))
            elif image.mode in ("I", "F"):
                raise ValueError(f"32-bit {'integer' if image.mode == 'I' else 'float'} pixels; store it with 8 "
                                 "or 16 bits per channel")
            return image.convert("L" if channels == 1 else "RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # PIL: unidentified,
        #   truncated, corrupt or too large
        raise ValueError(f"{path}: not a readable image ({err}); set data.bad_images=skip to leave such "
                         "files out") from None


def filesystem(root: str):
    """The fsspec filesystem of a local path or URI, and the path within it."""
    import fsspec

    return fsspec.core.url_to_fs(root)


@dataclass(frozen=True)
class FolderIndex:
    """What a listing of an image folder found: the class names, and per split the relative paths of its
    images and their labels."""

    class_names: list[str]
    splits: dict[str, tuple[np.ndarray, np.ndarray]]  # split -> (relative paths S, labels int64)


def index_folder(root: str) -> FolderIndex:
    """List `root/{train,test}[/val]/<class>/...` (image extensions only, any depth within a class
    folder); one clear error for a missing folder, a split without class folders, a class folder
    without images, or test classes that train lacks."""
    fs, base = filesystem(root)
    if not fs.isdir(base):
        raise FileNotFoundError(f"data.path {root} does not exist or is not a folder (data.source=imagefolder "
                                "expects root/{train,test}/<class>/<image>)")
    splits, class_names = {}, None
    for split in ("train", "val", "test"):
        split_dir = f"{base.rstrip('/')}/{split}"
        if not fs.isdir(split_dir):
            if split == "val":
                continue
            raise FileNotFoundError(f"{root}/{split} not found: data.source=imagefolder expects "
                                    f"{root}/{{train,test}}/<class>/<image> (and optionally val/)")
        classes = sorted(PurePosixPath(p).name for p in fs.ls(split_dir, detail=False) if fs.isdir(p))
        if not classes:
            raise ValueError(f"{root}/{split} has no class folders: expected {root}/{split}/<class>/<image>")
        if class_names is None:
            class_names = classes
        unknown = sorted(set(classes) - set(class_names))
        if unknown:
            raise ValueError(f"{root}/{split} has classes {unknown[:5]} that {root}/train lacks: every class must "
                             "also be a training class")
        label_of = {c: k for k, c in enumerate(class_names)}
        rows = []
        for path in sorted(fs.find(split_dir)):
            rel = PurePosixPath(path).relative_to(PurePosixPath(base))
            if len(rel.parts) >= 3 and rel.suffix.lower() in IMG_EXTENSIONS:
                rows.append((str(rel), label_of[rel.parts[1]]))
        counts = np.bincount([label for _, label in rows], minlength=len(class_names))
        empty = [c for c in classes if counts[label_of[c]] == 0]
        if empty:
            raise ValueError(f"{root}/{split}/{empty[0]} has no images ({len(empty)} class folders in {split} have "
                             f"none; image extensions: {', '.join(IMG_EXTENSIONS)})")
        splits[split] = (np.array([p.encode() for p, _ in rows], dtype=np.bytes_),
                         np.array([label for _, label in rows], dtype=np.int64))
    return FolderIndex(class_names, splits)


def tree_fingerprint(root: str) -> str:
    """A hash of every file under `root`: its relative path, size and modification stamp (cheap: no file
    is read), so a changed, added or removed file changes it."""
    fs, base = filesystem(root)
    digest = hashlib.sha256()
    found = fs.find(base, detail=True) if fs.exists(base) else {}
    for path in sorted(found):
        info = found[path]
        rel = PurePosixPath(path).relative_to(PurePosixPath(base))
        digest.update(f"{rel}\0{info.get('size')}\0{_modified(info)}\n".encode())
    return digest.hexdigest()[:16]


def _modified(info: dict) -> str:
    """A file's modification stamp as fsspec reports it (local: mtime; object stores: LastModified or ETag)."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "ETag", "etag", "md5"):
        if info.get(key) is not None:
            return str(info[key])
    return ""


def readable_rows(files: ImageFiles, workers: int) -> np.ndarray:
    """A boolean per file: whether it decodes (every file read once, in `workers` processes)."""
    from tqdm.auto import tqdm

    loader = torch.utils.data.DataLoader(_Readable(files, augment=False), batch_size=64, num_workers=workers,
                                         multiprocessing_context=worker_start(workers))
    ok = [batch for batch in tqdm(loader, desc="checking images", unit="batch", leave=False, disable=None,
                                  file=sys.stderr)]
    return torch.cat(ok).numpy() if ok else np.zeros(0, dtype=bool)


class _Readable(_Decoded):
    """Item i: whether image i decodes."""

    def __getitem__(self, i: int) -> bool:
        try:
            read_image(self.fs, self.files.path(i), self.files.channels)
        except ValueError:
            return False
        return True


def check_readable(files: ImageFiles) -> None:
    """Raise a one-line FileNotFoundError, naming this machine, when the folder's first image cannot be
    read here: a Ray worker on a node that does not see the data."""
    try:
        fs = filesystem(files.root)[0]
        with fs.open(files.path(0), "rb"):
            pass
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"data.path {files.root} is not readable on {socket.gethostname()} (pid {os.getpid()}): {err}. Every "
            "Ray node must see the image folder at the same path (a shared filesystem) or read it from an "
            "fsspec URI (s3://, gs://, ...)") from None
