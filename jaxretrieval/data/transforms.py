"""Per-record transforms: decode and resize an image, normalise it, tokenize its caption.

`Preprocess` is the deterministic evaluation transform; `HybridView` is LHP's training augmentation that mixes
local views (RandomResizedCrop) with global ones (the whole image squashed to a square).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import struct
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image, UnidentifiedImageError

from jaxretrieval.data.sources import CaptionRecord, DataError, image_file

log = logging.getLogger(__name__)

RESIZE_MODES = ("crop", "squash")
# What PIL raises for a file it cannot decode: UnidentifiedImageError and other OSErrors (truncated or broken
# data), ValueError (bad header fields, a path holding a NUL), SyntaxError / struct.error / EOFError from format
# plugins, and DecompressionBombError for an image declaring more pixels than PIL allows.
DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, struct.error,
                 Image.DecompressionBombError)


def load_image(path: str, draft: Callable[[tuple[int, int]], tuple[int, int]] | None = None) -> Image.Image:
    """Opens an image as RGB; a missing or undecodable file is a DataError naming it. With `draft` a JPEG decodes at
    the smallest of 1/1, 1/2, 1/4, 1/8 scale that keeps it at least `draft((width, height))` (the codec's own
    downscaling: several times faster for photos larger than the model input)."""
    try:
        with Image.open(image_file(path)) as image:
            if draft is not None and image.format == "JPEG":
                image.draft("RGB", draft(image.size))
            return image.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image file {path} does not exist") from None
    except UnidentifiedImageError:
        raise DataError(f"cannot decode image {path} (not in a format PIL recognises)") from None
    except DECODE_ERRORS as e:
        raise DataError(f"cannot decode image {path} ({e or type(e).__name__})") from None


def _rgb(image: Image.Image | str, draft: Callable[[tuple[int, int]], tuple[int, int]] | None = None) -> Image.Image:
    return load_image(image, draft) if isinstance(image, str) else image.convert("RGB")


def _short_side_target(size: int) -> Callable[[tuple[int, int]], tuple[int, int]]:
    """(width, height) -> the size a short-side resize to `size` gives: what a draft decode must keep."""
    def target(image_size: tuple[int, int]) -> tuple[int, int]:
        scale = size / min(image_size)
        return math.ceil(image_size[0] * scale), math.ceil(image_size[1] * scale)
    return target


def _squash(image: Image.Image, size: int) -> Image.Image:
    """Bicubic resize to (size, size), ignoring the aspect ratio (torchvision `Resize((size, size))`)."""
    return image.resize((size, size), Image.Resampling.BICUBIC)


def _short_side_centre_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    if (width, height) == (size, size):
        return image
    scale = size / min(width, height)
    resized = (max(size, round(width * scale)), max(size, round(height * scale)))
    image = image.resize(resized, Image.Resampling.BICUBIC)
    left, top = (resized[0] - size) // 2, (resized[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def _normalise(image: Image.Image, mean: Sequence[float], std: Sequence[float], uint8: bool = False) -> np.ndarray:
    """(H, W, 3) float32 (pixels / 255 - mean) / std, or with `uint8` the pixels as they are (the train step then
    normalises on the device: `normalise_pixels`)."""
    if uint8:
        return np.asarray(image, dtype=np.uint8)
    return normalise_pixels(np.asarray(image, dtype=np.uint8), mean, std)


def normalise_pixels(pixels: Any, mean: Sequence[float], std: Sequence[float]) -> Any:
    """uint8 pixels (numpy, or a jax array on the device) -> float32 (pixels / 255 - mean) / std."""
    if isinstance(pixels, np.ndarray):
        xp = np
    else:
        import jax.numpy as xp
    return (pixels.astype(xp.float32) / 255.0 - xp.asarray(mean, xp.float32)) / xp.asarray(std, xp.float32)


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """PIL image (or path) -> normalised float32 (size, size, 3).

    resize="crop": short side to `image_size` (bicubic), then a centre crop; "squash": straight to
    (image_size, image_size) bicubic, as BEiT-3 evaluates. The same callable is the `preprocess` that
    `jaxretrieval.load` returns. `draft`: JPEGs decode at reduced scale (see load_image); `uint8`: unnormalised
    uint8 pixels out.
    """

    image_size: int
    mean: Sequence[float]
    std: Sequence[float]
    resize: str = "crop"
    draft: bool = False
    uint8: bool = False

    def __post_init__(self):
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got '{self.resize}'")

    def __call__(self, image: Image.Image | str) -> np.ndarray:
        squash = self.resize == "squash"
        draft = (lambda _: (self.image_size,) * 2) if squash else _short_side_target(self.image_size)
        image = _rgb(image, draft if self.draft else None)
        if squash:
            image = _squash(image, self.image_size)
        else:
            image = _short_side_centre_crop(image, self.image_size)
        return _normalise(image, self.mean, self.std, self.uint8)


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
                            rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a RandomResizedCrop box: torchvision's / timm's `get_params` algorithm."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h, endpoint=True))
            left = int(rng.integers(0, width - w, endpoint=True))
            return top, left, h, w
    # no sample fitted: centre crop with the aspect ratio clamped to the allowed range
    in_ratio = width / height
    w, h = width, height
    if in_ratio < min(ratio):
        h = round(w / min(ratio))
    elif in_ratio > max(ratio):
        w = round(h * max(ratio))
    return (height - h) // 2, (width - w) // 2, h, w


@dataclasses.dataclass(frozen=True)
class HybridView:
    """LHP's hybrid training view: PIL image (or path) + rng -> normalised float32 (size, size, 3).

    Per sample x ~ N(0.5, sigma); x > threshold gives a local view (RandomResizedCrop(image_size, scale, ratio),
    bicubic), otherwise the global view (the whole image squashed to (image_size, image_size), bicubic).
    Every random draw comes from `rng`. `draft` and `uint8` as Preprocess (draft for global views only: a local
    crop keeps full resolution).
    """

    image_size: int
    mean: Sequence[float]
    std: Sequence[float]
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    threshold: float = 0.5
    sigma: float = 1 / 6
    draft: bool = False
    uint8: bool = False

    def __post_init__(self):
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must be (low, high) with 0 < low <= high, got {self.ratio}")
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")

    def is_local(self, rng: np.random.Generator) -> bool:
        """Draws the branch: True for a local (cropped) view."""
        return bool(rng.normal(0.5, self.sigma) > self.threshold)

    def __call__(self, image: Image.Image | str, rng: np.random.Generator) -> np.ndarray:
        local = self.is_local(rng)
        image = _rgb(image, (lambda _: (self.image_size,) * 2) if self.draft and not local else None)
        if local:
            top, left, height, width = random_resized_crop_box(*image.size, self.scale, self.ratio, rng)
            image = image.crop((left, top, left + width, top + height))
        return _normalise(_squash(image, self.image_size), self.mean, self.std, self.uint8)


class EncodePair(grain.transforms.RandomMap):
    """CaptionRecord -> {"image", "text", "group", "origin"} arrays (origin: the record's annotation file index and
    line, kept on the host to name a batch's records in errors), and `fields(record)` when given (a system's extra
    arrays, e.g. teacher features); None for a bad image when skipping is allowed.

    With `view` (e.g. a HybridView: any callable (image, rng) -> array) images go through `view(image, rng)`
    instead of `preprocess`. `files` are the annotation files the records' `file` indices point into (the
    source's `paths`): an image that fails to decode is then named with the file:line of its record, or by
    `where(record)` when given (the source's own naming).
    """

    def __init__(self, preprocess: Preprocess, tokenizer: Callable[[Any], np.ndarray], *, flip: bool,
                 skip_bad: bool, view: Callable[[Image.Image | str, np.random.Generator], np.ndarray] | None = None,
                 files: Sequence[str | os.PathLike] = (),
                 fields: Callable[[CaptionRecord], dict[str, np.ndarray]] | None = None,
                 where: Callable[[CaptionRecord], str] | None = None):
        self.preprocess = preprocess
        self.where = where
        self.fields = fields
        self.tokenizer = tokenizer
        self.flip = flip
        self.skip_bad = skip_bad
        self.view = view
        self.files = [str(file) for file in files]
        self.skipped = 0  # per process: each grain worker counts its own

    def _image(self, path: str, rng: np.random.Generator) -> np.ndarray:
        return self.preprocess(path) if self.view is None else self.view(path, rng)

    def _where(self, record: CaptionRecord) -> str:
        if self.where is not None:
            return f"{self.where(record)}: "
        return f"{self.files[record.file]}:{record.line}: " if record.line and record.file < len(self.files) else ""

    def random_map(self, record: CaptionRecord, rng: np.random.Generator) -> dict[str, np.ndarray] | None:
        try:
            pixels = self._image(record.image, rng)
        except DataError as e:
            if not self.skip_bad:
                raise DataError(f"{self._where(record)}{e}") from None
            self.skipped += 1
            log.warning("skipping %s%s (%d unreadable images skipped so far in this process)", self._where(record),
                        e, self.skipped)
            return None
        if self.flip and rng.random() < 0.5:
            pixels = pixels[:, ::-1]
        extra = self.fields(record) if self.fields is not None else {}
        return {"image": np.ascontiguousarray(pixels), "text": self.tokenizer(record.caption)[0],
                "group": np.int32(record.group), "origin": np.array([record.file, record.line], np.int32), **extra}


class DropSkipped(grain.transforms.Filter):
    def filter(self, element: Any) -> bool:
        return element is not None
