"""Loaders for EMNIST, Omniglot and CIFAR-100, each returning a `Source` (image folders stream: `stream`).

Files are laid out as torchvision 0.29 downloads them, so a `root` shared with torchvision works.
CIFAR-100 is read from its binary version with numpy: the project never unpickles user files.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image
from torchvision.datasets import EMNIST, Omniglot
from torchvision.datasets.utils import download_and_extract_archive, list_dir, list_files

from ensemble.data.source import Source

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz"
CIFAR100_MD5 = "03b5dce01913d631647c71ecec9e9cb8"
CIFAR100_FOLDER = "cifar-100-binary"  # the folder the archive extracts to
_CIFAR100_RECORD_BYTES = 2 + 3 * 32 * 32  # coarse label, fine label, R, G and B planes
_EMNIST_CASE_SPLITS = ("byclass", "bymerge", "letters")
_OMNIGLOT_SETS = ("images_background", "images_evaluation")
_OMNIGLOT_FIRST_TEST_DRAWER = 16


def emnist(root: str, split: str = "byclass", download: bool = False) -> Source:
    """EMNIST train and test sets, upright; for byclass/bymerge/letters, groups are case-blind characters."""
    if split not in EMNIST.splits:
        raise ValueError(f"unknown EMNIST split {split!r}: expected one of {EMNIST.splits}")
    x_train, y_train, classes = _emnist_part(root, split, train=True, download=download)
    x_test, y_test, _ = _emnist_part(root, split, train=False, download=download)
    groups, group_names = None, None
    if split in _EMNIST_CASE_SPLITS:
        groups, group_names = _group_ids([name.upper() for name in classes])
    return Source(x_train, y_train, x_test, y_test, classes, groups, group_names)


def omniglot(root: str, download: bool = False, image_size: int = 28) -> Source:
    """Omniglot's 1,623 characters as classes: drawers 1-15 train, 16-20 test, white strokes on black."""
    base = os.path.join(root, Omniglot.folder)
    set_dirs = [os.path.join(base, name) for name in _OMNIGLOT_SETS]
    if download and not all(os.path.isdir(d) for d in set_dirs):  # torchvision would fetch the zips again
        for background in (True, False):
            Omniglot(root, background=background, download=True)
    _require(set_dirs, f"the unzipped Omniglot folders {_OMNIGLOT_SETS} in {base}, laid out as "
             "<Alphabet>/<characterNN>/<charid>_<drawer>.png", download_hint=True)
    characters = [pair for set_dir in set_dirs for pair in _omniglot_characters(set_dir)]
    images, labels, is_test = [], [], []
    for label, (_, folder) in enumerate(characters):
        for path in sorted(list_files(folder, ".png", prefix=True)):
            image = _load_image(path, "L", image_size, Image.Resampling.BOX)
            images.append(255 - image)  # Omniglot draws black strokes on white
            labels.append(label)
            is_test.append(_omniglot_drawer(path) >= _OMNIGLOT_FIRST_TEST_DRAWER)
    if not images:
        raise ValueError(f"no Omniglot images (<Alphabet>/<characterNN>/*.png) found under {base}")
    x, y, test = np.stack(images), np.array(labels, dtype=np.int64), np.array(is_test)
    class_names = [f"{alphabet}/{os.path.basename(folder)}" for alphabet, folder in characters]
    groups, group_names = _group_ids([alphabet for alphabet, _ in characters])
    return Source(x[~test], y[~test], x[test], y[test], class_names, groups, group_names)


def cifar100(root: str, download: bool = False) -> Source:
    """CIFAR-100 from its binary version, parsed with numpy; groups are the 20 coarse classes."""
    folder = os.path.join(root, CIFAR100_FOLDER)
    names = ("train.bin", "test.bin", "fine_label_names.txt", "coarse_label_names.txt")
    train_bin, test_bin, fine_txt, coarse_txt = (os.path.join(folder, name) for name in names)
    if download and not all(os.path.isfile(p) for p in (train_bin, test_bin, fine_txt, coarse_txt)):
        download_and_extract_archive(CIFAR100_URL, download_root=root, md5=CIFAR100_MD5)
    _require([train_bin, test_bin, fine_txt, coarse_txt],
             f"the extracted CIFAR-100 binary version ({CIFAR100_URL}) in {folder}", download_hint=True)
    fine_names, coarse_names = _read_names(fine_txt), _read_names(coarse_txt)
    x_train, y_train, coarse_train = _read_cifar_records(train_bin)
    x_test, y_test, coarse_test = _read_cifar_records(test_bin)
    groups = _coarse_of_fine(np.concatenate([y_train, y_test]), np.concatenate([coarse_train, coarse_test]),
                             len(fine_names), len(coarse_names), folder)
    return Source(x_train, y_train, x_test, y_test, fine_names, groups, coarse_names)


