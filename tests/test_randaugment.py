"""ALBEF's RandomAugment as UIT uses it (`jaxretrieval.data.randaugment`): every op against a numpy reference
written the way the original (cv2 + numpy) computes it, the draw rules, and determinism."""

from __future__ import annotations

import math
import platform

import numpy as np
import pytest
from PIL import Image

from jaxretrieval.data import randaugment as ra

FILL = (128, 128, 128)
SHAPES = [(1, 1), (2, 2), (1, 5), (4, 1), (3, 3), (2, 7), (5, 8), (13, 9), (24, 24)]


def _images(seed: int, shapes=SHAPES):
    """Random, low-range, constant, one-constant-channel and two-level images in each shape."""
    rng = np.random.default_rng(seed)
    for h, w in shapes:
        yield rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        yield rng.integers(40, 190, (h, w, 3), dtype=np.uint8)
        yield np.full((h, w, 3), int(rng.integers(256)), np.uint8)
        one_flat = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        one_flat[:, :, 1] = 77
        yield one_flat
        yield (rng.integers(0, 2, (h, w, 3)) * 255).astype(np.uint8)


# ---- references, written as the original computes each op ------------------------------------------------------

def _calc_hist(channel):
    # cv2.calcHist([ch], [0], None, [256], [0, 256]): float32, shape (256, 1)
    return np.bincount(channel.ravel(), minlength=256).astype(np.float32).reshape(256, 1)


def ref_autocontrast(img):
    def tune_channel(ch):
        high, low = ch.max(), ch.min()
        if high <= low:
            table = np.arange(256)
        else:
            scale = 255 / (high - low)
            with np.errstate(over="ignore"):
                offset = -low * scale  # uint8 negation, as in the original
            table = np.arange(256) * scale + offset
            table[table < 0] = 0
            table[table > 255] = 255
        table = table.clip(0, 255).astype(np.uint8)
        return table[ch]

    return np.stack([tune_channel(img[:, :, c]) for c in range(3)], axis=2)


