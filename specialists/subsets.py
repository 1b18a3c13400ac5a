"""The class subsets the specialists own: the cluster stage's, or a file of the user's, checked."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from ensemble.config import Config, read_yaml
from ensemble.layout import RunDir


def subsets_path(cfg: Config, run_dir: Path) -> Path:
    """`specialists.subsets` if set, else the cluster stage's `subsets.json`."""
    if cfg.specialists.subsets is not None:
        return Path(cfg.specialists.subsets)
    return RunDir(run_dir).cluster_subsets


def load_subsets(path: Path, class_names: list[str]) -> list[list[int]]:
    """Read subsets from a YAML or JSON file: a list of subsets, or a mapping with key `subsets` (as the
    cluster stage writes); each subset a list of class names or ids, or a mapping with key `classes`."""
    raw = read_yaml(path, "subsets file")
    if isinstance(raw, dict):
        raw = raw.get("subsets")
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"subsets file {path} must hold a non-empty list of subsets (or a mapping with key "
                         f"'subsets')")
    return [_subset(entry, m, class_names, path) for m, entry in enumerate(raw)]


def _subset(entry: Any, m: int, class_names: list[str], path: Path) -> list[int]:
    if isinstance(entry, dict):
        entry = entry.get("classes")
    if not isinstance(entry, list) or not entry:
        raise ValueError(f"subset {m} in {path} must be a non-empty list of class names or ids, got {entry!r}")
    index = {name: i for i, name in enumerate(class_names)}
    ids = []
    for item in entry:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise ValueError(f"subset {m} in {path}: {item!r} is neither a class name nor a class id")
        if isinstance(item, int):
            if not 0 <= item < len(class_names):
                raise ValueError(f"subset {m} in {path} names class id {item}, but the data has classes "
                                 f"0 to {len(class_names) - 1}")
            ids.append(item)
        elif item in index:
            ids.append(index[item])
        else:
            close = difflib.get_close_matches(item, class_names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"subset {m} in {path} names unknown class {item!r}{hint}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"subset {m} in {path} names a class twice")
    if len(ids) == len(class_names):
        raise ValueError(f"subset {m} in {path} holds every class: its specialist would have no dustbin "
                         f"examples to learn from")
    return ids