def _require(paths: Sequence[str], expected: str, download_hint: bool) -> None:
    """Raise FileNotFoundError for the first missing path, saying what belongs there and how to get it."""
    missing = [path for path in paths if not os.path.exists(path)]
    if missing:
        hint = "; download=True fetches it" if download_hint else ""
        raise FileNotFoundError(f"{missing[0]} not found: expected {expected}{hint}")


def _group_ids(keys: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Number distinct keys in order of first appearance: the group id of every item, and the group names."""
    names = list(dict.fromkeys(keys))
    index = {name: g for g, name in enumerate(names)}
    return np.array([index[key] for key in keys], dtype=np.int64), names


def _emnist_part(
    root: str, split: str, train: bool, download: bool
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One EMNIST part read by torchvision, transposed upright because the raw files store it transposed."""
    raw = os.path.join(root, "EMNIST", "raw")
    prefix = os.path.join(raw, f"emnist-{split}-{'train' if train else 'test'}")
    files = [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
    if not download:
        _require(files, f"the unzipped EMNIST idx-ubyte files in {raw}", download_hint=True)
    try:
        data = EMNIST(root, split=split, train=train, download=download)
    except (AssertionError, TypeError, ValueError, RuntimeError) as err:  # its reader asserts on bad headers
        raise ValueError(f"could not load EMNIST files {files} (idx-ubyte, uint8): {err}") from err
    images = data.data.transpose(1, 2).contiguous().numpy()
    labels = data.targets.numpy().astype(np.int64)
    if len(images) != len(labels) or np.any((labels < 0) | (labels >= len(data.classes))):
        raise ValueError(f"{files}: expected one label in [0, {len(data.classes)}) per image, "
                         f"got {len(labels)} labels for {len(images)} images")
    return images, labels, list(data.classes)


def _omniglot_characters(set_dir: str) -> list[tuple[str, str]]:
    """(alphabet, character folder) pairs of one Omniglot set, sorted as os.listdir order is arbitrary."""
    return [(alphabet, os.path.join(set_dir, alphabet, character))
            for alphabet in sorted(list_dir(set_dir))
            for character in sorted(list_dir(os.path.join(set_dir, alphabet)))]


def _omniglot_drawer(path: str) -> int:
    """The drawer number from an Omniglot file name `<charid>_<drawer>.png`."""
    _, sep, drawer = os.path.splitext(os.path.basename(path))[0].rpartition("_")
    if not sep or not drawer.isdigit():
        raise ValueError(f"{path}: expected an Omniglot file name <charid>_<drawer>.png")
    return int(drawer)


def _load_image(path: str, mode: str, size: int, resample: Image.Resampling) -> np.ndarray:
    """One image file as a uint8 array in PIL mode `mode`, resized to size x size."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert(mode).resize((size, size), resample), dtype=np.uint8)
    except OSError as err:  # PIL's UnidentifiedImageError and truncated files are both OSErrors
        raise ValueError(f"{path}: not a readable image ({err})") from err


def _read_names(path: str) -> list[str]:
    """The non-empty lines of a CIFAR-100 label-names file."""
    with open(path, encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip()]
    if not names:
        raise ValueError(f"{path}: expected one class name per line")
    return names


def _read_cifar_records(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images (N, 32, 32, 3), fine labels and coarse labels from a CIFAR-100 binary file."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % _CIFAR100_RECORD_BYTES:
        raise ValueError(f"{path}: expected CIFAR-100 binary records of {_CIFAR100_RECORD_BYTES} bytes "
                         f"(coarse label, fine label, 3x32x32 pixels), got a file of {raw.size} bytes")
    records = raw.reshape(-1, _CIFAR100_RECORD_BYTES)
    images = np.ascontiguousarray(records[:, 2:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, records[:, 1].astype(np.int64), records[:, 0].astype(np.int64)


def _coarse_of_fine(
    fine: np.ndarray, coarse: np.ndarray, n_fine: int, n_coarse: int, where: str
) -> np.ndarray:
    """The coarse class of every fine class, checked to be the same on all of its records."""
    if fine.max() >= n_fine or coarse.max() >= n_coarse:
        raise ValueError(f"{where}: labels go beyond the {n_fine} fine and {n_coarse} coarse class names")
    pair_fine, pair_coarse = np.divmod(np.unique(fine * n_coarse + coarse), n_coarse)
    counts = np.bincount(pair_fine, minlength=n_fine)
    bad = np.flatnonzero(counts != 1)
    if bad.size:
        raise ValueError(f"{where}: every fine class needs exactly one coarse label, but fine classes "
                         f"{bad.tolist()} have {counts[bad].tolist()} distinct coarse labels in the records")
    return pair_coarse
