"""Per-record transforms: decode and resize an image, normalise it, tokenize its caption."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image, UnidentifiedImageError

from jaxretrieval.data.sources import CaptionRecord, DataError

log = logging.getLogger(__name__)


def load_image(path: str) -> Image.Image:
    """Opens an image as RGB; a missing or unreadable file is a DataError naming it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image file {path} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"image file {path} cannot be read: {e}") from None


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """PIL image (or path) -> normalised float32 (size, size, 3): resize the short side, centre crop.

    The same callable is the `preprocess` that `jaxretrieval.load` returns.
    """

    image_size: int
    mean: Sequence[float]
    std: Sequence[float]

    def __call__(self, image: Image.Image | str) -> np.ndarray:
        if isinstance(image, str):
            image = load_image(image)
        image = image.convert("RGB")
        size = self.image_size
        width, height = image.size
        if (width, height) != (size, size):
            scale = size / min(width, height)
            resized = (max(size, round(width * scale)), max(size, round(height * scale)))
            image = image.resize(resized, Image.Resampling.BICUBIC)
            left, top = (resized[0] - size) // 2, (resized[1] - size) // 2
            image = image.crop((left, top, left + size, top + size))
        pixels = np.asarray(image, dtype=np.float32) / 255.0
        return (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)


class EncodePair(grain.transforms.RandomMap):
    """CaptionRecord -> {"image", "text", "group"} arrays; None for a bad image when skipping is allowed."""

    def __init__(self, preprocess: Preprocess, tokenizer: Callable[[Any], np.ndarray], *, flip: bool,
                 skip_bad: bool):
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.flip = flip
        self.skip_bad = skip_bad
        self.skipped = 0  # per process: each grain worker counts its own

    def random_map(self, record: CaptionRecord, rng: np.random.Generator) -> dict[str, np.ndarray] | None:
        try:
            pixels = self.preprocess(record.image)
        except DataError as e:
            if not self.skip_bad:
                raise
            self.skipped += 1
            log.warning("skipping %s (%d unreadable images skipped so far in this process)", e, self.skipped)
            return None
        if self.flip and rng.random() < 0.5:
            pixels = pixels[:, ::-1]
        return {"image": np.ascontiguousarray(pixels), "text": self.tokenizer(record.caption)[0],
                "group": np.int32(record.group)}


class DropSkipped(grain.transforms.Filter):
    def filter(self, element: Any) -> bool:
        return element is not None
