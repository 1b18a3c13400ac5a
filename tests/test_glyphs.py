"""Tests of the built-in glyph data set: shapes, determinism, class merging and groups."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.ft2font import FT2Font

from ensemble.data import glyphs as glyphs_module
from ensemble.data.glyphs import glyphs

NUM_CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS = 30, 4, 2


@pytest.fixture(scope="module")
def small():
    return glyphs(NUM_CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS, image_size=28, seed=0)


@pytest.fixture(scope="module")
def default_classes():
    """The default 400 classes, with one image each to stay fast."""
    return glyphs(400, train_per_class=1, test_per_class=1)


def class_of(source, ch):
    return next(c for c, name in enumerate(source.class_names) if ch in name.split("/"))


def test_shapes_and_dtypes(small):
    assert small.x_train.shape == (NUM_CLASSES * TRAIN_PER_CLASS, 28, 28)
    assert small.x_test.shape == (NUM_CLASSES * TEST_PER_CLASS, 28, 28)
    assert small.x_train.dtype == small.x_test.dtype == np.uint8
    assert small.y_train.dtype == small.y_test.dtype == np.int64
    assert small.class_groups.dtype == np.int64
    assert small.class_groups.shape == (NUM_CLASSES,)
    assert len(small.class_names) == NUM_CLASSES
    assert small.class_groups.max() < len(small.group_names)


def test_image_size_is_respected():
    source = glyphs(3, train_per_class=2, test_per_class=1, image_size=20)
    assert source.x_train.shape == (6, 20, 20)


def test_labels_cover_all_classes_with_requested_counts(small):
    assert (np.bincount(small.y_train, minlength=NUM_CLASSES) == TRAIN_PER_CLASS).all()
    assert (np.bincount(small.y_test, minlength=NUM_CLASSES) == TEST_PER_CLASS).all()


def test_same_seed_gives_identical_arrays_and_other_seed_differs(small):
    again = glyphs(NUM_CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS, image_size=28, seed=0)
    other = glyphs(NUM_CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS, image_size=28, seed=1)
    for name in ("x_train", "y_train", "x_test", "y_test", "class_groups"):
        assert np.array_equal(getattr(small, name), getattr(again, name))
    assert small.class_names == again.class_names
    assert not np.array_equal(small.x_train, other.x_train)
    assert not np.array_equal(small.x_test, other.x_test)


def test_train_and_test_images_are_different_draws(small):
    train = {image.tobytes() for image in small.x_train}
    assert not any(image.tobytes() in train for image in small.x_test)


def test_images_are_white_strokes_on_black(small):
    images = np.concatenate([small.x_train, small.x_test]).reshape(-1, 28 * 28)
    assert images.min() == 0 and images.max() == 255
    assert (images.max(axis=1) > 200).all()  # no blank or faint image
    ink = (images > 128).mean(axis=1)
    assert (ink > 0.01).all() and (ink < 0.6).all()  # strokes on a mostly black background
    assert np.median(images) < 30


def test_class_names_are_unique(default_classes):
    assert len(set(default_classes.class_names)) == len(default_classes.class_names)


def test_default_classes_span_several_scripts(default_classes):
    chars = set("/".join(default_classes.class_names).split("/"))
    assert {"7", "g", "λ", "Ж", "é", "ё"} <= chars


def test_identically_rendering_characters_are_merged(default_classes):
    names = default_classes.class_names
    latin_a = names[class_of(default_classes, "A")].split("/")
    assert "\u0391" in latin_a and "\u0410" in latin_a  # Greek Alpha, Cyrillic A
    assert {"o", "\u03bf", "\u043e"} <= set(names[class_of(default_classes, "o")].split("/"))
    assert class_of(default_classes, "o") != class_of(default_classes, "O")
    assert class_of(default_classes, "l") != class_of(default_classes, "I")


def test_no_two_classes_render_identically():
    """Brute-force check of the merge criterion on the first classes, rendering anew."""
    chars, classes, _, _ = glyphs_module._clean_classes(28)
    classes = classes[:120]
    members = [(chars[i], c) for c, ids in enumerate(classes) for i in ids]
    shared = np.zeros((len(members), len(members)), int)
    close = np.zeros_like(shared)
    for name in glyphs_module.FONT_FILES:
        font = FT2Font(str(glyphs_module.FONT_DIR / name))
        present = [k for k, (ch, _) in enumerate(members) if font.get_char_index(ord(ch))]
        big = np.stack([glyphs_module._render(font, members[k][0], 56) for k in present])
        small = F.avg_pool2d(torch.from_numpy(big).float()[:, None] / 255, 2).flatten(1)
        max_diff = (small[:, None] - small[None]).abs().amax(dim=2).numpy()
        shared[np.ix_(present, present)] += 1
        close[np.ix_(present, present)] += max_diff <= glyphs_module.MERGE_TOLERANCE
    same = (shared > 0) & (close >= glyphs_module.MERGE_FONT_FRACTION * shared)
    label = np.array([c for _, c in members])
    other_class = label[:, None] != label[None, :]
    assert not (same & other_class).any()
    index = {ch: k for k, (ch, _) in enumerate(members)}
    assert same[index["A"], index["\u0410"]] and same[index["o"], index["\u03bf"]]


def test_groups_join_accented_letters_with_their_base(default_classes):
    group = default_classes.class_groups
    e, e_acute = class_of(default_classes, "e"), class_of(default_classes, "é")
    assert group[e] == group[e_acute] == group[class_of(default_classes, "ë")]
    assert group[class_of(default_classes, "E")] == group[class_of(default_classes, "Ё")]
    assert group[class_of(default_classes, "E")] != group[e]  # case kept distinct
    assert group[e] != group[class_of(default_classes, "a")]
    assert default_classes.group_names[group[e]] == default_classes.class_names[e]


def test_requesting_too_many_classes_raises():
    with pytest.raises(ValueError, match=r"10000 classes requested, but only \d+ distinct"):
        glyphs(10_000, train_per_class=1, test_per_class=1)
