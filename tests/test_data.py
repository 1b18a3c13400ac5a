import numpy as np
import pytest
import torch

from ensemble.config import DataConfig
from ensemble.data import cache_dir, load_data, load_source
from ensemble.data.npz import load_npz
from ensemble.data.synthetic import synthetic


def _write_npz(path, **overrides):
    rng = np.random.default_rng(0)
    arrays = dict(
        x_train=rng.integers(0, 256, (40, 6, 6), dtype=np.uint8), y_train=np.arange(40) % 4,
        x_test=rng.integers(0, 256, (12, 6, 6), dtype=np.uint8), y_test=np.arange(12) % 4,
        class_names=np.array(["a", "b", "c", "d"]),
    )
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def test_npz_loads_and_splits_stratified(tmp_path):
    path = _write_npz(tmp_path / "d.npz", class_groups=np.array([0, 0, 1, 1]), group_names=np.array(["x", "y"]))
    data = load_data(DataConfig(source="npz", path=str(path), val_fraction=0.25))
    assert data.x_train.shape == (30, 1, 6, 6) and data.x_train.dtype == torch.uint8
    assert data.x_val.shape == (10, 1, 6, 6) and data.x_test.shape == (12, 1, 6, 6)
    assert sorted(torch.bincount(data.y_val).tolist()) == [2, 2, 3, 3]  # stratified
    assert data.class_names == ["a", "b", "c", "d"] and data.group_names == ["x", "y"]
    assert data.class_groups.tolist() == [0, 0, 1, 1]
    # the split is a partition of the training data, the same for the same seed, different for another
    again = load_data(DataConfig(source="npz", path=str(path), val_fraction=0.25))
    other = load_data(DataConfig(source="npz", path=str(path), val_fraction=0.25, seed=1))
    assert torch.equal(again.x_val, data.x_val) and not torch.equal(other.x_val, data.x_val)
    seen = torch.cat([data.x_train, data.x_val]).flatten(1)
    original = torch.from_numpy(np.load(path)["x_train"]).flatten(1)
    assert sorted(map(bytes, seen.numpy())) == sorted(map(bytes, original.numpy()))


def test_npz_float_images_are_scaled(tmp_path):
    x = np.full((40, 6, 6), 0.5, dtype=np.float32)
    src = load_npz(_write_npz(tmp_path / "f.npz", x_train=x, x_test=x[:12]))
    assert src.x_train.dtype == np.uint8 and (src.x_train == 128).all()


@pytest.mark.parametrize("overrides, message", [
    (dict(y_test=None), r"lacks the arrays \['y_test'\]"),
    (dict(y_train=np.arange(39) % 4), "x_train holds 40 images but y_train has shape"),
    (dict(y_test=np.arange(12) % 5), r"labels in \[0, 4\] but there are 4 classes"),
    (dict(y_train=np.arange(40) - 1), r"labels in \[-1, 38\]"),
    (dict(y_train=(np.arange(40) % 4).astype(np.float32)), "must hold integer class ids"),
    (dict(x_test=np.zeros((0, 6, 6), np.uint8), y_test=np.zeros(0, np.int64)), "the test split is empty"),
    (dict(x_train=np.full((40, 6, 6), np.nan, np.float32)), "x_train contains NaN"),
    (dict(x_train=np.zeros((40, 6, 6), np.int32)), "must be uint8 images"),
    (dict(x_train=np.zeros((40, 36), np.uint8)), r"must be \(N, H, W\), \(N, H, W, C\) or \(N, C, H, W\) images"),
    (dict(class_names=np.array(["a", "a", "c", "d"])), "class names are not unique"),
])
def test_npz_bad_input(tmp_path, overrides, message):
    path = _write_npz(tmp_path / "bad.npz", **overrides)
    with pytest.raises(ValueError, match=message):
        load_data(DataConfig(source="npz", path=str(path)))


def test_npz_missing_or_garbled_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_data(DataConfig(source="npz", path=str(tmp_path / "nope.npz")))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable npz"):
        load_data(DataConfig(source="npz", path=str(tmp_path / "junk.npz")))
    with pytest.raises(ValueError, match="needs data.path"):
        load_data(DataConfig(source="npz"))


def test_npz_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, x_train=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="not a readable npz file of plain arrays"):
        load_npz(path)


def test_digits():
    data = load_data(DataConfig(source="digits"))
    assert data.num_classes == 10 and data.input_shape == (1, 8, 8)
    assert len(data.x_train) + len(data.x_val) + len(data.x_test) == 1797
    assert int(data.x_train.max()) == 255


