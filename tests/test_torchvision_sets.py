"""Tests for the torchvision-backed loaders, on tiny fake data sets in torchvision's on-disk layouts."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ensemble.data import torchvision_sets
from ensemble.data.torchvision_sets import cifar100, emnist, omniglot


# --- EMNIST: uncompressed idx-ubyte files in root/EMNIST/raw, images stored transposed ---

def _write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an idx-ubyte file: magic 0x0000 08 ndim, big-endian dims, the bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _write_emnist(
    root: Path, split: str, upright: dict[str, np.ndarray], labels: dict[str, np.ndarray]
) -> None:
    """Write EMNIST train/test files for `split`, the upright images transposed as in the real files."""
    raw = root / "EMNIST" / "raw"
    for part in ("train", "test"):
        _write_idx(raw / f"emnist-{split}-{part}-images-idx3-ubyte", upright[part].transpose(0, 2, 1))
        _write_idx(raw / f"emnist-{split}-{part}-labels-idx1-ubyte", labels[part])


def _top_bar_images(n: int) -> np.ndarray:
    """Upright 28x28 images with only the top row lit: asymmetric under transposition."""
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    images[:, 0, :] = 255
    return images


def test_emnist_byclass_upright_with_case_groups(tmp_path: Path) -> None:
    labels = {"train": np.array([0, 10, 36, 61]), "test": np.array([9, 35])}
    _write_emnist(tmp_path, "byclass", {p: _top_bar_images(len(y)) for p, y in labels.items()}, labels)
    source = emnist(str(tmp_path), split="byclass")
    assert source.x_train.shape == (4, 28, 28) and source.x_test.shape == (2, 28, 28)
    assert source.x_train.dtype == np.uint8 and source.y_train.dtype == np.int64
    np.testing.assert_array_equal(source.y_train, labels["train"])
    np.testing.assert_array_equal(source.x_train, _top_bar_images(4))  # top row lit, not left column
    assert len(source.class_names) == 62
    assert (source.class_names[10], source.class_names[36]) == ("A", "a")
    groups = source.class_groups
    assert groups is not None and groups.shape == (62,)
    assert groups[10] == groups[36]  # 'A' and 'a'
    assert len({groups[0], groups[1], groups[10], groups[11]}) == 4
    assert len(source.group_names) == 36 and source.group_names[groups[10]] == "A"


def test_emnist_digits_has_no_groups(tmp_path: Path) -> None:
    labels = {"train": np.array([0, 1, 2]), "test": np.array([9])}
    _write_emnist(tmp_path, "digits", {p: _top_bar_images(len(y)) for p, y in labels.items()}, labels)
    source = emnist(str(tmp_path), split="digits")
    assert source.class_names == list("0123456789")
    assert source.class_groups is None and source.group_names is None


def test_emnist_missing_files_name_the_path_and_download(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"EMNIST.*download=True"):
        emnist(str(tmp_path / "nowhere"))


def test_emnist_malformed_file_is_a_value_error(tmp_path: Path) -> None:
    labels = {"train": np.array([0]), "test": np.array([0])}
    _write_emnist(tmp_path, "mnist", {p: _top_bar_images(1) for p in labels}, labels)
    (tmp_path / "EMNIST" / "raw" / "emnist-mnist-train-images-idx3-ubyte").write_bytes(b"\xff" * 10)
    with pytest.raises(ValueError, match="emnist-mnist-train-images-idx3-ubyte"):
        emnist(str(tmp_path), split="mnist")


def test_emnist_rejects_unknown_split(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="split"):
        emnist(str(tmp_path), split="nope")


# --- Omniglot: root/omniglot-py/images_{background,evaluation}/<Alphabet>/<characterNN>/<id>_<drawer>.png ---
# The loader reads the unzipped folders itself; torchvision's md5 check of the zips runs only on download.

OMNIGLOT_DRAWERS = (1, 2, 15, 16, 20)
OMNIGLOT_LAYOUT = {
    "images_background": {"Alpha": ["character01", "character02"], "Beta": ["character01"]},
    "images_evaluation": {"Gamma": ["character01"]},
}


def _write_omniglot(root: Path) -> None:
    """Write 1-bit 20x20 PNGs, black strokes on white like the real set, with a black top-left 10x10 block."""
    image = np.full((20, 20), 255, dtype=np.uint8)
    image[:10, :10] = 0
    char_id = 0
    for set_name, alphabets in OMNIGLOT_LAYOUT.items():
        for alphabet, characters in alphabets.items():
            for character in characters:
                char_id += 1
                folder = root / "omniglot-py" / set_name / alphabet / character
                folder.mkdir(parents=True)
                for drawer in OMNIGLOT_DRAWERS:
                    Image.fromarray(image).convert("1").save(folder / f"{char_id:04d}_{drawer:02d}.png")


def test_omniglot_classes_groups_split_and_inversion(tmp_path: Path) -> None:
    _write_omniglot(tmp_path)
    source = omniglot(str(tmp_path), image_size=10)
    assert source.class_names == [
        "Alpha/character01", "Alpha/character02", "Beta/character01", "Gamma/character01"
    ]
    assert source.group_names == ["Alpha", "Beta", "Gamma"]
    np.testing.assert_array_equal(source.class_groups, [0, 0, 1, 2])
    assert source.x_train.shape == (4 * 3, 10, 10) and source.x_test.shape == (4 * 2, 10, 10)
    assert source.x_train.dtype == np.uint8 and source.y_test.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(source.y_train), [3, 3, 3, 3])  # drawers 1, 2, 15
    np.testing.assert_array_equal(np.bincount(source.y_test), [2, 2, 2, 2])  # drawers 16, 20
    for x in (source.x_train, source.x_test):
        assert np.all(x[:, :5, :5] == 255) and np.all(x[:, 5:, :] == 0)  # strokes white on black


def test_omniglot_missing_root_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"images_background.*download=True"):
        omniglot(str(tmp_path))


def test_omniglot_bad_file_name_is_a_value_error(tmp_path: Path) -> None:
    _write_omniglot(tmp_path)
    folder = tmp_path / "omniglot-py" / "images_evaluation" / "Gamma" / "character01"
    Image.new("L", (20, 20), 255).save(folder / "nodrawer.png")
    with pytest.raises(ValueError, match="nodrawer.png"):
        omniglot(str(tmp_path), image_size=10)


# --- CIFAR-100 binary version: root/cifar-100-binary/{train,test}.bin and label-name files ---

CIFAR_COARSE_OF_FINE = np.array([1, 0, 1, 0])


def _cifar_records(fine: np.ndarray, coarse: np.ndarray) -> bytes:
    """Records with R=10, G=20, B=30 except R=200 at row 0, column 1, to pin channel and pixel order."""
    planes = np.empty((len(fine), 3, 32, 32), dtype=np.uint8)
    planes[:, 0], planes[:, 1], planes[:, 2] = 10, 20, 30
    planes[:, 0, 0, 1] = 200
    labels = np.stack([coarse, fine], axis=1).astype(np.uint8)
    return np.concatenate([labels, planes.reshape(len(fine), -1)], axis=1).tobytes()


def _write_cifar(root: Path, train_fine: np.ndarray, test_fine: np.ndarray) -> Path:
    """Write a 4-fine-class, 2-coarse-class CIFAR-100 binary folder and return it."""
    folder = root / "cifar-100-binary"
    folder.mkdir(parents=True)
    (folder / "train.bin").write_bytes(_cifar_records(train_fine, CIFAR_COARSE_OF_FINE[train_fine]))
    (folder / "test.bin").write_bytes(_cifar_records(test_fine, CIFAR_COARSE_OF_FINE[test_fine]))
    (folder / "fine_label_names.txt").write_text("apple\nbee\ncan\ndog\n\n")
    (folder / "coarse_label_names.txt").write_text("things\nliving\n")
    return folder


def test_cifar100_parses_binary_records(tmp_path: Path) -> None:
    _write_cifar(tmp_path, np.array([0, 1, 2, 3, 3, 2]), np.array([1, 0]))
    source = cifar100(str(tmp_path))
    assert source.x_train.shape == (6, 32, 32, 3) and source.x_test.shape == (2, 32, 32, 3)
    assert source.x_train.dtype == np.uint8 and source.y_train.dtype == np.int64
    np.testing.assert_array_equal(source.y_train, [0, 1, 2, 3, 3, 2])
    np.testing.assert_array_equal(source.y_test, [1, 0])
    np.testing.assert_array_equal(source.x_train[0, 1, 1], [10, 20, 30])
    np.testing.assert_array_equal(source.x_train[0, 0, 1], [200, 20, 30])
    assert source.x_train[0, 1, 0, 0] == 10  # row 0 column 1, not row 1 column 0
    assert source.class_names == ["apple", "bee", "can", "dog"]
    assert source.group_names == ["things", "living"]
    np.testing.assert_array_equal(source.class_groups, CIFAR_COARSE_OF_FINE)


def test_cifar100_inconsistent_coarse_labels_are_rejected(tmp_path: Path) -> None:
    folder = _write_cifar(tmp_path, np.array([0, 1, 2, 3]), np.array([0]))
    # fine class 0 has coarse label 1 in train.bin but 0 here
    (folder / "test.bin").write_bytes(_cifar_records(np.array([0]), np.array([0])))
    with pytest.raises(ValueError, match=r"fine classes \[0\]"):
        cifar100(str(tmp_path))


def test_cifar100_truncated_file_is_a_value_error(tmp_path: Path) -> None:
    folder = _write_cifar(tmp_path, np.array([0, 1, 2, 3]), np.array([0]))
    (folder / "train.bin").write_bytes((folder / "train.bin").read_bytes()[:-1])
    with pytest.raises(ValueError, match="train.bin"):
        cifar100(str(tmp_path))


def test_cifar100_missing_files_are_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"cifar-100-binary.*download=True"):
        cifar100(str(tmp_path))


def test_cifar100_download_fetches_the_binary_archive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def fake_download(url: str, download_root: str, md5: str) -> None:
        """Stand in for the network: record the request and extract a fake archive."""
        calls.append((url, download_root, md5))
        _write_cifar(Path(download_root), np.array([0, 1, 2, 3]), np.array([0]))

    monkeypatch.setattr(torchvision_sets, "download_and_extract_archive", fake_download)
    cifar100(str(tmp_path), download=True)
    cifar100(str(tmp_path), download=True)  # files present: no second download
    assert calls == [(torchvision_sets.CIFAR100_URL, str(tmp_path), "03b5dce01913d631647c71ecec9e9cb8")]
