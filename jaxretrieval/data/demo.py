"""A small synthetic image-text retrieval dataset that is generated locally from a seed.

Each image shows one or two coloured shapes on a plain dark background; each caption names the size,
colour, shape and position of every object, in several phrasings per image.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import string
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from jaxretrieval.data.tokenizers import split_words

FORMAT_VERSION = 1
METADATA_FILE = "demo.json"
VOCAB_FILE = "vocab.txt"
SPLITS = ("train", "test")
MAX_CAPTIONS_PER_IMAGE = 10
MIN_IMAGE_SIZE = 16

BACKGROUND = (24, 24, 24)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (245, 230, 40),
    "green": (30, 180, 50),
    "blue": (40, 90, 255),
    "purple": (170, 60, 230),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
SIZE_WORDS = {"small": ("small", "tiny"), "large": ("large", "big")}
# Half-extent of an object's bounding box, as a fraction of the image size.
SIZE_FRACTIONS = {"small": 0.125, "large": 0.1875}
VERTICAL_WORDS = {0: ("top", "upper"), 2: ("bottom", "lower")}
HORIZONTAL_WORDS = {0: "left", 2: "right"}

CORNER_TEMPLATES = ("at the {v} {h}", "in the {v} {h} corner", "in the {vv} {h}")
TOP_BOTTOM_TEMPLATES = ("at the {v}", "near the {v}", "in the {vv} middle")
SIDE_TEMPLATES = ("on the {h}", "on the {h} side", "to the {h}")
CENTER_PHRASES = ("in the center", "in the middle", "at the center")
NOUN_TEMPLATES = (
    "a {size} {color} {shape}",
    "a {size} {shape} colored {color}",
    "a {color} {shape} that is {size}",
)
SINGLE_TEMPLATES = (
    "{np} {where}",
    "there is {np} {where}",
    "{where} is {np}",
    "{where} there is {np}",
    "a picture of {np} {where}",
)
PAIR_TEMPLATES = (
    "{np1} {where1} and {np2} {where2}",
    "{np1} {where1} with {np2} {where2}",
    "there is {np1} {where1} and {np2} {where2}",
    "{where1} is {np1} and {where2} is {np2}",
)
ARTICLES = ("a", "an")
_ARTICLE_BEFORE_VOWEL = re.compile(r"\ba (?=[aeiou])")


@dataclasses.dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    row: int
    col: int
    cx: int
    cy: int
    radius: int


def caption_vocabulary() -> list[str]:
    """Every word a demo caption can contain, sorted."""
    formatter = string.Formatter()
    templates = (*CORNER_TEMPLATES, *TOP_BOTTOM_TEMPLATES, *SIDE_TEMPLATES, *CENTER_PHRASES)
    templates += (*NOUN_TEMPLATES, *SINGLE_TEMPLATES, *PAIR_TEMPLATES)
    fragments = [literal for template in templates for literal, *_ in formatter.parse(template)]
    fragments += [*COLORS, *SHAPES, *ARTICLES, *HORIZONTAL_WORDS.values()]
    fragments += [word for words in (*SIZE_WORDS.values(), *VERTICAL_WORDS.values()) for word in words]
    return sorted({word for fragment in fragments for word in split_words(fragment)})


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _sample_object(rng: np.random.Generator, image_size: int) -> SceneObject:
    size = "large" if rng.random() < 0.5 else "small"
    row, col = (int(v) for v in rng.integers(3, size=2))
    jitter = image_size // 32
    dx, dy = (int(v) for v in rng.integers(-jitter, jitter + 1, size=2))
    # Grid-cell centres far enough from the border that a jittered large object stays inside.
    low = round(SIZE_FRACTIONS["large"] * image_size) + jitter
    high = image_size - 1 - low
    centres = (low, (low + high) // 2, high)
    radius = round(SIZE_FRACTIONS[size] * image_size)
    shape, color = _pick(rng, SHAPES), _pick(rng, list(COLORS))
    return SceneObject(shape, color, size, row, col, centres[col] + dx, centres[row] + dy, radius)


def _separated(a: SceneObject, b: SceneObject) -> bool:
    """True when the bounding boxes are in different grid cells with a background pixel between them."""
    gap = a.radius + b.radius + 2
    different_cell = (a.row, a.col) != (b.row, b.col)
    return different_cell and (abs(a.cx - b.cx) >= gap or abs(a.cy - b.cy) >= gap)


def sample_scene(rng: np.random.Generator, image_size: int) -> list[SceneObject]:
    """One or two objects; two objects never share a grid cell and never touch."""
    if rng.random() < 0.5:
        return [_sample_object(rng, image_size)]
    for _ in range(1000):
        first, second = _sample_object(rng, image_size), _sample_object(rng, image_size)
        if _separated(first, second):
            return [first, second]
    raise RuntimeError(f"could not place two separate objects in a {image_size}px image")


def render_scene(objects: Sequence[SceneObject], image_size: int) -> Image.Image:
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        fill = COLORS[obj.color]
        x0, y0, x1, y1 = obj.cx - obj.radius, obj.cy - obj.radius, obj.cx + obj.radius, obj.cy + obj.radius
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif obj.shape == "ring":
            draw.ellipse((x0, y0, x1, y1), outline=fill, width=max(2, round(obj.radius * 0.45)))
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([(obj.cx, y0), (x1, y1), (x0, y1)], fill=fill)
        elif obj.shape == "diamond":
            draw.polygon([(obj.cx, y0), (x1, obj.cy), (obj.cx, y1), (x0, obj.cy)], fill=fill)
        elif obj.shape == "cross":
            arm = max(1, round(obj.radius / 3))
            draw.rectangle((obj.cx - arm, y0, obj.cx + arm, y1), fill=fill)
            draw.rectangle((x0, obj.cy - arm, x1, obj.cy + arm), fill=fill)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}")
    return image


def _position_phrases(row: int, col: int) -> tuple[str, ...]:
    if row != 1 and col != 1:
        (v, vv), h = VERTICAL_WORDS[row], HORIZONTAL_WORDS[col]
        return tuple(template.format(v=v, vv=vv, h=h) for template in CORNER_TEMPLATES)
    if row != 1:
        v, vv = VERTICAL_WORDS[row]
        return tuple(template.format(v=v, vv=vv) for template in TOP_BOTTOM_TEMPLATES)
    if col != 1:
        return tuple(template.format(h=HORIZONTAL_WORDS[col]) for template in SIDE_TEMPLATES)
    return CENTER_PHRASES


def _describe(rng: np.random.Generator, objects: Sequence[SceneObject]) -> str:
    parts = [
        (
            _pick(rng, NOUN_TEMPLATES).format(size=_pick(rng, SIZE_WORDS[obj.size]), color=obj.color, shape=obj.shape),
            _pick(rng, _position_phrases(obj.row, obj.col)),
        )
        for obj in objects
    ]
    if len(parts) == 1:
        (np1, where1), *_ = parts
        text = _pick(rng, SINGLE_TEMPLATES).format(np=np1, where=where1)
    else:
        if rng.random() < 0.5:
            parts.reverse()
        (np1, where1), (np2, where2) = parts
        text = _pick(rng, PAIR_TEMPLATES).format(np1=np1, where1=where1, np2=np2, where2=where2)
    return _ARTICLE_BEFORE_VOWEL.sub("an ", text)


def sample_captions(rng: np.random.Generator, objects: Sequence[SceneObject], count: int) -> list[str]:
    """``count`` different captions for one scene."""
    captions: dict[str, None] = {}
    for _ in range(100 * count):
        captions[_describe(rng, objects)] = None
        if len(captions) == count:
            return list(captions)
    raise RuntimeError(f"could not phrase {count} different captions for {objects}")


def _split_records(directory: Path, split: str, params: dict[str, Any], first_id: int) -> Iterator[str]:
    size, count = params["image_size"], params[f"num_{split}"]
    for index in range(count):
        rng = np.random.default_rng([params["seed"], SPLITS.index(split), index])
        objects = sample_scene(rng, size)
        name = f"images/{split}_{index:05d}.png"
        render_scene(objects, size).save(directory / name, format="PNG")
        for caption in sample_captions(rng, objects, params["captions_per_image"]):
            yield json.dumps({"image": name, "caption": caption, "image_id": first_id + index})


def _write_dataset(directory: Path, params: dict[str, Any]) -> None:
    (directory / "images").mkdir()
    first_id = 0
    for split in SPLITS:
        lines = list(_split_records(directory, split, params, first_id))
        (directory / f"{split}.jsonl").write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
        first_id += params[f"num_{split}"]
    (directory / VOCAB_FILE).write_text("".join(f"{w}\n" for w in caption_vocabulary()), encoding="utf-8")
    # Written last: its presence marks the dataset as complete.
    (directory / METADATA_FILE).write_text(json.dumps(params, indent=2) + "\n", encoding="utf-8")


def _read_params(root: Path) -> dict[str, Any] | None:
    try:
        params = json.loads((root / METADATA_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return params if isinstance(params, dict) else None


def sibling(root: Path, tag: str) -> Path:
    """A fresh hidden folder beside `root` (same file system, so a rename moves it into place atomically)."""
    return root.with_name(f".{root.name}.{uuid.uuid4().hex}.{tag}")


def install(staged: Path, root: Path, installed: Callable[[], bool]) -> None:
    """Renames the complete `staged` folder to `root`, replacing what is there. If `installed()` says the same
    dataset is already at `root` (another process, e.g. of a multi-process run, finished first), that copy stays,
    since its readers may be using it, and `staged` is dropped; so also if the rename loses a race."""
    if installed():
        shutil.rmtree(staged, ignore_errors=True)
        return
    stale = None
    if root.exists():
        stale = sibling(root, "old")
        os.replace(root, stale)
    try:
        os.replace(staged, root)
    except OSError:
        if not installed():
            raise
        shutil.rmtree(staged, ignore_errors=True)  # a concurrent call installed the same dataset first
    finally:
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)


def generate_demo(
    root: str | os.PathLike[str],
    *,
    seed: int = 0,
    num_train: int = 4000,
    num_test: int = 200,
    image_size: int = 32,
    captions_per_image: int = 3,
) -> Path:
    """Generate the demo dataset under ``root`` unless it is already there with the same parameters.

    Layout: ``images/{split}_{index:05d}.png``, ``train.jsonl`` and ``test.jsonl`` (one
    ``{"image", "caption", "image_id"}`` object per caption), ``vocab.txt`` and ``demo.json``. The files
    are written to a hidden sibling directory that is renamed to ``root`` once complete, and an existing
    demo dataset with other parameters is replaced. Returns ``root`` as a :class:`~pathlib.Path`.
    """
    root = Path(root)
    if num_train < 0 or num_test < 0:
        raise ValueError(f"num_train and num_test must be non-negative, got {num_train} and {num_test}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}")
    if not 1 <= captions_per_image <= MAX_CAPTIONS_PER_IMAGE:
        raise ValueError(f"captions_per_image must be in [1, {MAX_CAPTIONS_PER_IMAGE}], got {captions_per_image}")
    params = {
        "format_version": FORMAT_VERSION,
        "seed": int(seed),
        "num_train": int(num_train),
        "num_test": int(num_test),
        "image_size": int(image_size),
        "captions_per_image": int(captions_per_image),
    }
    if _read_params(root) == params:
        return root
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"demo dataset root {root} exists and is not a directory")
    if root.is_dir() and any(root.iterdir()) and not (root / METADATA_FILE).is_file():
        raise FileExistsError(f"{root} is not empty and holds no demo dataset; refusing to overwrite it")

    root.parent.mkdir(parents=True, exist_ok=True)
    staged = sibling(root, "tmp")
    staged.mkdir()
    try:
        _write_dataset(staged, params)
        install(staged, root, lambda: _read_params(root) == params)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return root
