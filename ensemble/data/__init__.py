"""One interface for every data set: train / validation / test images and labels, class names, groups.

`load_data(cfg)` asks the configured source for a `Source`, checks it (one clear error per problem),
caches generated sets on disk, and carves a stratified, seeded validation split from the training data.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from ..config import DataConfig, config_hash
from ..rundir import atomic_path, file_hash
from .source import Source

__all__ = ["Data", "Source", "load_data", "load_source", "validate_source", "data_fingerprint"]


@dataclass
class Data:
    """A data set ready for training: uint8 images (N, C, H, W) and int64 labels per split."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
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


CHANNELS = (1, 3, 4)  # the channel counts `data.layout=auto` recognises: grey, RGB, RGBA
_loaded: dict = {}  # the data set this process loaded last, and what identified it


def load_data(cfg: DataConfig) -> Data:
    """The configured data set, checked, with its validation split carved from the training data. The
    last one loaded is kept for the next call with the same config, cache and file (every stage of a
    run loads it; callers only read it)."""
    key = (config_hash(cfg), str(cache_dir()), _stamp(cfg.path))
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
    src = load_source(cfg)
    validate_source(src, name=cfg.source, missing_classes=cfg.missing_classes)
    idx = np.arange(len(src.y_train))
    try:
        tr, va = train_test_split(
            idx, test_size=cfg.val_fraction, stratify=src.y_train, random_state=cfg.seed
        )
    except ValueError as e:  # a class with one example, or a split too small to hold every class
        raise ValueError(f"cannot carve a stratified validation split from {cfg.source}: {e}") from None
    tr, va = np.sort(tr), np.sort(va)
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


def load_source(cfg: DataConfig) -> Source:
    """The raw `Source` of the configured data set; generated sets are cached on disk."""
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
    if s == "imagefolder":
        return torchvision_sets.imagefolder(_need_path(cfg), image_size=cfg.image_size)
    raise ValueError(f"unknown data source {s!r}")


def data_fingerprint(cfg: DataConfig) -> str:
    """What identifies the data: its config, plus the content of the file for `npz`."""
    content = file_hash(Path(cfg.path)) if cfg.source == "npz" and cfg.path and Path(cfg.path).is_file() else None
    return config_hash(cfg, content)


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
    _check_class_counts(src, name, missing_classes)
    if src.class_groups is not None:
        g = np.asarray(src.class_groups)
        if g.shape != (num_classes,) or not np.issubdtype(g.dtype, np.integer) or g.min() < 0:
            raise ValueError(f"{name}: class_groups must hold one non-negative group id per class")
        if src.group_names is not None and g.max() >= len(src.group_names):
            raise ValueError(f"{name}: class_groups names group {g.max()} but there are {len(src.group_names)} groups")


def _check_class_counts(src: Source, name: str, missing_classes: str) -> None:
    """Classes without a training example: those only in the test set (the model can never predict
    them) and those nowhere (a stray label, such as 25 among 0..9, making 15 empty classes)."""
    num_classes = len(src.class_names)
    train = np.bincount(np.asarray(src.y_train), minlength=num_classes)
    test = np.bincount(np.asarray(src.y_test), minlength=num_classes)
    test_only, nowhere = np.flatnonzero((train == 0) & (test > 0)), np.flatnonzero((train == 0) & (test == 0))
    problems = []
    if len(test_only):
        problems.append(f"{len(test_only)} classes have test examples ({int(test[test_only].sum())}) but no "
                        f"training example: {_names(src, test_only)}")
    if len(nowhere):
        problems.append(f"{len(nowhere)} of {num_classes} classes have no example at all: {_names(src, nowhere)}"
                        " (a stray label?)")
    if not problems:
        return
    message = f"{name}: {'; '.join(problems)}"
    if missing_classes == "error":
        raise ValueError(f"{message}. Fix the labels, or set data.missing_classes=warn to train anyway")
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _names(src: Source, classes: np.ndarray) -> str:
    shown = ", ".join(str(src.class_names[c]) for c in classes[:5])
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
    it (a torchvision-backed set only where it will not download)."""
    reads = cfg.source in ("npz", "imagefolder") or (cfg.source in ("emnist", "omniglot", "cifar100")
                                                     and cfg.path and not cfg.download)
    if reads and not Path(_need_path(cfg)).exists():
        raise FileNotFoundError(f"data.path {cfg.path} does not exist (data.source={cfg.source})")


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
