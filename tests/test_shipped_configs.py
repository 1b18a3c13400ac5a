"""Every shipped config runs for a user who cloned the repository: EMNIST and Omniglot come through
torchvision into the cache folder, not from ../shared (tested offline on stand-ins of the downloaded
layouts, with downloading made to fail)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.utils
from test_torchvision_sets import _write_emnist, _write_omniglot

from ensemble.cli import main
from ensemble.config import load_config
from ensemble.data import cache_dir, load_data
from ensemble.pipeline import STAGES

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["generalist.train.epochs=1", "generalist.net.width=4", "specialists.train.epochs=1",
         "distill_back.train.epochs=1", "launch.backend=inline"]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No download happens, and the run starts where ../shared does not exist."""
    def refuse(*args, **kwargs):
        raise AssertionError("tried to download")

    for module in (torchvision.datasets.utils, torchvision.datasets.mnist, torchvision.datasets.omniglot):
        monkeypatch.setattr(module, "download_and_extract_archive", refuse, raising=False)
    monkeypatch.setattr(torchvision.datasets.utils, "download_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.chdir(tmp_path)
    assert not (tmp_path.parent / "shared").exists()


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "configs").glob("*.yaml")))
def test_every_shipped_config_loads_without_the_shared_data(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert cfg.data.source != "npz" and "shared" not in str(cfg.data.path)


def test_the_emnist_config_runs_end_to_end_from_the_downloaded_layout(offline, tmp_path):
    rng = np.random.default_rng(0)
    labels = {"train": np.repeat(np.arange(62), 10), "test": np.repeat(np.arange(62), 2)}
    images = {part: rng.integers(0, 256, (len(y), 28, 28), dtype=np.uint8) for part, y in labels.items()}
    _write_emnist(cache_dir() / "emnist", "byclass", images, labels)
    config = str(ROOT / "configs" / "emnist.yaml")
    assert main(["run", "--config", config, *QUICK, f"runs_dir={tmp_path / 'runs'}"]) == 0
    manifest = json.loads((tmp_path / "runs" / "emnist" / "manifest.json").read_text())
    assert all(manifest["stages"][s.name]["status"] == "done" for s in STAGES)


def test_the_omniglot_config_reads_the_downloaded_layout(offline):
    _write_omniglot(cache_dir() / "omniglot")
    data = load_data(load_config(ROOT / "configs" / "omniglot.yaml", ["data.val_fraction=0.34"]).data)  # 3 a class
    assert data.num_classes == 4 and data.input_shape == (1, 28, 28)
    assert data.group_names == ["Alpha", "Beta", "Gamma"]


def test_the_image_folder_config_runs_a_pretrained_resnet18_from_torchs_cache(offline, tmp_path, monkeypatch):
    """configs/imagefolder_resnet18.yaml on a folder of PNGs, with ImageNet weights where torch's hub caches
    them (a stand-in of the right shapes): every stage runs, the generalist starts from those weights."""
    from PIL import Image
    from torchvision.models import ResNet18_Weights, resnet18

    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        for c in range(4):
            folder = tmp_path / "images" / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 128, (40, 40, 3), dtype=np.uint8)
                pixels[:, :, c % 3] += 100
                Image.fromarray(pixels).save(folder / f"{i}.png")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / Path(ResNet18_Weights.DEFAULT.url).name
    cached.parent.mkdir(parents=True)
    pretrained = resnet18()
    torch.save(pretrained.state_dict(), cached)
    config = str(ROOT / "configs" / "imagefolder_resnet18.yaml")
    assert main(["run", "--config", config, f"data.path={tmp_path / 'images'}", "data.image_size=32",
                 "generalist.train.epochs=1", "generalist.train.lr=1e-12", "generalist.train.batch_size=16",
                 "specialists.train.epochs=1", "specialists.train.batch_size=16", "distill_back.train.batch_size=16",
                 "distill_back.train.epochs=1", "cluster.num_subsets=2", "launch.backend=inline",
                 f"runs_dir={tmp_path / 'runs'}"]) == 0
    run = tmp_path / "runs" / "imagefolder_resnet18"
    manifest = json.loads((run / "manifest.json").read_text())
    assert all(manifest["stages"][s.name]["status"] == "done" for s in STAGES)
    from ensemble.rundir import load_tensors

    trained = load_tensors(run / "generalist" / "model.safetensors")  # lr ~ 0: still the pretrained trunk
    assert torch.allclose(trained["trunk.conv1.weight"], pretrained.conv1.weight, atol=1e-6)
