"""The npz format: `x_train y_train x_test y_test`, optionally `class_names class_groups group_names`."""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from .source import Source

REQUIRED = ("x_train", "y_train", "x_test", "y_test")


def load_npz(path: str | Path) -> Source:
    """Read an npz data set without unpickling anything; float images in [0, 1] or [0, 255] become uint8."""
    path = Path(path)
    if not path.is_file():
        where = "" if path.is_absolute() else f" (relative to the current directory {Path.cwd()})"
        raise FileNotFoundError(f"npz data file {path} does not exist{where}")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"{path} is not a readable npz file of plain arrays ({e})") from None
    missing = [k for k in REQUIRED if k not in arrays]
    if missing:
        raise ValueError(f"{path} lacks the arrays {missing}; an npz data set needs {list(REQUIRED)}")
    for split in ("train", "test"):
        arrays[f"x_{split}"] = _as_uint8(arrays[f"x_{split}"], f"{path}: x_{split}")
    y_max = max(int(arrays["y_train"].max(initial=0)), int(arrays["y_test"].max(initial=0)))
    names = arrays.get("class_names")
    return Source(
        x_train=arrays["x_train"],
        y_train=arrays["y_train"],
        x_test=arrays["x_test"],
        y_test=arrays["y_test"],
        class_names=[str(n) for n in names] if names is not None else [str(c) for c in range(y_max + 1)],
        class_groups=arrays.get("class_groups"),
        group_names=[str(n) for n in arrays["group_names"]] if "group_names" in arrays else None,
    )


def save_npz(path: str | Path, src: Source) -> None:
    """Write a Source in the npz format (plain arrays only, loadable with allow_pickle=False)."""
    arrays = dict(x_train=src.x_train, y_train=src.y_train, x_test=src.x_test, y_test=src.y_test,
                  class_names=np.asarray(src.class_names, dtype=str))
    if src.class_groups is not None:
        arrays["class_groups"] = np.asarray(src.class_groups, dtype=np.int64)
    if src.group_names is not None:
        arrays["group_names"] = np.asarray(src.group_names, dtype=str)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _as_uint8(x: np.ndarray, what: str) -> np.ndarray:
    """uint8 as is; floats checked for NaN/inf and scaled from [0, 1] or [0, 255]; anything else refused."""
    if x.dtype == np.uint8:
        return x
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{what} must be uint8 images (or floats in [0, 1]), got {x.dtype}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    lo, hi = float(x.min(initial=0)), float(x.max(initial=0))
    if lo < 0 or hi > 255:
        raise ValueError(f"{what} has values in [{lo}, {hi}]; images must be in [0, 1] or [0, 255]")
    return np.round(x * 255 if hi <= 1 else x).astype(np.uint8)