def test_synthetic_hierarchy_and_determinism():
    src = synthetic(num_classes=30, train_per_class=5, test_per_class=2, group_size=5, image_size=12, seed=3)
    assert src.x_train.shape == (150, 12, 12) and src.x_test.shape == (60, 12, 12)
    assert np.bincount(src.y_train).tolist() == [5] * 30
    assert src.class_groups.tolist() == [c // 5 for c in range(30)] and len(src.group_names) == 6
    again = synthetic(num_classes=30, train_per_class=5, test_per_class=2, group_size=5, image_size=12, seed=3)
    assert np.array_equal(again.x_train, src.x_train)
    assert not np.array_equal(synthetic(30, 5, 2, 5, 12, seed=4).x_train, src.x_train)
    # planted confusability: class means are closer within a group than across groups
    means = np.stack([src.x_train[src.y_train == c].reshape(5, -1).mean(0) for c in range(30)])
    dist = np.linalg.norm(means[:, None] - means[None], axis=-1)
    same = src.class_groups[:, None] == src.class_groups[None]
    off_diag = ~np.eye(30, dtype=bool)
    assert dist[same & off_diag].mean() < 0.8 * dist[~same].mean()


def test_synthetic_noise_sets_the_spread_within_a_class_and_keys_the_cache():
    def spread(noise):
        src = synthetic(num_classes=4, train_per_class=200, test_per_class=1, group_size=2, image_size=8, noise=noise)
        return np.mean([src.x_train[src.y_train == c].astype(float).std(0).mean() for c in range(4)])

    assert spread(0.0) == 0.0 and 0 < spread(0.35) < spread(2.0)
    with pytest.raises(ValueError, match="noise >= 0"):
        synthetic(num_classes=4, noise=-1.0)
    for noise in (0.35, 2.0):
        load_source(DataConfig(source="synthetic", num_classes=4, train_per_class=2, test_per_class=1, noise=noise))
    assert len(list(cache_dir().glob("synthetic-*.npz"))) == 2


def test_synthetic_scales_to_20000_classes():
    src = synthetic(num_classes=20000, train_per_class=1, test_per_class=1, group_size=20, image_size=8)
    assert src.x_train.shape == (20000, 8, 8) and src.class_groups.max() == 999


def test_generated_sets_are_cached(tmp_path):
    cfg = DataConfig(source="synthetic", num_classes=6, train_per_class=4, test_per_class=2, group_size=3)
    first = load_source(cfg)
    files = list(cache_dir().glob("synthetic-*.npz"))
    assert len(files) == 1
    cached = load_source(cfg)
    assert np.array_equal(cached.x_train, first.x_train) and cached.class_names == first.class_names
    files[0].write_bytes(b"damaged")  # a damaged cache entry is made again, not trusted
    assert np.array_equal(load_source(cfg).x_train, first.x_train)


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_npz_images_channels_last_or_first_are_read_right(tmp_path, layout):
    """Issue 21: (N, C, H, W) images were read as (N, H, W, C)."""
    rng = np.random.default_rng(1)
    nchw = rng.integers(0, 256, (40, 3, 6, 5), dtype=np.uint8)  # 3 channels, 6 rows, 5 columns
    stored = nchw if layout == "NCHW" else nchw.transpose(0, 2, 3, 1)
    path = _write_npz(tmp_path / "d.npz", x_train=stored, x_test=stored[:12])
    data = load_data(DataConfig(source="npz", path=str(path), val_fraction=0.25))
    assert data.input_shape == (3, 6, 5)
    assert torch.equal(data.x_test, torch.from_numpy(nchw[:12]))


def test_npz_images_whose_channel_axis_is_ambiguous_need_data_layout(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (40, 3, 6, 3), dtype=np.uint8)  # 3 channels first, or 3 columns of RGB?
    path = _write_npz(tmp_path / "d.npz", x_train=x, x_test=x[:12])
    with pytest.raises(ValueError, match=r"cannot tell whether the channels .* set data.layout=NCHW or"):
        load_data(DataConfig(source="npz", path=str(path), val_fraction=0.25))
    assert load_data(DataConfig(source="npz", path=str(path), val_fraction=0.25, layout="NCHW")).input_shape == (3, 6, 3)
    assert load_data(DataConfig(source="npz", path=str(path), val_fraction=0.25, layout="NHWC")).input_shape == (3, 3, 6)


def test_classes_without_training_examples_are_an_error_or_a_counted_warning(tmp_path, capsys):
    """Issue 21: a class seen only in the test set, and (with no class_names) a stray label that makes
    classes with no example at all."""
    test_only = _write_npz(tmp_path / "t.npz", y_train=np.arange(40) % 3)  # class d: test examples only
    with pytest.raises(ValueError, match=r"1 classes have test examples \(3\) but no training example: d"):
        load_data(DataConfig(source="npz", path=str(test_only), val_fraction=0.25))
    stray = _write_npz(tmp_path / "s.npz", class_names=None, y_train=np.where(np.arange(40) == 0, 25, np.arange(40) % 4))
    with pytest.raises(ValueError, match=r"21 of 26 classes have no example at all: 4, 5, 6, 7, 8 and 16 more"):
        load_data(DataConfig(source="npz", path=str(stray), val_fraction=0.25))
    data = load_data(DataConfig(source="npz", path=str(test_only), val_fraction=0.25, missing_classes="warn"))
    assert data.num_classes == 4 and "warning: npz: 1 classes have test examples" in capsys.readouterr().err
