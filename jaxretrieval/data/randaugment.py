"""ALBEF's `RandomAugment` as UIT (and CMP) uses it, in numpy + PIL, every random draw from a numpy Generator.

UIT's training transform (`uit/cmp/dataset/__init__.py`) is Resize((224, 224)) bicubic, RandomHorizontalFlip,
`RandomAugment(2, 7, isPIL=True, augs=UIT_OPS)`, then ToTensor, Normalize and RandomErasing. The augmentation
(`uit/cmp/dataset/randaugment.py`, ALBEF's file) works on the uint8 (H, W, 3) array of the PIL image with cv2.
cv2 is not a dependency here: its two calls are reimplemented in numpy (`warp_affine`, the sharpness filter).

Facts read in the original:

- `get_random_ops` picks N op names uniformly with replacement (`np.random.choice(augs, N)`); each picked op is
  skipped when a U(0, 1) draw is > 0.5, else its arguments come from `arg_dict[name](M)` (M = 7, MAX_LEVEL 10)
  and it is applied. Draw order: the N picks, then per pick the apply draw and, only when applied, the sign draw.
  `RandomAugment.plan` and `__call__` draw from `rng` in exactly that order (`rng.integers` for the picks).
- Level -> arguments: Color/Contrast/Brightness/Sharpness factor (M / 10) * 1.8 + 0.1 (1.36 at M = 7);
  ShearX/ShearY (M / 10) * 0.3, negated when a U(0, 1) draw is > 0.5; TranslateX/TranslateY (M / 10) * 10 pixels
  (translate_const 10), negated when a draw is > 0.5; Rotate (M / 10) * 30 degrees, negated when a draw is < 0.5;
  Solarize threshold int((M / 10) * 256); Posterize bits int((M / 10) * 4). The geometric ops fill with
  (128, 128, 128). `func_dict` holds 14 ops (`ALL_OPS`); an empty `augs` means all of them. `cutout_func` exists
  in the file but is in neither dict, so the original can never pick it: `cutout` here is a helper, not an op.
- Color and Contrast take their grey weights as (0.114, 0.587, 0.299) on channels (0, 1, 2): BGR weights, applied
  to the RGB array that `isPIL=True` gives. Kept as written.

Three quirks of the original are reproduced because they are what UIT trained with:

- AutoContrast computes `offset = -low * scale` with `low = ch.min()` a numpy uint8 scalar, and unary minus on a
  uint8 wraps (-low == 256 - low, numpy 1.x and 2.x alike). So a channel whose minimum is above 0 (and whose
  maximum is above its minimum) maps to 255 everywhere; only channels that already reach 0 are stretched.
  `autocontrast(..., wrap_low=False)` (`RandomAugment(original_autocontrast=False)`) gives the intended stretch.
- Sharpness blends `degenerate + factor * (img - degenerate)` in float32 and casts with `.astype(np.uint8)` without
  clipping. numpy's float -> uint8 cast of an out-of-range value truncates toward zero and wraps modulo 256 on
  x86-64 (an overshoot to 260.4 becomes 4, -3.5 becomes 253); that is done here explicitly, so the result does
  not depend on the platform (aarch64's cast saturates instead).
- Posterize's `np.uint8(255 << (8 - bits))` wrapped modulo 256 in the numpy of the time (numpy 2 raises): the mask
  is `(255 << (8 - bits)) & 255`, so bits 0 gives an all-black image.

Exactness, measured against the original file run with opencv-python-headless 4.10.0.84 and numpy 2.4 on x86-64
(3000 cases per op on random, low-range, constant, two-level and smooth images from 1x1 to 224x224, and 3000 whole
`RandomAugment` calls, N 0-3, M 0-10, UIT_OPS and ALL_OPS, with the original's np.random fed the same draws):
every op and every call bit-identical. Per op:

- Identity, AutoContrast, Equalize, Solarize, Posterize, Brightness, Contrast, Color: the original's table or
  matmul formulas in the same numpy dtypes, bit-identical. Equalize counts in int64, equal to the original's float32
  histogram arithmetic for fewer than 2**24 pixels. Color's float32 matmul truncates, so like the original it
  follows the machine's BLAS rounding where a value lands on an integer.
- Sharpness: cv2.filter2D's 3x3 [[1,1,1],[1,5,1],[1,1,1]] / 13 on uint8 rounds to nearest; the exact value is
  S / 13 for an integer S, never a tie, so the integer (S + 6) // 13 is cv2's result. Only the interior is
  blended; the border keeps the input (factor 0 returns the filtered image, border reflected as cv2's
  BORDER_REFLECT_101; factor 1 returns the input). Bit-identical.
- ShearX/ShearY/TranslateX/TranslateY/Rotate: `warp_affine` is cv2.warpAffine(INTER_LINEAR, BORDER_CONSTANT)
  rebuilt in numpy, fixed point included: the forward matrix is inverted in float64 as cv2 does, source
  coordinates are rounded to 1/32 pixel (cv2's INTER_BITS 5, from 1/1024 steps), the bilinear weights are
  integers summing to 2**15 and the sum is rounded (v + 2**14) >> 15; a neighbour outside the image reads the
  fill value. Bit-identical in every case tried, borders included. PIL's `Image.transform(AFFINE, BILINEAR)` was not
  used: it weighs with the exact fractions and clamps to the edge pixel instead of blending with the fill, so it
  differs by a few grey levels inside and by up to half the contrast with the fill on the one-pixel border
  (measured: up to 7 inside and 64 on the border for noise, rotate 21). A float (unquantised) bilinear sampler of
  the same inverse map differs from cv2 by about (contrast within the 2x2 neighbourhood) / 30 + 1 grey levels, from
  the 1/32-pixel rounding of the coordinates (measured: 1 on smooth images, 8 on uniform noise); an OpenCV build
  whose warpAffine does not use this fixed point would differ from cv2 4.10 by as much.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from PIL import Image

MAX_LEVEL = 10
TRANSLATE_CONST = 10
FILL = (128, 128, 128)
# func_dict's 14 ops, in arg_dict's order (what an empty `augs` means in the original).
ALL_OPS: tuple[str, ...] = ("Identity", "AutoContrast", "Equalize", "Rotate", "Solarize", "Color", "Contrast",
                            "Brightness", "Sharpness", "ShearX", "TranslateX", "TranslateY", "Posterize", "ShearY")
# UIT's `augs` (uit/cmp/dataset/__init__.py), in its order.
UIT_OPS: tuple[str, ...] = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness", "ShearX", "ShearY",
                            "TranslateX", "TranslateY", "Rotate")
SIGNED_OPS = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"})

# cv2's fixed point for warpAffine + remap with INTER_LINEAR on 8-bit images.
_AB_BITS = 10  # source coordinates first in 1/1024 pixel
_INTER_BITS = 5  # then rounded to 1/32 pixel
_TAB = 1 << _INTER_BITS
_COEF_BITS = 15  # bilinear weights sum to 2**15


def _check(pixels: np.ndarray) -> np.ndarray:
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3 or 0 in pixels.shape:
        raise ValueError(f"expected a non-empty uint8 (H, W, 3) array, got {pixels.dtype} {pixels.shape}")
    return pixels


def _per_channel(pixels: np.ndarray, tune: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    return np.stack([tune(pixels[:, :, c]) for c in range(pixels.shape[2])], axis=2)


def _wrap_uint8(values: np.ndarray) -> np.ndarray:
    """float -> uint8 as numpy's astype does it on x86-64: truncate toward zero, then wrap modulo 256."""
    return (np.trunc(values).astype(np.int64) & 255).astype(np.uint8)


