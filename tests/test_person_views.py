"""CFACK's person views: parity with torchvision / timm, Random Erasing's boxes and UniformAugment's ops and rule."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from jaxretrieval.data.person_views import (
    CFACK_MEAN,
    CFACK_STD,
    CUTOUT_COLOUR,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MIRRORED_OPS,
    UNIFORM_AUGMENT_OPS,
    CnnView,
    RandomErasing,
    StrongView,
    UniformAugment,
    WeakView,
    apply_op,
)


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int32)


def torch_hwc(tensor) -> np.ndarray:
    return tensor.permute(1, 2, 0).numpy()


# ---- views against the references ----


def test_weak_view_is_torchvisions_resize_to_tensor_normalise_and_its_mirror():
    T = pytest.importorskip("torchvision.transforms")
    image = noise_image(41, 97)
    reference = T.Compose([T.Resize((32, 32), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                           T.Normalize(CFACK_MEAN, CFACK_STD)])
    expected = torch_hwc(reference(image))
    view = WeakView(32, CFACK_MEAN, CFACK_STD)
    flips = 0
    for seed in range(40):
        flipped = np.random.default_rng(seed).random() < 0.5
        flips += flipped
        out = view(image, np.random.default_rng(seed))
        assert out.shape == (32, 32, 3) and out.dtype == np.float32 and out.flags.c_contiguous
        np.testing.assert_allclose(out, expected[:, ::-1] if flipped else expected, atol=1e-5)
    assert 0 < flips < 40


@pytest.mark.parametrize(("width", "height", "size", "crop_pct"),
                         [(300, 410, 224, 0.875), (410, 300, 224, 0.875), (90, 50, 224, 0.875), (97, 131, 64, 0.9),
                          (33, 33, 48, 1.25)])
def test_cnn_view_is_timms_eval_transform(width, height, size, crop_pct):
    timm_data = pytest.importorskip("timm.data")
    data_config = {"input_size": (3, size, size), "interpolation": "bicubic", "mean": IMAGENET_MEAN,
                   "std": IMAGENET_STD, "crop_pct": crop_pct, "crop_mode": "center"}
    image = noise_image(width, height, seed=width)
    expected = torch_hwc(timm_data.create_transform(**data_config, is_training=False)(image))
    out = CnnView(size, crop_pct)(image, np.random.default_rng(0))
    assert out.shape == (size, size, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-5)
    np.testing.assert_array_equal(out, CnnView(size, crop_pct)(image))  # deterministic, rng optional


def test_views_open_paths(tmp_path):
    path = tmp_path / "person.png"
    image = noise_image(20, 50)
    image.save(path)
    for view in (WeakView(16), StrongView(16), CnnView(24)):
        np.testing.assert_array_equal(view(str(path), np.random.default_rng(3)), view(image, np.random.default_rng(3)))


# ---- the strong view ----


def test_strong_view_without_augment_or_erasing_is_the_weak_view():
    image = noise_image(30, 70)
    plain = StrongView(24, erasing_p=0.0, uniform_augment=False)
    for seed in range(6):
        np.testing.assert_array_equal(plain(image, np.random.default_rng(seed)),
                                      WeakView(24)(image, np.random.default_rng(seed)))


def test_strong_view_is_seeded_shaped_and_varies():
    image = noise_image(48, 96)
    view = StrongView(32)
    outs = [view(image, np.random.default_rng(seed)) for seed in range(12)]
    for seed, out in enumerate(outs):
        assert out.shape == (32, 32, 3) and out.dtype == np.float32
        np.testing.assert_array_equal(out, view(image, np.random.default_rng(seed)))
    # a draw with no op, no erasing and no flip is the plain view, so a few seeds may coincide
    assert len({out.tobytes() for out in outs}) >= 8
    always = StrongView(32, erasing_p=1.0, uniform_augment=False)(image, np.random.default_rng(0))
    assert (always == 0).all(axis=2).sum() >= 0.02 * 32 * 32 * 0.5


def test_strong_view_rejects_bad_settings():
    with pytest.raises(ValueError, match="probability"):
        StrongView(32, erasing_p=1.5)
    with pytest.raises(ValueError, match="num_ops"):
        StrongView(32, num_ops=-1)


# ---- Random Erasing ----


def feasible(h: int, w: int, area: int, erasing: RandomErasing) -> bool:
    """Whether some area in [sl, sh] * area and aspect in [r1, 1 / r1] round to an (h, w) box."""
    return ((h - 0.5) * (w - 0.5) <= erasing.sh * area and (h + 0.5) * (w + 0.5) >= erasing.sl * area
            and (h - 0.5) / (w + 0.5) <= 1 / erasing.r1 and (h + 0.5) / (w - 0.5) >= erasing.r1)


def test_random_erasing_boxes_fit_the_bounds_and_apply_at_the_rate():
    height, width, draws = 64, 32, 4000
    erasing = RandomErasing(0.6)
    rng = np.random.default_rng(0)
    boxes = [erasing.box(height, width, rng) for _ in range(draws)]
    found = [box for box in boxes if box is not None]
    assert abs(len(found) / draws - 0.6) < 4 * math.sqrt(0.6 * 0.4 / draws)
    for top, left, h, w in found:
        assert 0 < h < height and 0 < w < width and top + h <= height and left + w <= width
        assert top >= 0 and left >= 0 and feasible(h, w, height * width, erasing)
    tops = np.array([box[0] for box in found])
    assert tops.min() == 0 and (tops > height // 2).any()
    assert RandomErasing(0.0).box(height, width, rng) is None
    assert all(RandomErasing(1.0).box(height, width, rng) is not None for _ in range(50))


def test_random_erasing_fills_zero_in_the_box_only():
    erasing = RandomErasing(1.0)
    image = np.full((40, 24, 3), 7.0, np.float32)
    box = erasing.box(40, 24, np.random.default_rng(5))
    out = erasing(image, np.random.default_rng(5))
    top, left, h, w = box
    assert (out[top:top + h, left:left + w] == 0).all()
    out[top:top + h, left:left + w] = 7.0
    assert (out == 7.0).all()


# ---- UniformAugment: ops ----


REFERENCE_OPS = {
    "ShearX": lambda image, v: image.transform(image.size, Image.Transform.AFFINE, (1, v, 0, 0, 1, 0)),
    "ShearY": lambda image, v: image.transform(image.size, Image.Transform.AFFINE, (1, 0, 0, v, 1, 0)),
    "TranslateX": lambda image, v: image.transform(image.size, Image.Transform.AFFINE,
                                                   (1, 0, v * image.size[0], 0, 1, 0)),
    "TranslateY": lambda image, v: image.transform(image.size, Image.Transform.AFFINE,
                                                   (1, 0, 0, 0, 1, v * image.size[1])),
    "Rotate": lambda image, v: image.rotate(v),
    "AutoContrast": lambda image, v: ImageOps.autocontrast(image),
    "Invert": lambda image, v: ImageOps.invert(image),
    "Equalize": lambda image, v: ImageOps.equalize(image),
    "Solarize": lambda image, v: ImageOps.solarize(image, v),
    "Posterize": lambda image, v: ImageOps.posterize(image, int(v)),
    "Contrast": lambda image, v: ImageEnhance.Contrast(image).enhance(v),
    "Color": lambda image, v: ImageEnhance.Color(image).enhance(v),
    "Brightness": lambda image, v: ImageEnhance.Brightness(image).enhance(v),
    "Sharpness": lambda image, v: ImageEnhance.Sharpness(image).enhance(v),
}


def test_op_set_and_ranges_are_the_packages():
    assert list(UNIFORM_AUGMENT_OPS) == [*REFERENCE_OPS, "Cutout"]
    assert UNIFORM_AUGMENT_OPS["TranslateX"] == (-0.45, 0.45) and UNIFORM_AUGMENT_OPS["Rotate"] == (-30, 30)
    assert UNIFORM_AUGMENT_OPS["Solarize"] == (0, 256) and UNIFORM_AUGMENT_OPS["Posterize"] == (4, 8)
    assert UNIFORM_AUGMENT_OPS["Cutout"] == (0, 0.2) and UNIFORM_AUGMENT_OPS["Sharpness"] == (0.1, 1.9)
    assert MIRRORED_OPS == {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"}


@pytest.mark.parametrize("name", list(REFERENCE_OPS))
def test_each_op_is_the_pil_operation(name):
    image = noise_image(40, 28, seed=7)
    low, high = UNIFORM_AUGMENT_OPS[name]
    for magnitude in (low + 0.3 * (high - low), high):
        np.testing.assert_array_equal(pixels(apply_op(image, name, magnitude)),
                                      pixels(REFERENCE_OPS[name](image, magnitude)))


def test_op_semantics_by_hand():
    image = noise_image(40, 20, seed=2)
    source = pixels(image)
    shifted = pixels(apply_op(image, "TranslateX", 0.25))  # 10 pixels: content moves left, black comes in
    np.testing.assert_array_equal(shifted[:, :30], source[:, 10:])
    assert (shifted[:, 30:] == 0).all()
    down = pixels(apply_op(image, "TranslateY", -0.25))  # -5 rows: content moves down
    np.testing.assert_array_equal(down[5:], source[:15])
    np.testing.assert_array_equal(pixels(apply_op(image, "Invert", 0.5)), 255 - source)
    np.testing.assert_array_equal(pixels(apply_op(image, "Solarize", 100.5)),
                                  np.where(source < 100.5, source, 255 - source))
    np.testing.assert_array_equal(pixels(apply_op(image, "Posterize", 5.9)), source & 0b11111000)
    np.testing.assert_array_equal(pixels(apply_op(image, "Brightness", 1.0)), source)


def test_cutout_paints_a_grey_square_of_the_given_fraction():
    image = Image.new("RGB", (50, 80), (0, 0, 0))
    rng = np.random.default_rng(0)
    corners = []
    for _ in range(200):
        painted = np.all(pixels(apply_op(image, "Cutout", 0.2, rng)) == CUTOUT_COLOUR, axis=2)
        rows, cols = np.nonzero(painted)
        assert painted.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)  # one rectangle
        assert rows.max() - rows.min() + 1 <= 11 and cols.max() - cols.min() + 1 <= 11  # side 0.2 * width (+1)
        corners.append((rows.min(), cols.min()))
    corners = np.array(corners)
    assert corners[:, 0].min() == 0 and corners[:, 0].max() > 60 and corners[:, 1].max() > 35
    assert apply_op(image, "Cutout", 0.0, rng) is image


def test_apply_op_rejects_unknown_ops_and_out_of_range_magnitudes():
    image = noise_image(8, 8)
    with pytest.raises(ValueError, match="unknown UniformAugment op"):
        apply_op(image, "Blur", 0.1)
    with pytest.raises(ValueError, match=r"Rotate magnitude must lie in \[-30.0, 30.0\]"):
        apply_op(image, "Rotate", 31.0)
    with pytest.raises(ValueError, match="needs an rng"):
        apply_op(image, "Cutout", 0.1)


# ---- UniformAugment: the selection rule ----


def test_selection_follows_the_packages_rule():
    """Two picks with replacement, uniform over the 15 ops, each applied with probability 1/2 (p ~ U(0, 1), applied
    when U(0, 1) < p), magnitude ~ U(low, high), geometric ops mirrored half the time."""
    draws, n_ops = 20000, len(UNIFORM_AUGMENT_OPS)
    rng = np.random.default_rng(0)
    plans = [UniformAugment(2).plan(rng) for _ in range(draws)]
    applied = Counter(len(plan) for plan in plans)
    for count, expected in ((0, 0.25), (1, 0.5), (2, 0.25)):
        assert abs(applied[count] / draws - expected) < 4 * math.sqrt(expected * (1 - expected) / draws)
    assert set(applied) == {0, 1, 2}

    names = Counter(name for plan in plans for name, _ in plan)
    total = sum(names.values())
    assert set(names) == set(UNIFORM_AUGMENT_OPS)
    chi2 = sum((count - total / n_ops) ** 2 / (total / n_ops) for count in names.values())
    assert chi2 < 45  # 14 degrees of freedom: p < 1e-4 beyond this

    pairs = [plan for plan in plans if len(plan) == 2]
    repeats = sum(plan[0][0] == plan[1][0] for plan in pairs) / len(pairs)
    assert abs(repeats - 1 / n_ops) < 4 * math.sqrt((1 / n_ops) * (1 - 1 / n_ops) / len(pairs))

    magnitudes: dict[str, list[float]] = {}
    for plan in plans:
        for name, magnitude in plan:
            magnitudes.setdefault(name, []).append(magnitude)
    for name, values in magnitudes.items():
        low, high = UNIFORM_AUGMENT_OPS[name]
        values = np.array(values)
        assert values.min() >= low and values.max() <= high
        assert abs(values.mean() - (low + high) / 2) < 4 * (high - low) / math.sqrt(12 * len(values))
    for name in MIRRORED_OPS:
        assert 0.4 < np.mean(np.array(magnitudes[name]) < 0) < 0.6
    assert len(UniformAugment(0).plan(rng)) == 0 and len(UniformAugment(5).plan(rng)) <= 5


def test_uniform_augment_applies_its_plan_in_order():
    image = noise_image(36, 60, seed=4)
    augment = UniformAugment()
    changed = 0
    for seed in range(30):
        replay = np.random.default_rng(seed)
        expected = image
        for name, magnitude in augment.plan(replay):
            expected = apply_op(expected, name, magnitude, replay)
        out = augment(image, np.random.default_rng(seed))
        np.testing.assert_array_equal(pixels(out), pixels(expected))
        changed += not np.array_equal(pixels(out), pixels(image))
    assert 10 < changed < 30
