"""The built-in default data set: letters of several scripts, rendered from matplotlib's fonts.

Characters are taken from fixed Unicode blocks in the fixed order of `CHARACTER_RANGES` (basic
digits, Latin, Greek and Cyrillic first, then their accented and extended letters), keeping cased
letters (categories Lu, Ll) and digits (Nd), dropping digraphs such as "ǆ" (more than one letter
in their NFKD form) and characters no font in `FONT_FILES` has a glyph for.

Each (character, font) pair is rendered once with FreeType, anti-aliased and undistorted
("clean render"), at `DISTORT_FACTOR` times `image_size`, into a square frame spanning
`FRAME_BOTTOM_EM` to `FRAME_TOP_EM` around the baseline: the baseline sits at the same height in
every render and the ink is centred horizontally, so "o"/"O" or "x"/"X" differ by size and
position as in handwriting. A glyph too large for the frame is rendered smaller to fit.

Merging: a render of a and a render of b in the same font are "identical" when, downsampled to
`image_size` (pixel values in [0, 1]), they differ by at most `MERGE_TOLERANCE` in every pixel.
Characters a and b "render identically" when they share at least one font and their renders are
identical in at least `MERGE_FONT_FRACTION` of the fonts they share: a majority rather than all,
because STIX draws Cyrillic "А" slightly differently from Latin "A", while requiring many fonts
keeps italic look-alikes apart (Cyrillic italic "т" is an "m" in some fonts only). Classes are the
connected components of that relation (so "A", Greek "Α" and Cyrillic "А" form "A/Α/А"), ordered
by their first character and named by their characters joined with "/"; the first `num_classes`
of them are used.

Groups (the ground truth a clustering of confusable classes should find): a class belongs to the
class of the base letter of its first character, `unicodedata.normalize("NFD", ch)[0]`, so "é",
"ê" and "ě" join "e" and Cyrillic "Ё" joins "E/Ε/Е". Case is kept distinct ("E" and "e" are
different groups), since case changes the shape or at least the size and position of a letter.

Samples are clean renders of a random (member character, font) pair of the class, distorted at
twice `image_size` by a random affine map, stroke thickening or thinning and Gaussian blur, then
area-downsampled to `image_size`, stretched so the brightest pixel is white, given Gaussian noise
and quantised: white strokes (255) on black (0).
"""
from __future__ import annotations

import functools
import math
import unicodedata
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.ft2font import FT2Font, Glyph, LoadFlags

from ensemble.data.source import Source

FONT_DIR = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
FONT_FILES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
)

# Inclusive code point ranges, in the order classes are chosen: the common letters of each script
# first, then accented and extended letters, rarer ones last.
CHARACTER_RANGES = (
    (0x0030, 0x0039),  # digits 0-9
    (0x0041, 0x005A), (0x0061, 0x007A),  # Latin A-Z, a-z
    (0x0391, 0x03A9), (0x03B1, 0x03C9),  # Greek Α-Ω, α-ω
    (0x0410, 0x044F),  # Cyrillic А-я
    (0x00C0, 0x00FF),  # Latin-1 Supplement: À Á Â ... ÿ
    (0x0400, 0x040F), (0x0450, 0x045F),  # Cyrillic extensions: Ѐ Ё Ђ Ѓ Є ... џ
    (0x0386, 0x0390), (0x03AA, 0x03B0), (0x03CA, 0x03CE),  # Greek with tonos or dialytika
    (0x0100, 0x017F),  # Latin Extended-A: Ā ā Ă ă Ą ą Ć ...
    (0x0370, 0x037F), (0x03CF, 0x03FF),  # Greek archaic letters, symbol forms and Coptic
    (0x0460, 0x052F),  # Cyrillic historic letters and Cyrillic Supplement
    (0x0180, 0x024F),  # Latin Extended-B
)
KEPT_CATEGORIES = ("Lu", "Ll", "Nd")

FRAME_TOP_EM = 1.0  # frame top above the baseline, in font units of one em
FRAME_BOTTOM_EM = -0.3  # frame bottom (below the baseline)
DISTORT_FACTOR = 2  # clean renders and distortions are made at this multiple of image_size
MERGE_TOLERANCE = 0.1  # max per-pixel difference (in [0, 1]) of renders counted as identical
MERGE_FONT_FRACTION = 0.5  # characters merge when identical in at least this share of their fonts
PREFILTER_SIZE = 7  # side of the block-averaged renders that pre-select pairs to compare