def identity(pixels: np.ndarray) -> np.ndarray:
    return pixels


def autocontrast(pixels: np.ndarray, wrap_low: bool = True) -> np.ndarray:
    """Per-channel min/max stretch through a 256-entry table (cutoff 0); `wrap_low` keeps the original's uint8
    overflow of -min (see the module docstring)."""

    def tune(channel: np.ndarray) -> np.ndarray:
        high, low = int(channel.max()), int(channel.min())
        if high <= low:
            return channel
        scale = 255 / (high - low)
        offset = ((-low) % 256 if wrap_low else -low) * scale
        table = np.arange(256) * scale + offset
        return np.clip(table, 0, 255).astype(np.uint8)[channel]

    return _per_channel(_check(pixels), tune)


def equalize(pixels: np.ndarray) -> np.ndarray:
    """PIL's equalize formula as the original writes it: step = (pixels outside the last used bin) // 255, and
    lut[i] = (step // 2 + pixels below i) // step; a channel with step 0 is returned unchanged."""

    def tune(channel: np.ndarray) -> np.ndarray:
        hist = np.bincount(channel.ravel(), minlength=256)
        used = hist[hist != 0]
        step = int(used[:-1].sum()) // 255
        if step == 0:
            return channel
        shifted = np.concatenate([[step // 2], hist[:-1]])
        return np.clip(np.cumsum(shifted) // step, 0, 255).astype(np.uint8)[channel]

    return _per_channel(_check(pixels), tune)


def solarize(pixels: np.ndarray, threshold: int = 128) -> np.ndarray:
    levels = np.arange(256)
    table = np.where(levels < threshold, levels, 255 - levels).clip(0, 255).astype(np.uint8)
    return table[_check(pixels)]


def posterize(pixels: np.ndarray, bits: int) -> np.ndarray:
    return np.bitwise_and(_check(pixels), np.uint8((255 << (8 - bits)) & 255))


def color(pixels: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the grey image (weights 0.114, 0.587, 0.299 on channels 0, 1, 2) as one float32 3x3 matmul."""
    blend = (np.float32([[0.886, -0.114, -0.114], [-0.587, 0.413, -0.587], [-0.299, -0.299, 0.701]]) * factor
             + np.float32([[0.114], [0.587], [0.299]]))
    return np.matmul(_check(pixels), blend).clip(0, 255).astype(np.uint8)


def contrast(pixels: np.ndarray, factor: float) -> np.ndarray:
    pixels = _check(pixels)
    mean = np.sum(np.mean(pixels, axis=(0, 1)) * np.array([0.114, 0.587, 0.299]))
    table = ((np.arange(256) - mean) * factor + mean).clip(0, 255).astype(np.uint8)
    return table[pixels]


def brightness(pixels: np.ndarray, factor: float) -> np.ndarray:
    table = (np.arange(256, dtype=np.float32) * factor).clip(0, 255).astype(np.uint8)
    return table[_check(pixels)]


def _smooth(pixels: np.ndarray) -> np.ndarray:
    """cv2.filter2D(pixels, -1, [[1,1,1],[1,5,1],[1,1,1]] / 13) on uint8: rounded to nearest, BORDER_REFLECT_101."""
    height, width = pixels.shape[:2]
    padded = np.pad(pixels.astype(np.int32), ((1, 1), (1, 1), (0, 0)), mode="reflect")
    total = 4 * padded[1:-1, 1:-1]
    for dy in range(3):
        for dx in range(3):
            total = total + padded[dy:dy + height, dx:dx + width]
    return ((total + 6) // 13).astype(np.uint8)  # total / 13 is never a tie


def sharpness(pixels: np.ndarray, factor: float) -> np.ndarray:
    pixels = _check(pixels)
    if factor == 0.0:
        return _smooth(pixels)
    if factor == 1.0:
        return pixels
    out = pixels.copy()
    if pixels.shape[0] < 3 or pixels.shape[1] < 3:
        return out
    degenerate = _smooth(pixels)[1:-1, 1:-1].astype(np.float32)
    blended = degenerate + factor * (pixels[1:-1, 1:-1].astype(np.float32) - degenerate)
    out[1:-1, 1:-1] = _wrap_uint8(blended)
    return out


def warp_affine(pixels: np.ndarray, matrix: np.ndarray, fill: tuple[int, int, int] = FILL) -> np.ndarray:
    """cv2.warpAffine(pixels, matrix, (W, H), flags=INTER_LINEAR, borderValue=fill) with cv2's fixed point:
    dst(x, y) = src(matrix^-1 (x, y, 1)), pixel centres at integer coordinates, source outside reads `fill`."""
    pixels = _check(pixels)
    height, width = pixels.shape[:2]
    m = np.asarray(matrix).astype(np.float64).reshape(2, 3)
    det = m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0]
    inv_det = 1.0 / det if det != 0 else 0.0
    a11, a12, a21, a22 = m[1, 1] * inv_det, -m[0, 1] * inv_det, -m[1, 0] * inv_det, m[0, 0] * inv_det
    b1 = -a11 * m[0, 2] - a12 * m[1, 2]
    b2 = -a21 * m[0, 2] - a22 * m[1, 2]
    scale = 1 << _AB_BITS
    xs, ys = np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64)
    half = scale // _TAB // 2  # round to nearest 1/32
    # cvRound (round half to even) of each part, as cv2 splits the row start and the per-column step
    row_x = np.rint((a12 * ys + b1) * scale).astype(np.int64) + half
    row_y = np.rint((a22 * ys + b2) * scale).astype(np.int64) + half
    x_coord = row_x[:, None] + np.rint(a11 * xs * scale).astype(np.int64)[None, :]
    y_coord = row_y[:, None] + np.rint(a21 * xs * scale).astype(np.int64)[None, :]
    x_coord >>= _AB_BITS - _INTER_BITS
    y_coord >>= _AB_BITS - _INTER_BITS
    x0, fx = x_coord >> _INTER_BITS, (x_coord & (_TAB - 1)).astype(np.int32)
    y0, fy = y_coord >> _INTER_BITS, (y_coord & (_TAB - 1)).astype(np.int32)
    # one pixel of fill around the image; any neighbour further out is clamped onto it
    padded = np.empty((height + 2, width + 2, 3), dtype=np.int32)
    padded[:] = np.asarray(fill, dtype=np.int32)
    padded[1:-1, 1:-1] = pixels
    flat = padded.reshape(-1, 3)
    top = np.clip(y0, -1, height) + 1
    bottom = np.clip(y0 + 1, -1, height) + 1
    left = np.clip(x0, -1, width) + 1
    right = np.clip(x0 + 1, -1, width) + 1
    unit = (1 << _COEF_BITS) // (_TAB * _TAB)  # weights (32 - fy) (32 - fx) 32 ... are exact integers
    wy0, wy1 = (_TAB - fy) * unit, fy * unit
    wx0, wx1 = _TAB - fx, fx
    stride = width + 2
    total = np.take(flat, top * stride + left, axis=0) * (wy0 * wx0)[:, :, None]
    total += np.take(flat, top * stride + right, axis=0) * (wy0 * wx1)[:, :, None]
    total += np.take(flat, bottom * stride + left, axis=0) * (wy1 * wx0)[:, :, None]
    total += np.take(flat, bottom * stride + right, axis=0) * (wy1 * wx1)[:, :, None]
    return np.clip((total + (1 << (_COEF_BITS - 1))) >> _COEF_BITS, 0, 255).astype(np.uint8)


def rotation_matrix(centre: tuple[float, float], degrees: float, scale: float = 1.0) -> np.ndarray:
    """cv2.getRotationMatrix2D: rotation by `degrees` counter-clockwise (as displayed, y down) about `centre`."""
    cx, cy = float(np.float32(centre[0])), float(np.float32(centre[1]))  # cv2 takes a Point2f
    angle = degrees * (math.pi / 180)
    alpha, beta = math.cos(angle) * scale, math.sin(angle) * scale
    return np.array([[alpha, beta, (1 - alpha) * cx - beta * cy], [-beta, alpha, beta * cx + (1 - alpha) * cy]])


def rotate(pixels: np.ndarray, degrees: float, fill: tuple[int, int, int] = FILL) -> np.ndarray:
    """Rotation about (W / 2, H / 2), counter-clockwise for positive `degrees`."""
    pixels = _check(pixels)
    height, width = pixels.shape[:2]
    return warp_affine(pixels, rotation_matrix((width / 2, height / 2), degrees), fill)


def shear_x(pixels: np.ndarray, factor: float, fill: tuple[int, int, int] = FILL) -> np.ndarray:
    return warp_affine(pixels, np.float32([[1, factor, 0], [0, 1, 0]]), fill)


def shear_y(pixels: np.ndarray, factor: float, fill: tuple[int, int, int] = FILL) -> np.ndarray:
    return warp_affine(pixels, np.float32([[1, 0, 0], [factor, 1, 0]]), fill)


def translate_x(pixels: np.ndarray, offset: float, fill: tuple[int, int, int] = FILL) -> np.ndarray:
    """dst(x, y) = src(x + offset, y): the content moves left by `offset` pixels."""
    return warp_affine(pixels, np.float32([[1, 0, -offset], [0, 1, 0]]), fill)


def translate_y(pixels: np.ndarray, offset: float, fill: tuple[int, int, int] = FILL) -> np.ndarray:
    return warp_affine(pixels, np.float32([[1, 0, 0], [0, 1, -offset]]), fill)


def cutout(pixels: np.ndarray, pad_size: int, rng: np.random.Generator,
           fill: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    """The original's `cutout_func` (not one of its ops): a box of side about `pad_size` centred at a uniform
    position (two U(0, 1) draws, rows then columns), clipped to the image, set to `fill`."""
    pixels = _check(pixels)
    height, width = pixels.shape[:2]
    rh, rw = rng.random(2)
    half = pad_size // 2
    centre_y, centre_x = int(rh * height), int(rw * width)
    out = pixels.copy()
    out[max(centre_y - half, 0):min(centre_y + half, height), max(centre_x - half, 0):min(centre_x + half, width)] = (
        np.asarray(fill, dtype=np.uint8))
    return out


OP_FUNCTIONS: dict[str, Callable[..., np.ndarray]] = {
    "Identity": identity,
    "AutoContrast": autocontrast,
    "Equalize": equalize,
    "Rotate": rotate,
    "Solarize": solarize,
    "Color": color,
    "Contrast": contrast,
    "Brightness": brightness,
    "Sharpness": sharpness,
    "ShearX": shear_x,
    "TranslateX": translate_x,
    "TranslateY": translate_y,
    "Posterize": posterize,
    "ShearY": shear_y,
}


def _known(name: str) -> None:
    if name not in OP_FUNCTIONS:
        raise ValueError(f"unknown RandomAugment op {name!r}; valid ops: {list(ALL_OPS)}")


def level_to_args(name: str, level: float, rng: np.random.Generator) -> tuple:
    """The original's `arg_dict[name](level)`; the signed ops draw their sign from `rng` (one U(0, 1) draw)."""
    _known(name)
    fraction = level / MAX_LEVEL
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return (fraction * 1.8 + 0.1,)
    if name in ("ShearX", "ShearY"):
        value = fraction * 0.3
        return (-value if rng.random() > 0.5 else value, FILL)
    if name in ("TranslateX", "TranslateY"):
        value = fraction * float(TRANSLATE_CONST)
        return (-value if rng.random() > 0.5 else value, FILL)
    if name == "Rotate":
        value = fraction * 30
        return (-value if rng.random() < 0.5 else value, FILL)
    if name == "Solarize":
        return (int(fraction * 256),)
    if name == "Posterize":
        return (int(fraction * 4),)
    return ()


def apply_op(pixels: np.ndarray, name: str, *args) -> np.ndarray:
    """`func_dict[name](img, *args)` on a uint8 (H, W, 3) array."""
    _known(name)
    return OP_FUNCTIONS[name](_check(pixels), *args)


class Step(NamedTuple):
    name: str
    applied: bool
    args: tuple


@dataclasses.dataclass(frozen=True)
class RandomAugment:
    """ALBEF's RandomAugment(N=num_ops, M=magnitude, augs=ops); UIT uses the defaults. An empty `ops` means
    `ALL_OPS`, as in the original. `original_autocontrast=False` replaces the original's overflowing AutoContrast
    with the min/max stretch it meant."""

    num_ops: int = 2
    magnitude: int = 7
    ops: tuple[str, ...] = UIT_OPS
    original_autocontrast: bool = True

    def __post_init__(self):
        if self.num_ops < 0:
            raise ValueError(f"num_ops must be >= 0, got {self.num_ops}")
        if not 0 <= self.magnitude <= MAX_LEVEL:
            raise ValueError(f"magnitude must lie in [0, {MAX_LEVEL}], got {self.magnitude}")
        if isinstance(self.ops, str):
            raise ValueError(f"ops must be a sequence of op names, got the string {self.ops!r}")
        ops = tuple(self.ops) or ALL_OPS
        for name in ops:
            _known(name)
        object.__setattr__(self, "ops", ops)

    def plan(self, rng: np.random.Generator) -> list[Step]:
        """The `num_ops` picks in order, each with whether it applies and its arguments (empty when skipped)."""
        picks = [self.ops[i] for i in rng.integers(0, len(self.ops), size=self.num_ops)]
        steps = []
        for name in picks:
            if rng.random() > 0.5:
                steps.append(Step(name, False, ()))
            else:
                steps.append(Step(name, True, level_to_args(name, self.magnitude, rng)))
        return steps

    def __call__(self, image: Image.Image | np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """uint8 (H, W, 3) array of the augmented image (a new array; the input is not modified)."""
        if isinstance(image, Image.Image):
            pixels = np.array(image.convert("RGB"))
        else:
            pixels = _check(image).copy()
        for name, applied, args in self.plan(rng):
            if not applied:
                continue
            if name == "AutoContrast":
                pixels = autocontrast(pixels, wrap_low=self.original_autocontrast)
            else:
                pixels = apply_op(pixels, name, *args)
        return pixels
