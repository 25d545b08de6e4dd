"""CFACK's training image views for text-to-person retrieval: `WeakView`, `StrongView` and `CnnView`.

Each view is a callable `(PIL image or path, rng) -> normalised float32 (H, W, 3)` whose every random draw comes
from the numpy Generator `rng`, so a record's view is fixed by the seed of its (record, step).

- `WeakView`: Resize((s, s)) bicubic, horizontal flip with p 0.5, normalise (CFACK's `train_transform_ps_weak`).
- `StrongView`: UniformAugment on the decoded image, then the weak view, then Random Erasing (Zhong et al.) on the
  normalised array with fill 0 (`train_transform_ps_strong`, erasing_p 0.6 in CFACK's configs).
- `CnnView`: timm's eval transform for CFACK's CNN data_config: short side to floor(size / crop_pct) bicubic,
  centre crop, ImageNet normalisation (`train_transform_ps_cnn`). Deterministic.

UniformAugment follows tgilewicz/uniformaugment, setup.py version 0.1 (commit 97f20cb), the package that CFACK
imports as `from UniformAugment import UniformAugment` (installed from GitHub; PyPI has no such package). Its rule:
pick `num_ops` ops (2) uniformly with replacement from the 15 below; for each, draw p ~ U(0, 1) and apply the op
when a second U(0, 1) draw is below p (so each picked op runs with probability 1/2), with a magnitude ~ U(low, high).
Shear, translate and rotate negate their magnitude with probability 1/2.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from jaxretrieval.data.transforms import _normalise, _rgb, _squash

CFACK_MEAN = (0.48145466, 0.4578275, 0.40821073)
CFACK_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# UniformAugment's ops and magnitude ranges, in the package's order.
UNIFORM_AUGMENT_OPS: dict[str, tuple[float, float]] = {
    "ShearX": (-0.3, 0.3),
    "ShearY": (-0.3, 0.3),
    "TranslateX": (-0.45, 0.45),
    "TranslateY": (-0.45, 0.45),
    "Rotate": (-30.0, 30.0),
    "AutoContrast": (0.0, 1.0),
    "Invert": (0.0, 1.0),
    "Equalize": (0.0, 1.0),
    "Solarize": (0.0, 256.0),
    "Posterize": (4.0, 8.0),
    "Contrast": (0.1, 1.9),
    "Color": (0.1, 1.9),
    "Brightness": (0.1, 1.9),
    "Sharpness": (0.1, 1.9),
    "Cutout": (0.0, 0.2),
}
MIRRORED_OPS = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"})
CUTOUT_COLOUR = (125, 123, 114)

View = Callable[[Image.Image | str, np.random.Generator], np.ndarray]


def _affine(image: Image.Image, coefficients: tuple[float, ...]) -> Image.Image:
    # nearest neighbour, black outside the source: PIL's defaults, as the package uses them
    return image.transform(image.size, Image.Transform.AFFINE, coefficients)


def _cutout(image: Image.Image, fraction: float, rng: np.random.Generator) -> Image.Image:
    if fraction <= 0:
        return image
    side = fraction * image.width
    width, height = image.size
    # The package draws the centre with np.random.uniform(w), i.e. low=w, high=1: uniform on (1, w], not [0, w).
    centre_x = width + (1.0 - width) * rng.random()
    centre_y = height + (1.0 - height) * rng.random()
    x0 = int(max(0, centre_x - side / 2))
    y0 = int(max(0, centre_y - side / 2))
    image = image.copy()
    ImageDraw.Draw(image).rectangle((x0, y0, min(width, x0 + side), min(height, y0 + side)), fill=CUTOUT_COLOUR)
    return image


_OPS: dict[str, Callable[[Image.Image, float, np.random.Generator], Image.Image]] = {
    "ShearX": lambda image, v, rng: _affine(image, (1, v, 0, 0, 1, 0)),
    "ShearY": lambda image, v, rng: _affine(image, (1, 0, 0, v, 1, 0)),
    "TranslateX": lambda image, v, rng: _affine(image, (1, 0, v * image.width, 0, 1, 0)),
    "TranslateY": lambda image, v, rng: _affine(image, (1, 0, 0, 0, 1, v * image.height)),
    "Rotate": lambda image, v, rng: image.rotate(v),
    "AutoContrast": lambda image, v, rng: ImageOps.autocontrast(image),
    "Invert": lambda image, v, rng: ImageOps.invert(image),
    "Equalize": lambda image, v, rng: ImageOps.equalize(image),
    "Solarize": lambda image, v, rng: ImageOps.solarize(image, v),
    "Posterize": lambda image, v, rng: ImageOps.posterize(image, int(v)),
    "Contrast": lambda image, v, rng: ImageEnhance.Contrast(image).enhance(v),
    "Color": lambda image, v, rng: ImageEnhance.Color(image).enhance(v),
    "Brightness": lambda image, v, rng: ImageEnhance.Brightness(image).enhance(v),
    "Sharpness": lambda image, v, rng: ImageEnhance.Sharpness(image).enhance(v),
    "Cutout": _cutout,
}


def apply_op(image: Image.Image, name: str, magnitude: float, rng: np.random.Generator | None = None) -> Image.Image:
    """Applies one UniformAugment op with the given (already signed) magnitude; only Cutout draws from `rng`."""
    if name not in UNIFORM_AUGMENT_OPS:
        raise ValueError(f"unknown UniformAugment op '{name}'; known: {list(UNIFORM_AUGMENT_OPS)}")
    low, high = UNIFORM_AUGMENT_OPS[name]
    if not low <= magnitude <= high:
        raise ValueError(f"{name} magnitude must lie in [{low}, {high}], got {magnitude}")
    if name == "Cutout" and rng is None:
        raise ValueError("Cutout needs an rng for the box position")
    return _OPS[name](image, magnitude, rng)


@dataclasses.dataclass(frozen=True)
class UniformAugment:
    """UniformAugment (Lingchen et al. 2020) on a PIL image, with the package's op set and selection rule."""

    num_ops: int = 2

    def __post_init__(self):
        if self.num_ops < 0:
            raise ValueError(f"num_ops must be >= 0, got {self.num_ops}")

    def plan(self, rng: np.random.Generator) -> list[tuple[str, float]]:
        """Draws the ops to apply, in order, with their signed magnitudes (skipped picks are left out)."""
        names = list(UNIFORM_AUGMENT_OPS)
        picks = [names[i] for i in rng.integers(0, len(names), size=self.num_ops)]
        chosen = []
        for name in picks:
            probability = rng.random()
            if rng.random() < probability:
                low, high = UNIFORM_AUGMENT_OPS[name]
                magnitude = float(rng.uniform(low, high))
                if name in MIRRORED_OPS and rng.random() > 0.5:
                    magnitude = -magnitude
                chosen.append((name, magnitude))
        return chosen

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        for name, magnitude in self.plan(rng):
            image = apply_op(image, name, magnitude, rng)
        return image


