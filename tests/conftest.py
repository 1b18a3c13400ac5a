import pytest
import torch


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Each test caches generated data in its own folder and starts from the same torch state."""
    monkeypatch.setenv("ENSEMBLE_CACHE", str(tmp_path / "cache"))
    # Ray Train's controller takes the workers' epoch reports when it polls them, every 2 s by default, and a
    # worker waits for it from its third report on: the tests' epochs of milliseconds would each take 2 s
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    torch.manual_seed(0)


SPECIALISTS_TINY = ["data.source=digits", "generalist.net.name=mlp", "generalist.net.width=64",
                    "generalist.train.epochs=3", "specialists.train.epochs=3", "specialists.train.augment=none",
                    "distill_back.train.epochs=2", "launch.backend=inline"]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    """A tiny run directory (digits, 3 subsets) whose generalist and cluster stages are done; tests copy
    it with `specialists_run`."""
    from ensemble.config import load_config
    from ensemble.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("upstream")
    run_pipeline(load_config(None, [*SPECIALISTS_TINY, f"runs_dir={root}", "name=r"]), only="generalist")
    run_pipeline(load_config(None, [*SPECIALISTS_TINY, f"runs_dir={root}", "name=r"]), only="cluster")
    return root / "r"


def specialists_run(upstream, tmp_path, *overrides, name="r"):
    """The config of a copy of `upstream` at `tmp_path/name`, with `overrides`."""
    import shutil

    from ensemble.config import load_config

    if not (tmp_path / name).exists():
        shutil.copytree(upstream, tmp_path / name)
    return load_config(None, [*SPECIALISTS_TINY, f"runs_dir={tmp_path}", f"name={name}", *overrides])