ROTATION_DEGREES = 10.0  # rotation uniform in ±this
SCALE_RANGE = (0.85, 1.1)  # letter size factor, uniform
SHEAR = 0.2  # shear factor uniform in ±this
SHIFT_FRACTION = 2.0 / 28.0  # translation uniform in ±this fraction of the image side
STROKE_RANGE = (-0.5, 1.5)  # stroke change in pixels per side at the distortion scale (<0 thins)
BLUR_SIGMA_RANGE = (0.3, 1.2)  # Gaussian blur sigma in pixels at the distortion scale
NOISE_STD_RANGE = (0.0, 0.06)  # std of additive noise on the [0, 1] scale, at image_size
MIN_PEAK = 0.05  # images are divided by their brightest pixel, at least this
CHUNK = 256  # images distorted at once: small enough to stay in the CPU caches


def glyphs(num_classes: int = 400, train_per_class: int = 100, test_per_class: int = 20,
           image_size: int = 28, seed: int = 0) -> Source:
    """`num_classes` classes of confusable characters as randomly distorted renders; train and
    test images are independent draws (see the module docstring for the details)."""
    chars, classes, renders, render_char = _clean_classes(image_size)
    if num_classes > len(classes):
        raise ValueError(f"glyphs: {num_classes} classes requested, but only {len(classes)} "
                         "distinct classes exist")
    classes = classes[:num_classes]
    pools = [np.flatnonzero(np.isin(render_char, members)) for members in classes]
    train_seed, test_seed = np.random.SeedSequence(seed).generate_state(2)
    x_train, y_train = _sample(renders, pools, train_per_class, int(train_seed), image_size)
    x_test, y_test = _sample(renders, pools, test_per_class, int(test_seed), image_size)
    class_groups, group_names = _class_groups(chars, classes)
    return Source(x_train, y_train, x_test, y_test,
                  class_names=["/".join(chars[i] for i in members) for members in classes],
                  class_groups=class_groups, group_names=group_names)


@functools.lru_cache(maxsize=2)
def _clean_classes(image_size: int) -> tuple[list[str], list[list[int]], torch.Tensor, np.ndarray]:
    """Candidate characters, merged classes (lists of character indices), clean renders at
    DISTORT_FACTOR * image_size (uint8, one per (character, font) pair) and each render's
    character index; kept in memory since every call with this image_size needs the same."""
    fonts = [FT2Font(str(FONT_DIR / name)) for name in FONT_FILES]
    chars = _candidate_chars(fonts)
    render_char, render_font, renders = [], [], []
    for f, font in enumerate(fonts):
        present = [i for i, ch in enumerate(chars) if font.get_char_index(ord(ch)) != 0]
        frames = [_render(font, chars[i], DISTORT_FACTOR * image_size) for i in present]
        renders.append(torch.from_numpy(np.stack(frames)).unsqueeze(1))
        render_char += present
        render_font += [f] * len(present)
    renders = torch.cat(renders)
    render_char, render_font = np.array(render_char), np.array(render_font)
    small = F.interpolate(renders.float() / 255, size=(image_size, image_size), mode="area")
    same = _same_render(small, render_char, render_font, len(chars))
    return chars, _connected_components(same), renders, render_char


def _candidate_chars(fonts: list[FT2Font]) -> list[str]:
    """Characters of CHARACTER_RANGES in order: single letters or digits that some font has."""
    chars = []
    for first, last in CHARACTER_RANGES:
        for code in range(first, last + 1):
            ch = chr(code)
            letters = [c for c in unicodedata.normalize("NFKD", ch)
                       if unicodedata.category(c).startswith("L")]
            if (unicodedata.category(ch) in KEPT_CATEGORIES and len(letters) <= 1
                    and any(font.get_char_index(code) != 0 for font in fonts)):
                chars.append(ch)
    return chars


