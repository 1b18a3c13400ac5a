"""The folders are the pipeline: a stage package imports only the shared package and earlier stages,
the shared package imports no stage outside the modules that run them (pipeline, CLI), and the run
directory's paths all come from `ensemble.layout`."""
import ast
from pathlib import Path

import pytest

from ensemble.layout import STAGE_NAMES, RunDir
from ensemble.pipeline import STAGES

ROOT = Path(__file__).resolve().parents[1]
RUNNERS = {"pipeline.py", "cli.py", "__main__.py"}  # the shared modules that run the stages


def imported_packages(source: str) -> set[str]:
    """The top-level packages a module's absolute imports name, wherever they stand (lazy ones too)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def violations(package: str, source: str) -> set[str]:
    """The stage packages a module of `package` may not import: later stages for a stage; any stage
    for the shared package."""
    stages = set(STAGE_NAMES)
    allowed = set(STAGE_NAMES[:STAGE_NAMES.index(package) + 1]) if package in stages else set()
    return (imported_packages(source) & stages) - allowed


def test_the_stages_are_the_pipelines_packages_in_its_order():
    assert tuple(stage.name for stage in STAGES) == STAGE_NAMES
    for name in STAGE_NAMES:
        assert (ROOT / name / "__init__.py").is_file()
        assert RunDir("runs/r").stage(name) == Path("runs/r") / name


@pytest.mark.parametrize("package", ["ensemble", *STAGE_NAMES])
def test_imports_follow_the_pipelines_order(package):
    for path in sorted((ROOT / package).rglob("*.py")):
        if package == "ensemble" and path.name in RUNNERS:
            continue
        assert not violations(package, path.read_text()), f"{path.relative_to(ROOT)} imports against the " \
            f"pipeline's order: {sorted(violations(package, path.read_text()))}"


def test_the_import_check_catches_every_form_of_import():
    assert violations("specialists", "from combiner.solver import combine") == {"combiner"}
    assert violations("baselines", "def f():\n    import distill_back.stage") == {"distill_back"}
    assert violations("ensemble", "from generalist import run") == {"generalist"}
    assert violations("combiner", "from specialists import load_specialists\nfrom .solver import combine\n"
                                  "import torch") == set()


def test_run_directory_paths_are_spelled_only_in_the_layout():
    """No module outside `ensemble/layout.py` names a file that crosses stages, nor formats a specialist's
    folder name (m000): a string that is exactly such a name, or a `:03d` format."""
    names = {"model.safetensors", "predictions.safetensors", "metrics.json", "metrics.jsonl", "checkpoint.pt",
             "subsets.json", "eval.json", "manifest.json", "config.yaml", "soft_targets.safetensors"}
    for package in ("ensemble", *STAGE_NAMES):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "ensemble" / "layout.py":
                continue
            constants = [node.value for node in ast.walk(ast.parse(path.read_text()))
                         if isinstance(node, ast.Constant) and isinstance(node.value, str)]
            found = sorted({c for c in constants if c in names or c == "03d"})
            assert not found, f"{path.relative_to(ROOT)} spells {found}: name it in ensemble/layout.py"