def ref_equalize(img):
    def tune_channel(ch):
        hist = _calc_hist(ch)
        non_zero_hist = hist[hist != 0].reshape(-1)
        step = np.sum(non_zero_hist[:-1]) // 255
        if step == 0:
            return ch
        n = np.empty_like(hist)
        n[0] = step // 2
        n[1:] = hist[:-1]
        table = (np.cumsum(n) // step).clip(0, 255).astype(np.uint8)
        return table[ch]

    return np.stack([tune_channel(img[:, :, c]) for c in range(3)], axis=2)


def ref_solarize(img, thresh):
    table = np.array([el if el < thresh else 255 - el for el in range(256)]).clip(0, 255).astype(np.uint8)
    return table[img]


def ref_posterize(img, bits):
    return np.bitwise_and(img, np.uint8((255 << (8 - bits)) % 256))  # the wrap numpy 1.x did silently


def ref_color(img, factor):
    m = (np.float32([[0.886, -0.114, -0.114], [-0.587, 0.413, -0.587], [-0.299, -0.299, 0.701]]) * factor
         + np.float32([[0.114], [0.587], [0.299]]))
    return np.matmul(img, m).clip(0, 255).astype(np.uint8)


def ref_contrast(img, factor):
    mean = np.sum(np.mean(img, axis=(0, 1)) * np.array([0.114, 0.587, 0.299]))
    table = np.array([(el - mean) * factor + mean for el in range(256)]).clip(0, 255).astype(np.uint8)
    return table[img]


def ref_brightness(img, factor):
    table = (np.arange(256, dtype=np.float32) * factor).clip(0, 255).astype(np.uint8)
    return table[img]


def _x86_uint8(values):
    # numpy's float32 -> uint8 astype on x86-64 (what UIT ran on): truncate toward zero, wrap modulo 256
    return (np.trunc(values).astype(np.int64) % 256).astype(np.uint8)


def ref_filter2d(img):
    """cv2.filter2D(img, -1, [[1,1,1],[1,5,1],[1,1,1]] / 13): float sums, rounded to nearest, BORDER_REFLECT_101."""
    kernel = np.ones((3, 3))
    kernel[1, 1] = 5
    kernel /= 13
    h, w = img.shape[:2]
    padded = np.pad(img.astype(np.float64), ((1, 1), (1, 1), (0, 0)), mode="reflect")
    out = sum(kernel[i, j] * padded[i:i + h, j:j + w] for i in range(3) for j in range(3))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def ref_sharpness(img, factor):
    degenerate = ref_filter2d(img)
    if factor == 0.0:
        return degenerate
    if factor == 1.0:
        return img
    out = img.astype(np.float32)
    degenerate = degenerate.astype(np.float32)[1:-1, 1:-1, :]
    out[1:-1, 1:-1, :] = degenerate + factor * (out[1:-1, 1:-1, :] - degenerate)
    return _x86_uint8(out)


def cv2_inverse(m):
    """cv2.invertAffineTransform of a 2x3 forward matrix (what warpAffine does without WARP_INVERSE_MAP)."""
    m = [float(v) for v in np.asarray(m, np.float64).ravel()]
    d = m[0] * m[4] - m[1] * m[3]
    d = 1.0 / d if d != 0 else 0.0
    a11, a22, a12, a21 = m[4] * d, m[0] * d, -m[1] * d, -m[3] * d
    return a11, a12, -a11 * m[2] - a12 * m[5], a21, a22, -a21 * m[2] - a22 * m[5]


def ref_warp_cv2(img, m, fill=FILL):
    """cv2.warpAffine INTER_LINEAR / BORDER_CONSTANT, pixel by pixel: coordinates in 1/1024 (cvRound, half to even),
    shifted to 1/32 with rounding, integer bilinear weights summing to 2**15, neighbours outside read `fill`."""
    a11, a12, b1, a21, a22, b2 = cv2_inverse(m)
    h, w = img.shape[:2]
    out = np.empty_like(img)
    for y in range(h):
        x_row = round((a12 * y + b1) * 1024) + 16
        y_row = round((a22 * y + b2) * 1024) + 16
        for x in range(w):
            xq = (x_row + round(a11 * x * 1024)) >> 5
            yq = (y_row + round(a21 * x * 1024)) >> 5
            sx, sy, fx, fy = xq >> 5, yq >> 5, xq & 31, yq & 31
            for c in range(3):
                def at(yy, xx, c=c):
                    return int(img[yy, xx, c]) if 0 <= yy < h and 0 <= xx < w else fill[c]
                total = (at(sy, sx) * (32 - fx) * (32 - fy) + at(sy, sx + 1) * fx * (32 - fy)
                         + at(sy + 1, sx) * (32 - fx) * fy + at(sy + 1, sx + 1) * fx * fy) * 32
                out[y, x, c] = min(255, (total + (1 << 14)) >> 15)
    return out


def ref_warp_float(img, m, fill=FILL):
    """Exact bilinear sampling of the cv2 inverse mapping (no fixed point), rounded to nearest."""
    a11, a12, b1, a21, a22, b2 = cv2_inverse(m)
    h, w = img.shape[:2]
    padded = np.empty((h + 2, w + 2, 3))
    padded[:] = fill
    padded[1:-1, 1:-1] = img
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    u = np.clip(a11 * xs + a12 * ys + b1, -1, w)  # beyond one pixel out only the fill is read
    v = np.clip(a21 * xs + a22 * ys + b2, -1, h)
    x0, y0 = np.floor(u).astype(int), np.floor(v).astype(int)
    fx, fy = (u - x0)[..., None], (v - y0)[..., None]
    x0, y0 = np.clip(x0, -1, w) + 1, np.clip(y0, -1, h) + 1
    x1, y1 = np.minimum(x0 + 1, w + 1), np.minimum(y0 + 1, h + 1)
    top = padded[y0, x0] * (1 - fx) + padded[y0, x1] * fx
    bottom = padded[y1, x0] * (1 - fx) + padded[y1, x1] * fx
    return np.rint(top * (1 - fy) + bottom * fy)


def rotation_forward(w, h, degrees):
    # cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1)
    a = degrees * math.pi / 180
    alpha, beta = math.cos(a), math.sin(a)
    cx, cy = w / 2, h / 2
    return np.array([[alpha, beta, (1 - alpha) * cx - beta * cy], [-beta, alpha, beta * cx + (1 - alpha) * cy]])


def forward_matrix(name, value, w, h):
    if name == "Rotate":
        return rotation_forward(w, h, value)
    return {"ShearX": np.float32([[1, value, 0], [0, 1, 0]]), "ShearY": np.float32([[1, 0, 0], [value, 1, 0]]),
            "TranslateX": np.float32([[1, 0, -value], [0, 1, 0]]),
            "TranslateY": np.float32([[1, 0, 0], [0, 1, -value]])}[name]


# ---- per-op equality -------------------------------------------------------------------------------------------

TABLE_CASES = [
    ("Identity", (), lambda img: img),
    ("AutoContrast", (), ref_autocontrast),
    ("Equalize", (), ref_equalize),
    ("Solarize", (179,), lambda img: ref_solarize(img, 179)),
    ("Solarize", (0,), lambda img: ref_solarize(img, 0)),
    ("Solarize", (256,), lambda img: ref_solarize(img, 256)),
    *[("Posterize", (bits,), lambda img, bits=bits: ref_posterize(img, bits)) for bits in range(9)],
    *[(name, (f,), lambda img, f=f, ref=ref: ref(img, f))
      for name, ref in (("Color", ref_color), ("Contrast", ref_contrast), ("Brightness", ref_brightness),
                        ("Sharpness", ref_sharpness))
      for f in (0.0, 0.1, 0.5, 1.0, 1.36, 1.9, 0.7 * 1.8 + 0.1)],
]


@pytest.mark.parametrize("name, args, reference", TABLE_CASES,
                         ids=[f"{name}{args}" for name, args, _ in TABLE_CASES])
def test_pixel_op_matches_the_original_formula_exactly(name, args, reference):
    for img in _images(11):
        got = ra.apply_op(img.copy(), name, *args)
        assert got.dtype == np.uint8 and got.shape == img.shape
        np.testing.assert_array_equal(got, reference(img), err_msg=f"{name}{args} on {img.shape}")


def test_large_images_match_too():
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    img[..., 0] = np.clip(img[..., 0], 0, 200)  # channel 0 reaches 0, so AutoContrast stretches it
    for name, args, reference in TABLE_CASES:
        np.testing.assert_array_equal(ra.apply_op(img, name, *args), reference(img), err_msg=f"{name}{args}")


AFFINE_CASES = [("ShearX", v) for v in (0.21, -0.21, 0.3, -0.05)] + [("ShearY", v) for v in (0.21, -0.21, 0.47)] + [
    ("TranslateX", v) for v in (7.0, -7.0, 2.3, -0.4)] + [("TranslateY", v) for v in (7.0, -7.0, 1.6)] + [
    ("Rotate", v) for v in (21.0, -21.0, 90.0, 180.0, -33.3, 0.0)]


@pytest.mark.parametrize("name, value", AFFINE_CASES)
def test_affine_op_matches_cv2_fixed_point_exactly(name, value):
    for img in _images(7, shapes=[(1, 1), (2, 2), (3, 5), (9, 12), (16, 11)]):
        h, w = img.shape[:2]
        want = ref_warp_cv2(img, forward_matrix(name, value, w, h))
        np.testing.assert_array_equal(ra.apply_op(img, name, value, FILL), want, err_msg=f"{name} {img.shape}")


@pytest.mark.parametrize("name, value", AFFINE_CASES)
def test_affine_op_is_bilinear_sampling_of_the_cv2_inverse_map(name, value):
    """Against exact bilinear sampling: within 1 grey level where the image is smooth; cv2's 1/32-pixel coordinates
    add at most about contrast / 30 where a neighbour is the fill (the image border)."""
    h, w = 40, 48
    ys, xs = np.mgrid[0:h, 0:w]
    smooth = 128 + 24 * np.sin(xs / 9.0) * np.cos(ys / 7.0) + (xs - w / 2) * 0.5
    img = np.stack([smooth, smooth[::-1], 255 - smooth], axis=2).round().astype(np.uint8)
    got = ra.apply_op(img, name, value, FILL).astype(int)
    want = ref_warp_float(img, forward_matrix(name, value, w, h))
    diff = np.abs(got - want)
    a11, a12, b1, a21, a22, b2 = cv2_inverse(forward_matrix(name, value, w, h))
    u, v = a11 * xs + a12 * ys + b1, a21 * xs + a22 * ys + b2
    interior = (u >= 0.05) & (u <= w - 1.05) & (v >= 0.05) & (v <= h - 1.05)
    if interior.any():
        assert diff[interior].max() <= 1
    contrast_with_fill = np.abs(img.astype(int) - 128).max()
    assert diff.max() <= 1 + contrast_with_fill / 24


def test_geometry_directions():
    img = np.zeros((21, 21, 3), np.uint8)
    img[10, 15] = 255  # five pixels right of the centre pixel
    # Rotate +90 about (10.5, 10.5): counter-clockwise as displayed, (x 15, y 10) -> (x 10, y 6), above the centre
    out = ra.apply_op(img, "Rotate", 90.0, FILL)
    assert out[6, 10, 0] == 255 and (out[..., 0] == 255).sum() == 1
    out = ra.apply_op(img, "Rotate", -90.0, FILL)  # clockwise: (x 15, y 10) -> (x 11, y 15)
    assert out[15, 11, 0] == 255
    out = ra.apply_op(img, "TranslateX", 3.0, FILL)
    assert out[10, 12, 0] == 255 and out[:, -3:, 0].min() == 128  # content moves left, fill enters on the right
    out = ra.apply_op(img, "TranslateY", -4.0, FILL)
    assert out[14, 15, 0] == 255 and out[:4, :, 0].min() == 128
    out = ra.apply_op(img, "ShearX", 0.2, FILL)  # dst(x, y) = src(x - 0.2 y, y)
    assert out[10, 17, 0] == 255


def test_sharpness_quirks_and_edges():
    img = np.array([[[250] * 3] * 3] * 3, np.uint8)
    img[1, 1] = 255
    img[0, :] = 0
    out = ra.sharpness(img, 1.9)
    # interior: degenerate rounds (sum / 13), then the float32 blend overshoots 255 and wraps as astype does on x86
    degenerate = (0 * 3 + 250 * 5 + 5 * 255 + 6) // 13
    assert ra.sharpness(img, 0.0)[1, 1, 0] == degenerate
    assert out[1, 1, 0] == int(np.float32(degenerate) + np.float32(1.9) * (np.float32(255) - degenerate)) % 256
    np.testing.assert_array_equal(out[0], img[0])  # the border keeps the input
    for shape in [(1, 1, 3), (2, 2, 3), (2, 9, 3)]:  # no interior: unchanged
        small = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        np.testing.assert_array_equal(ra.sharpness(small, 1.36), small)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86-64 cast semantics")
def test_reference_cast_is_numpy_astype_on_x86():
    values = np.array([-300.5, -3.5, -0.5, 0.7, 255.9, 260.4, 511.0, 600.2], np.float32)
    np.testing.assert_array_equal(_x86_uint8(values), values.astype(np.uint8))


def test_autocontrast_overflow_quirk_and_the_intended_stretch():
    img = np.zeros((2, 3, 3), np.uint8)
    img[..., 0] = [[10, 20, 30], [40, 50, 60]]  # min 10 > 0: the original's -low wraps, the channel turns white
    img[..., 1] = [[0, 20, 30], [40, 50, 51]]  # min 0: stretched, table i * 255 / 51 truncated
    img[..., 2] = 9  # flat: unchanged
    out = ra.autocontrast(img)
    assert (out[..., 0] == 255).all()
    np.testing.assert_array_equal(out[..., 1], (img[..., 1] * 5).astype(np.uint8))
    np.testing.assert_array_equal(out[..., 2], img[..., 2])
    fixed = ra.autocontrast(img, wrap_low=False)
    scale = 255 / 50
    table = np.clip(np.arange(256) * scale - 10 * scale, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(fixed[..., 0], table[img[..., 0]])
    assert fixed[..., 0].min() == 0 and fixed[..., 0].max() == 255
    aug = ra.RandomAugment(num_ops=1, ops=("AutoContrast",), original_autocontrast=False)
    rng = np.random.default_rng(0)
    outs = {aug(img, rng)[0, 0, 0] for _ in range(20)}
    assert outs == {0, 10}  # applied (stretched to 0) or skipped, never the white-out


def test_equalize_edge_cases():
    two = np.zeros((1, 2, 3), np.uint8)
    two[0, 1] = 200  # two bins with one pixel each: step = 1 // 255 = 0, unchanged
    np.testing.assert_array_equal(ra.equalize(two), two)
    img = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # one pixel per level: step 1
    np.testing.assert_array_equal(ra.equalize(img), ref_equalize(img))
    np.testing.assert_array_equal(ra.equalize(img)[0, :, 0], np.clip(np.arange(256), 0, 255))


def test_cutout_draws_its_position_from_rng():
    img = np.full((10, 20, 3), 9, np.uint8)
    out = ra.cutout(img, 6, np.random.default_rng(4), fill=(1, 2, 3))
    rh, rw = np.random.default_rng(4).random(2)
    cy, cx = int(rh * 10), int(rw * 20)
    want = img.copy()
    want[max(cy - 3, 0):min(cy + 3, 10), max(cx - 3, 0):min(cx + 3, 20)] = (1, 2, 3)
    np.testing.assert_array_equal(out, want)
    assert (img == 9).all()


# ---- level -> args, draws, statistics --------------------------------------------------------------------------

class ScriptedRng:
    """Stands in for a Generator: returns scripted draws and records the order they were asked for."""

    def __init__(self, picks, uniforms):
        self.picks, self.uniforms, self.calls = list(picks), list(uniforms), []

    def integers(self, low, high, size):
        self.calls.append(("integers", low, high, size))
        out, self.picks = np.array(self.picks[:size]), self.picks[size:]
        return out

    def random(self):
        self.calls.append(("random",))
        return self.uniforms.pop(0)


def test_draw_order_and_rules():
    ops = ra.UIT_OPS
    rng = ScriptedRng([ops.index("Rotate"), ops.index("ShearX"), ops.index("TranslateY"), ops.index("Equalize")],
                      [0.5, 0.49, 0.51, 0.2, 0.51, 0.3])
    steps = ra.RandomAugment(num_ops=4).plan(rng)
    assert rng.calls[0] == ("integers", 0, 10, 4) and len(rng.calls) == 7 and not rng.uniforms
    assert steps == [
        ra.Step("Rotate", True, (-21.0, FILL)),  # 0.5 applies (skip is > 0.5); sign draw 0.49 < 0.5 negates
        ra.Step("ShearX", False, ()),  # 0.51 skips, and no sign is drawn
        ra.Step("TranslateY", True, (-7.0, FILL)),  # sign draw 0.51 > 0.5 negates
        ra.Step("Equalize", True, ()),  # no sign draw
    ]


def test_level_to_args_at_uit_magnitude():
    rng = np.random.default_rng(0)
    assert ra.level_to_args("Brightness", 7, rng) == (0.7 * 1.8 + 0.1,)
    assert ra.level_to_args("Sharpness", 7, rng)[0] == pytest.approx(1.36)
    assert abs(ra.level_to_args("ShearY", 7, rng)[0]) == 0.7 * 0.3
    assert abs(ra.level_to_args("TranslateX", 7, rng)[0]) == 7.0
    assert abs(ra.level_to_args("Rotate", 7, rng)[0]) == 21.0
    assert ra.level_to_args("Solarize", 7, rng) == (179,)
    assert ra.level_to_args("Posterize", 7, rng) == (2,)
    assert ra.level_to_args("Identity", 7, rng) == ()


def _within(count, n, p, sds=5.0):
    return abs(count - n * p) <= sds * math.sqrt(n * p * (1 - p))


def test_draw_statistics():
    aug = ra.RandomAugment()
    rng = np.random.default_rng(123)
    calls = 20000
    plans = [aug.plan(rng) for _ in range(calls)]
    assert all(len(plan) == 2 for plan in plans)
    steps = [step for plan in plans for step in plan]
    for name in ra.UIT_OPS:
        mine = [step for step in steps if step.name == name]
        assert _within(len(mine), len(steps), 1 / len(ra.UIT_OPS)), name
        applied = [step for step in mine if step.applied]
        assert _within(len(applied), len(mine), 0.5), name
        if name in ra.SIGNED_OPS:
            negative = sum(step.args[0] < 0 for step in applied)
            assert _within(negative, len(applied), 0.5), name
            assert {abs(step.args[0]) for step in applied} == {{"Rotate": 21.0, "TranslateX": 7.0,
                                                                "TranslateY": 7.0}.get(name, 0.7 * 0.3)}
    assert _within(sum(step.applied for step in steps), len(steps), 0.5)


# ---- the callable --------------------------------------------------------------------------------------------------

def _texture():
    ys, xs = np.mgrid[0:64, 0:48]
    noise = np.random.default_rng(9).integers(0, 60, (64, 48, 3))
    return (np.stack([xs * 5, ys * 3, (xs * ys) % 200], axis=2) + noise).clip(0, 255).astype(np.uint8)


def test_same_seed_same_output_and_seeds_differ():
    aug = ra.RandomAugment()
    img = _texture()
    before = img.copy()
    for seed in range(5):
        a = aug(img, np.random.default_rng(seed))
        b = aug(Image.fromarray(img), np.random.default_rng(seed))
        assert a.dtype == np.uint8 and a.shape == img.shape
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(img, before)  # the input is not modified
    outputs = {aug(img, np.random.default_rng(seed)).tobytes() for seed in range(12)}
    assert len(outputs) >= 6


def test_call_applies_the_planned_ops_in_order():
    img = _texture()
    aug = ra.RandomAugment(num_ops=3, ops=ra.ALL_OPS)
    for seed in range(8):
        want = img
        for name, applied, args in aug.plan(np.random.default_rng(seed)):
            if applied:
                want = ra.apply_op(want, name, *args)
        np.testing.assert_array_equal(aug(img, np.random.default_rng(seed)), want)


def test_ops_validation():
    with pytest.raises(ValueError, match="valid ops: .*'Identity'.*'ShearY'"):
        ra.RandomAugment(ops=("Identity", "Cutout"))
    with pytest.raises(ValueError, match="unknown RandomAugment op 'Invert'"):
        ra.apply_op(np.zeros((2, 2, 3), np.uint8), "Invert")
    with pytest.raises(ValueError):
        ra.RandomAugment(ops="Identity")
    with pytest.raises(ValueError):
        ra.RandomAugment(num_ops=-1)
    with pytest.raises(ValueError, match="uint8"):
        ra.RandomAugment()(np.zeros((4, 4, 3), np.float32), np.random.default_rng(0))
    assert ra.RandomAugment(ops=()).ops == ra.ALL_OPS  # an empty augs means all ops, as in the original
    assert len(ra.ALL_OPS) == 14 and set(ra.UIT_OPS) <= set(ra.ALL_OPS)