def _render(font: FT2Font, ch: str, frame: int) -> np.ndarray:
    """Anti-aliased (frame, frame) uint8 render of ch: baseline at a fixed row, ink centred
    horizontally, shrunk only if it would not fit the frame."""
    em = frame / (FRAME_TOP_EM - FRAME_BOTTOM_EM)
    glyph = _load_glyph(font, ch, em)
    x_min, y_min, x_max, y_max = np.array(glyph.bbox) / 64  # 26.6 fixed point to pixels
    fit = min(1.0, (frame - 2) / max(x_max - x_min, 1.0), FRAME_TOP_EM * em / max(y_max, 1.0),
              -FRAME_BOTTOM_EM * em / max(-y_min, 1.0))
    if fit < 1.0:
        glyph = _load_glyph(font, ch, em * fit)
    pad = 4
    scratch = np.zeros((frame + 2 * pad, frame + 2 * pad), np.uint8)
    baseline = pad + round(FRAME_TOP_EM * em)
    # draw_glyph_to_bitmap puts the bitmap's top-left corner at (x, y); its top row lies
    # ceil(top of the outline) pixels above the baseline.
    font.draw_glyph_to_bitmap(scratch, pad, baseline - math.ceil(glyph.bbox[3] / 64), glyph)
    scratch = scratch[pad:pad + frame]
    ink = np.flatnonzero(scratch.any(axis=0))
    out = np.zeros((frame, frame), np.uint8)
    if len(ink):
        width = min(ink[-1] + 1 - ink[0], frame)
        left = (frame - width) // 2
        out[:, left:left + width] = scratch[:, ink[0]:ink[0] + width]
    return out


