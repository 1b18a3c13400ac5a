"""One interface for every data set: train / validation / test images and labels, class names, groups.

`load_data(cfg)` asks the configured source for a `Source`, checks it (one clear error per problem),
caches generated sets on disk, and carves a stratified, seeded validation split from the training data.
Small sets are uint8 tensors in memory; an image folder is an index of files streamed from disk
(`stream.ImageFiles`). Stages read either through `image_batches`.
"""
from __future__ import annotations

import hashlib
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from ..config import DataConfig, config_hash
from ..launch import usable_cpus
from ..rundir import atomic_path, file_hash
from . import stream
from .source import Source
from .stream import ImageFiles, Images, image_batches, shard_positions

__all__ = [
    "Data",
    "ImageFiles",
    "Images",
    "Source",
    "channel_stats",
    "data_fingerprint",
    "fingerprints_held",
    "image_batches",
    "load_data",
    "load_source",
    "shard_positions",
    "validate_source",
]


@dataclass
class Data:
    """A data set ready for training: per split uint8 images (N, C, H, W), in memory or streamed from
    files, and int64 labels."""

    x_train: Images
    y_train: torch.Tensor
    x_val: Images
    y_val: torch.Tensor
    x_test: Images
    y_test: torch.Tensor
    class_names: list[str]
    class_groups: torch.Tensor | None = None
    group_names: list[str] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    @property
    def streamed(self) -> bool:
        return isinstance(self.x_train, ImageFiles)

    def check_readable(self) -> None:
        """For a streamed set, a one-line error where this process cannot read its images (a Ray worker on
        a node that does not see the folder)."""
        if self.streamed:
            stream.check_readable(self.x_train)


CHANNELS = (1, 3, 4)  # the channel counts `data.layout=auto` recognises: grey, RGB, RGBA
_loaded: dict = {}  # the data set this process loaded last, and what identified it


def load_data(cfg: DataConfig) -> Data:
    """The configured data set, checked, with its validation split carved from the training data. The
    last one loaded is kept for the next call with the same config, cache and file (every stage of a
    run loads it; callers only read it)."""
    key = (config_hash(cfg), cfg.workers, str(cache_dir()), _stamp(cfg.path))
    if _loaded.get("key") != key:
        _loaded.update(key=key, data=_load(cfg))
    return _loaded["data"]


def _stamp(path: str | None) -> tuple | None:
    """A file's size and modification time, to notice a changed file between calls."""
    if path is None or not Path(path).is_file():
        return None
    info = Path(path).stat()
    return info.st_size, info.st_mtime_ns


def _load(cfg: DataConfig) -> Data:
    if cfg.source == "imagefolder":
        return _load_folder(cfg)
    src = load_source(cfg)
    validate_source(src, name=cfg.source, missing_classes=cfg.missing_classes)
    tr, va = _carve(src.y_train, cfg)
    return Data(
        x_train=_images(src.x_train[tr], cfg.layout),
        y_train=_labels(src.y_train[tr]),
        x_val=_images(src.x_train[va], cfg.layout),
        y_val=_labels(src.y_train[va]),
        x_test=_images(src.x_test, cfg.layout),
        y_test=_labels(src.y_test),
        class_names=list(src.class_names),
        class_groups=None if src.class_groups is None else torch.as_tensor(src.class_groups, dtype=torch.int64),
        group_names=None if src.group_names is None else list(src.group_names),
    )