@dataclasses.dataclass(frozen=True)
class RandomErasing:
    """Random Erasing (Zhong et al.) as CFACK's `dataset/random_erasing.py` does it, on an (H, W, C) array.

    With probability `probability`, up to 100 tries draw an area fraction ~ U(sl, sh) and an aspect (h / w)
    ~ U(r1, 1 / r1); the first box strictly smaller than the image in both sides is filled with `value`.
    """

    probability: float = 0.6
    sl: float = 0.02
    sh: float = 0.4
    r1: float = 0.3
    value: Sequence[float] = (0.0, 0.0, 0.0)
    attempts: int = 100

    def __post_init__(self):
        if not 0 <= self.probability <= 1:
            raise ValueError(f"probability must lie in [0, 1], got {self.probability}")
        if not 0 < self.sl <= self.sh:
            raise ValueError(f"need 0 < sl <= sh, got sl={self.sl}, sh={self.sh}")
        if not 0 < self.r1 <= 1:
            raise ValueError(f"r1 must lie in (0, 1], got {self.r1}")

    def box(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int] | None:
        """(top, left, h, w) of the box to erase, or None when this draw erases nothing."""
        if rng.random() > self.probability:
            return None
        area = height * width
        for _ in range(self.attempts):
            target_area = rng.uniform(self.sl, self.sh) * area
            aspect = rng.uniform(self.r1, 1 / self.r1)
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if w < width and h < height:
                top = int(rng.integers(0, height - h, endpoint=True))
                left = int(rng.integers(0, width - w, endpoint=True))
                return top, left, h, w
        return None

    def __call__(self, pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Erases in place and returns `pixels`."""
        box = self.box(pixels.shape[0], pixels.shape[1], rng)
        if box is not None:
            top, left, h, w = box
            pixels[top:top + h, left:left + w] = np.asarray(self.value, pixels.dtype)[: pixels.shape[2]]
        return pixels


def _flip(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return pixels[:, ::-1] if rng.random() < 0.5 else pixels


@dataclasses.dataclass(frozen=True)
class WeakView:
    """CFACK's weak view: squash to (image_size, image_size) bicubic, flip with p 0.5, normalise."""

    image_size: int
    mean: Sequence[float] = CFACK_MEAN
    std: Sequence[float] = CFACK_STD

    def __call__(self, image: Image.Image | str, rng: np.random.Generator) -> np.ndarray:
        pixels = _normalise(_squash(_rgb(image), self.image_size), self.mean, self.std)
        return np.ascontiguousarray(_flip(pixels, rng))


@dataclasses.dataclass(frozen=True)
class StrongView:
    """CFACK's strong view: UniformAugment (on the decoded image), then the weak view, then Random Erasing with
    probability `erasing_p` filling 0 (the normalised mean)."""

    image_size: int
    mean: Sequence[float] = CFACK_MEAN
    std: Sequence[float] = CFACK_STD
    erasing_p: float = 0.6
    uniform_augment: bool = True
    num_ops: int = 2

    def __post_init__(self):
        RandomErasing(self.erasing_p)  # validates erasing_p
        UniformAugment(self.num_ops)

    def __call__(self, image: Image.Image | str, rng: np.random.Generator) -> np.ndarray:
        image = _rgb(image)
        if self.uniform_augment:
            image = UniformAugment(self.num_ops)(image, rng)
        pixels = _normalise(_squash(image, self.image_size), self.mean, self.std)
        pixels = np.ascontiguousarray(_flip(pixels, rng))
        return RandomErasing(self.erasing_p)(pixels, rng)


def _centre_offset(length: int, crop: int) -> int:
    # torchvision's CenterCrop: round-half-even offset, or zero padding split floor-left when the image is smaller
    return -((crop - length) // 2) if length < crop else int(round((length - crop) / 2))


@dataclasses.dataclass(frozen=True)
class CnnView:
    """timm's eval transform for CFACK's CNN data_config (crop_mode "center"): short side to floor(size / crop_pct)
    bicubic (long side truncated, as torchvision's Resize(int)), centre crop (size, size), normalise."""

    size: int = 224
    crop_pct: float = 0.875
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD

    def __post_init__(self):
        if self.size <= 0 or self.crop_pct <= 0:
            raise ValueError(f"size and crop_pct must be positive, got {self.size}, {self.crop_pct}")

    def __call__(self, image: Image.Image | str, rng: np.random.Generator | None = None) -> np.ndarray:
        image = _rgb(image)
        short_target = math.floor(self.size / self.crop_pct)
        width, height = image.size
        if width <= height:
            resized = (short_target, int(short_target * height / width))
        else:
            resized = (int(short_target * width / height), short_target)
        image = image.resize(resized, Image.Resampling.BICUBIC)
        left, top = _centre_offset(resized[0], self.size), _centre_offset(resized[1], self.size)
        image = image.crop((left, top, left + self.size, top + self.size))
        return _normalise(image, self.mean, self.std)
