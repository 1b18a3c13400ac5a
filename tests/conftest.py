import pytest
import torch


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Each test caches generated data in its own folder and starts from the same torch state."""
    monkeypatch.setenv("ENSEMBLE_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