def _carve(y_train: np.ndarray, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """The sorted rows of the training data that stay for training and that are held out for validation:
    a stratified split, seeded by `data.seed`."""
    try:
        tr, va = train_test_split(np.arange(len(y_train)), test_size=cfg.val_fraction, stratify=y_train,
                                  random_state=cfg.seed)
    except ValueError as e:  # a class with one example, or a split too small to hold every class
        raise ValueError(f"cannot carve a stratified validation split from {cfg.source}: {e}") from None
    return np.sort(tr), np.sort(va)


def _load_folder(cfg: DataConfig) -> Data:
    """An image folder as an index of files (its own `val/` if it has one, else one carved from train);
    with `data.bad_images=skip`, the files that do not decode are left out."""
    root = cfg.path if "://" in _need_path(cfg) else os.path.abspath(cfg.path)  # Ray workers start elsewhere
    index = stream.index_folder(root)
    listing = stream.tree_fingerprint(root) if cfg.bad_images == "skip" else None

    def split(name: str) -> tuple[ImageFiles, torch.Tensor]:
        rel, labels = index.splits[name]
        files = ImageFiles(root, rel, cfg.image_size, cfg.channels, cfg.train_transform, cfg.workers)
        if cfg.bad_images == "skip":
            ok = _readable(files, listing)
            files, labels = files[ok], labels[ok]
            if not ok.all():
                print(f"warning: data: {int((~ok).sum()):,} of {len(ok):,} files in {root}/{name} are not readable "
                      f"images and are left out (data.bad_images=skip)", file=sys.stderr, flush=True)
        return files, torch.from_numpy(labels)

    x_train, y_train = split("train")
    x_test, y_test = split("test")
    if len(index.class_names) < 2:
        raise ValueError(f"{root}/train has {len(index.class_names)} class folder: needs at least 2 classes")
    _check_class_counts(y_train.numpy(), y_test.numpy(), index.class_names, f"data.path {root}",
                        cfg.missing_classes)  # classes that skipped files left empty
    if "val" in index.splits:
        x_val, y_val = split("val")
    else:
        tr, va = _carve(y_train.numpy(), cfg)
        x_train, y_train, x_val, y_val = x_train[tr], y_train[tr], x_train[va], y_train[va]
    return Data(x_train, y_train, x_val, y_val, x_test, y_test, index.class_names)


def _readable(files: ImageFiles, listing: str) -> np.ndarray:
    """Which files decode: read once, then kept in the cache under the folder's `listing` fingerprint."""
    key = config_hash(files.root, listing, hashlib.sha256(files.files.tobytes()).hexdigest())
    path = cache_dir() / f"imagefolder-readable-{key}.npy"
    try:
        ok = np.load(path, allow_pickle=False)
        if ok.shape == (len(files),) and ok.dtype == bool:
            return ok
    except (OSError, ValueError, EOFError):  # not there yet, or damaged: checked again below
        pass
    ok = stream.readable_rows(files, files.workers)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, ok, allow_pickle=False)
    return ok