def _load_glyph(font: FT2Font, ch: str, em: float) -> Glyph:
    """Unhinted outline of ch at em pixels per em (hinting would distort shapes across sizes)."""
    font.set_size(em, 72)  # at 72 dpi, points are pixels
    return font.load_char(ord(ch), LoadFlags.NO_HINTING)


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Quantise [0, 1] floats to uint8, clamping out-of-range values."""
    return (images * 255).round().clamp(0, 255).to(torch.uint8)


def _same_render(small: torch.Tensor, render_char: np.ndarray, render_font: np.ndarray,
                 num_chars: int) -> np.ndarray:
    """(num_chars, num_chars) bool: the two characters render identically (see module doc)."""
    shared = np.zeros((num_chars, num_chars), int)
    close = np.zeros((num_chars, num_chars), int)
    flat = small.flatten(1)
    for f in np.unique(render_font):
        rows = np.flatnonzero(render_font == f)
        ids = render_char[rows]
        shared[np.ix_(ids, ids)] += 1
        # Block averages differ by at most the max difference, so they rule out most pairs fast.
        x = flat[rows]
        coarse = F.adaptive_avg_pool2d(small[rows], PREFILTER_SIZE).flatten(1)
        near = torch.cdist(coarse, coarse, p=math.inf) <= MERGE_TOLERANCE
        i, j = near.nonzero(as_tuple=True)
        within = ((x[i] - x[j]).abs().amax(dim=1) <= MERGE_TOLERANCE).numpy()
        close[ids[i.numpy()[within]], ids[j.numpy()[within]]] += 1
    return (shared > 0) & (close >= MERGE_FONT_FRACTION * shared)


def _connected_components(same: np.ndarray) -> list[list[int]]:
    """Classes as sorted index lists, the transitive closure of `same`, ordered by first index."""
    label = np.arange(len(same))
    for i, j in zip(*np.nonzero(np.triu(same, 1))):
        low, high = sorted((label[i], label[j]))
        label[label == high] = low
    return [np.flatnonzero(label == first).tolist() for first in np.unique(label)]


def _class_groups(chars: list[str], classes: list[list[int]]) -> tuple[np.ndarray, list[str]]:
    """Group ids and names: a class's group is named by the class holding the NFD base letter
    of its first character (or by that letter if it is no candidate), numbered in order."""
    class_of = {chars[i]: "/".join(chars[j] for j in members)
                for members in classes for i in members}
    keys = []
    for members in classes:
        base = unicodedata.normalize("NFD", chars[members[0]])[0]
        keys.append(class_of.get(base, base))
    group_names = list(dict.fromkeys(keys))
    return np.array([group_names.index(k) for k in keys], np.int64), group_names


def _sample(renders: torch.Tensor, pools: list[np.ndarray], per_class: int, seed: int,
            image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """per_class distorted images of each class, class by class, each from a random pool render."""
    gen = torch.Generator().manual_seed(seed)
    labels = np.repeat(np.arange(len(pools)), per_class)
    sizes = torch.tensor([len(p) for p in pools])[labels]
    pick = (torch.rand(len(labels), generator=gen) * sizes).long()
    starts = np.cumsum([0] + [len(p) for p in pools[:-1]])
    chosen = np.concatenate(pools)[starts[labels] + pick.numpy()]
    images = [_distort(renders[part], gen, image_size)
              for part in torch.from_numpy(chosen).split(CHUNK)]
    if not images:
        return np.zeros((0, image_size, image_size), np.uint8), labels.astype(np.int64)
    return torch.cat(images).numpy(), labels.astype(np.int64)


def _distort(clean: torch.Tensor, gen: torch.Generator, image_size: int) -> torch.Tensor:
    """(N, image_size, image_size) uint8 images: (N, 1, S, S) uint8 clean renders randomly
    transformed, thickened or thinned, blurred, downsampled, stretched and given noise."""
    n, _, side, _ = clean.shape
    x = _random_affine(clean.float() / 255, gen)
    # Images as the channels of one channels-last batch: CPU pooling and grouped convolution
    # then run vectorised across images, several times faster than with one image per batch item.
    x = x.view(1, n, side, side).contiguous(memory_format=torch.channels_last)
    x = _random_stroke(x, gen)
    x = _random_blur(x, gen)
    x = F.interpolate(x, size=(image_size, image_size), mode="area")
    # Thin, eroded, blurred strokes end up grey: stretch each image to a white brightest pixel.
    x = x / x.amax(dim=(2, 3), keepdim=True).clamp_min(MIN_PEAK)
    noise_std = _uniform(n, NOISE_STD_RANGE, gen).view(1, n, 1, 1)
    x = x + noise_std * torch.randn(x.shape, generator=gen)
    return _to_uint8(x).reshape(n, image_size, image_size).contiguous()


def _uniform(n: int, bounds: tuple[float, float], gen: torch.Generator) -> torch.Tensor:
    """n uniform draws in [low, high)."""
    low, high = bounds
    return low + (high - low) * torch.rand(n, generator=gen)


def _random_affine(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Rotate, scale, shear and shift each image by its own random amounts (bilinear)."""
    n = len(x)
    angle = torch.deg2rad(_uniform(n, (-ROTATION_DEGREES, ROTATION_DEGREES), gen))
    scale = _uniform(n, SCALE_RANGE, gen)
    shear = _uniform(n, (-SHEAR, SHEAR), gen)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotate = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    shear_matrix = torch.eye(2).repeat(n, 1, 1)
    shear_matrix[:, 0, 1] = shear
    forward = rotate @ shear_matrix * scale.view(-1, 1, 1)
    # affine_grid maps output to input coordinates (frame spans [-1, 1]): the inverse map.
    shift = _uniform(2 * n, (-2 * SHIFT_FRACTION, 2 * SHIFT_FRACTION), gen).view(n, 2, 1)
    theta = torch.cat([torch.linalg.inv(forward), shift], dim=2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _random_stroke(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Thicken (grey dilation) or thin (grey erosion) strokes of (1, N, S, S) images by a random
    fractional width in pixels per side: piecewise-linear between 3x3 erosion, x, dilation and
    dilation twice."""
    change = _uniform(x.shape[1], STROKE_RANGE, gen).view(1, -1, 1, 1)
    dilated = F.max_pool2d(x, 3, stride=1, padding=1)
    dilated_twice = F.max_pool2d(dilated, 3, stride=1, padding=1)
    eroded = -F.max_pool2d(-x, 3, stride=1, padding=1)
    x = torch.lerp(x, eroded, (-change).clamp(0, 1))
    x = torch.lerp(x, dilated, change.clamp(0, 1))
    return torch.lerp(x, dilated_twice, (change - 1).clamp(0, 1))


def _random_blur(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Separable Gaussian blur of (1, N, S, S) images with a random sigma per image."""
    n = x.shape[1]
    sigma = _uniform(n, BLUR_SIGMA_RANGE, gen).view(-1, 1)
    radius = math.ceil(3 * BLUR_SIGMA_RANGE[1])
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    x = F.conv2d(x, kernel.view(n, 1, -1, 1), padding=(radius, 0), groups=n)
    return F.conv2d(x, kernel.view(n, 1, 1, -1), padding=(0, radius), groups=n)