def channel_stats(x: Images, limit: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation (1, C, 1, 1) of uint8 images in [0, 1] units, for a net's
    input normalisation: over every image in memory; over `limit` evenly spaced images of a streamed set,
    decoded as evaluation sees them and summed batch by batch (never all at once in floats)."""
    if isinstance(x, torch.Tensor):
        images = x.float().div_(255)
        return images.mean(dim=(0, 2, 3), keepdim=True), images.std(dim=(0, 2, 3), keepdim=True)
    rows = np.unique(np.linspace(0, len(x) - 1, min(limit, len(x))).round().astype(np.int64))
    total = squares = 0.0
    count = 0
    for batch in image_batches(x[rows], 64):
        pixels = batch.double().div_(255)
        total = total + pixels.sum(dim=(0, 2, 3))
        squares = squares + pixels.square().sum(dim=(0, 2, 3))
        count += pixels[:, 0].numel()
    mean = total / count
    var = (squares - count * mean.square()) / max(1, count - 1)
    return mean.float().reshape(1, -1, 1, 1), var.clamp_min(0).sqrt().float().reshape(1, -1, 1, 1)


def load_source(cfg: DataConfig) -> Source:
    """The raw `Source` of an in-memory data set (every source but `imagefolder`); generated sets are
    cached on disk."""
    from . import digits, npz, synthetic, torchvision_sets

    s = cfg.source
    if s == "npz":
        return npz.load_npz(_need_path(cfg))
    if s == "digits":
        return digits.digits(seed=cfg.seed)
    if s == "glyphs":
        from .glyphs import glyphs

        return _cached(cfg, lambda: glyphs(
            cfg.num_classes, cfg.train_per_class, cfg.test_per_class, cfg.image_size, cfg.seed
        ))
    if s == "synthetic":
        return _cached(cfg, lambda: synthetic.synthetic(
            cfg.num_classes, cfg.train_per_class, cfg.test_per_class, cfg.group_size, cfg.image_size, cfg.seed,
            cfg.noise))
    if s == "emnist":
        return torchvision_sets.emnist(_download_root(cfg), download=cfg.download)
    if s == "omniglot":
        return torchvision_sets.omniglot(_download_root(cfg), download=cfg.download, image_size=cfg.image_size)
    if s == "cifar100":
        return torchvision_sets.cifar100(_download_root(cfg), download=cfg.download)
    raise ValueError(f"unknown data source {s!r}")


def data_fingerprint(cfg: DataConfig) -> str:
    """What identifies the data: its config, plus its contents where it is read from disk: the hash of an
    `npz` file; for a folder (an image folder, a torchvision-backed set's root) every file's path, size and
    modification time. Within `fingerprints_held` each folder is listed once."""
    key = config_hash(cfg)
    if _held_fingerprints is not None and key in _held_fingerprints:
        return _held_fingerprints[key]
    if cfg.source == "npz":
        content = file_hash(Path(cfg.path)) if cfg.path and Path(cfg.path).is_file() else None
    elif cfg.source in CONTENT_FOLDERS:
        content = stream.tree_fingerprint(os.path.join(_download_root(cfg), CONTENT_FOLDERS[cfg.source]))
    else:
        content = None  # generated from the config alone
    value = config_hash(cfg, content)
    if _held_fingerprints is not None:
        _held_fingerprints[key] = value
    return value


CONTENT_FOLDERS = {"imagefolder": "", "emnist": "EMNIST/raw", "omniglot": "omniglot-py",
                   "cifar100": "cifar-100-binary"}  # what each folder source reads under its root
_held_fingerprints: dict[str, str] | None = None  # within `fingerprints_held`: each data config's, once


@contextmanager
def fingerprints_held():
    """Within the block the data's fingerprint is computed once (a pipeline run or status asks for it per
    stage; listing a large folder takes a while), and afresh after it."""
    global _held_fingerprints
    _held_fingerprints = {}
    try:
        yield
    finally:
        _held_fingerprints = None


def validate_source(src: Source, name: str = "data", missing_classes: str = "error") -> None:
    """Raise one clear ValueError for the first problem found in a source's arrays. A class with no
    training example is an error, or with `missing_classes="warn"` a warning that counts them."""
    num_classes = len(src.class_names)
    if num_classes < 2:
        raise ValueError(f"{name}: needs at least 2 classes, got {num_classes}")
    if len(set(map(str, src.class_names))) != num_classes:
        raise ValueError(f"{name}: class names are not unique")
    for split, x, y in (("train", src.x_train, src.y_train), ("test", src.x_test, src.y_test)):
        x, y = np.asarray(x), np.asarray(y)
        if len(x) == 0:
            raise ValueError(f"{name}: the {split} split is empty")
        if x.ndim not in (3, 4):
            raise ValueError(f"{name}: x_{split} must be (N, H, W), (N, H, W, C) or (N, C, H, W) images, got "
                             f"shape {x.shape}")
        if len(x) != len(y) or y.ndim != 1:
            raise ValueError(
                f"{name}: x_{split} holds {len(x)} images but y_{split} has shape {y.shape}: they must match"
            )
        if x.dtype != np.uint8:
            raise ValueError(f"{name}: x_{split} must be uint8 images, got {x.dtype}")
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{name}: y_{split} must hold integer class ids, got {y.dtype}")
        if y.min() < 0 or y.max() >= num_classes:
            raise ValueError(
                f"{name}: y_{split} has labels in [{y.min()}, {y.max()}] but there are {num_classes} classes "
                f"(labels must be in [0, {num_classes - 1}])"
            )
    if src.x_train.shape[1:] != src.x_test.shape[1:]:
        raise ValueError(f"{name}: train images are {src.x_train.shape[1:]} but test images {src.x_test.shape[1:]}")
    _check_class_counts(np.asarray(src.y_train), np.asarray(src.y_test), list(src.class_names), name, missing_classes)
    if src.class_groups is not None:
        g = np.asarray(src.class_groups)
        if g.shape != (num_classes,) or not np.issubdtype(g.dtype, np.integer) or g.min() < 0:
            raise ValueError(f"{name}: class_groups must hold one non-negative group id per class")
        if src.group_names is not None and g.max() >= len(src.group_names):
            raise ValueError(f"{name}: class_groups names group {g.max()} but there are {len(src.group_names)} groups")


def _check_class_counts(y_train: np.ndarray, y_test: np.ndarray, class_names: list[str], name: str,
                        missing_classes: str) -> None:
    """Classes without a training example: those only in the test set (the model can never predict
    them) and those nowhere (a stray label, such as 25 among 0..9, making 15 empty classes)."""
    num_classes = len(class_names)
    train = np.bincount(y_train, minlength=num_classes)
    test = np.bincount(y_test, minlength=num_classes)
    test_only, nowhere = np.flatnonzero((train == 0) & (test > 0)), np.flatnonzero((train == 0) & (test == 0))
    problems = []
    if len(test_only):
        problems.append(f"{len(test_only)} classes have test examples ({int(test[test_only].sum())}) but no "
                        f"training example: {_names(class_names, test_only)}")
    if len(nowhere):
        problems.append(f"{len(nowhere)} of {num_classes} classes have no example at all: {_names(class_names, nowhere)}"
                        " (a stray label?)")
    if not problems:
        return
    message = f"{name}: {'; '.join(problems)}"
    if missing_classes == "error":
        raise ValueError(f"{message}. Fix the labels, or set data.missing_classes=warn to train anyway")
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _names(class_names: list[str], classes: np.ndarray) -> str:
    shown = ", ".join(str(class_names[c]) for c in classes[:5])
    return shown + (f" and {len(classes) - 5} more" if len(classes) > 5 else "")


def cache_dir() -> Path:
    """Where generated data sets are cached: $ENSEMBLE_CACHE, else ~/.cache/specialist-ensembles."""
    return Path(os.environ.get("ENSEMBLE_CACHE", Path.home() / ".cache" / "specialist-ensembles"))


def _cached(cfg: DataConfig, make) -> Source:
    """Load a generated source from the cache, or make it and store it (atomically)."""
    from .npz import load_npz, save_npz

    keys = ("source", "num_classes", "train_per_class", "test_per_class", "group_size", "image_size", "seed",
            *(("noise",) if cfg.source == "synthetic" else ()))
    path = cache_dir() / f"{cfg.source}-{config_hash({k: getattr(cfg, k) for k in keys})}.npz"
    if path.is_file():
        try:
            return load_npz(path)
        except ValueError:
            pass  # a damaged cache entry is regenerated below
    src = make()
    with atomic_path(path) as tmp:
        save_npz(tmp, src)
    return src


def check(cfg: DataConfig) -> None:
    """What can be checked of the data before any stage runs: a source that reads a file or folder has
    it (a torchvision-backed set only where it will not download; a folder as a path or an fsspec URI),
    and no more decoding processes than this machine has CPUs."""
    reads = cfg.source in ("npz", "imagefolder") or (cfg.source in ("emnist", "omniglot", "cifar100")
                                                     and cfg.path and not cfg.download)
    if reads:
        fs, path = stream.filesystem(_need_path(cfg))
        if not fs.exists(path):
            raise FileNotFoundError(f"data.path {cfg.path} does not exist (data.source={cfg.source})")
    cpus = usable_cpus()
    if cfg.source == "imagefolder" and cfg.workers > cpus:
        raise ValueError(f"data.workers is {cfg.workers} but this machine has {cpus} CPUs: decoding processes "
                         "beyond them only slow training down")


def _download_root(cfg: DataConfig) -> str:
    """Where a torchvision-backed set lies: `data.path`, or by default <cache>/<source>."""
    return cfg.path if cfg.path else str(cache_dir() / cfg.source)


def _need_path(cfg: DataConfig) -> str:
    if not cfg.path:
        raise ValueError(f"data.source={cfg.source} needs data.path (a file or folder)")
    return cfg.path


def _images(x: np.ndarray, layout: str = "auto") -> torch.Tensor:
    """uint8 images -> (N, C, H, W): (N, H, W) gets one channel; 4-D arrays are (N, H, W, C) or
    (N, C, H, W) as `layout` says (auto: the axis of size 1, 3 or 4 is the channels', an error where
    both the second and the last could be)."""
    if x.ndim == 3:
        return torch.from_numpy(np.ascontiguousarray(x[:, None]))
    layout = _layout(x.shape) if layout == "auto" else layout
    if layout == "NHW":
        raise ValueError(f"data.layout is NHW but the images have shape {x.shape}: set data.layout=NHWC or NCHW")
    return torch.from_numpy(np.ascontiguousarray(x if layout == "NCHW" else x.transpose(0, 3, 1, 2)))


def _layout(shape: tuple[int, ...]) -> str:
    """NHWC or NCHW for 4-D images of `shape`, from which axis can hold channels (1, 3 or 4)."""
    first, last = shape[1] in CHANNELS, shape[3] in CHANNELS
    if first == last:
        raise ValueError(f"images of shape {shape}: cannot tell whether the channels are the second or the "
                         "last axis; set data.layout=NCHW or data.layout=NHWC")
    return "NCHW" if first else "NHWC"


def _labels(y: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(y.astype(np.int64))
