"""Pictures for the generated precomp demo set (precomp.write_precomp_demo), so a CLIP can embed its images.

`python -m jaxretrieval.data.precomp_images [--root data/precomp_demo] [--size 32] [--seed 0]` writes the demo set
at ROOT when it is missing, renders ROOT/images/{id}.png for every image id of every split and writes
ROOT/words.txt, a word vocabulary (WordTokenizer) of the demo captions for `clip_globals --model ... --tokenizer`.

Each image shows the two concepts its captions name, recovered from the captions (precomp._CONCEPTS synonyms).
Concept c has a fixed colour, one of four shapes (c % 4) and its own cell of a 4 x 3 grid, drawn over a noisy dark
background with a jitter of a pixel or two: images of the same concepts look alike, and a frozen random CLIP's
features differ by concept. The same seed gives the same pictures.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from jaxretrieval.data.precomp import _CONCEPTS, write_precomp_demo
from jaxretrieval.data.sources import read_text
from jaxretrieval.errors import DataError, command, parse_command_line

PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (255, 255, 255))
GRID = (4, 3)  # columns, rows: concept c sits in cell (c % 4, c // 4)
CAPTIONS_PER_IMAGE = 5
_WORD_TO_CONCEPT = {word: index for index, words in enumerate(_CONCEPTS) for word in words}


def demo_splits(root: Path) -> list[str]:
    """The splits of a demo folder: every `{split}_ids.txt` with its `{split}_caps.txt`, sorted by name."""
    splits = sorted(path.name[:-len("_ids.txt")] for path in root.glob("*_ids.txt"))
    splits = [split for split in splits if (root / f"{split}_caps.txt").is_file()]
    if not splits:
        raise DataError(f"{root} holds no {{split}}_ids.txt with its {{split}}_caps.txt: write the demo set first "
                        f"(jaxretrieval.data.precomp.write_precomp_demo)")
    return splits


def image_concepts(root: Path, split: str) -> list[tuple[str, tuple[int, int]]]:
    """(image id, its two concept indices, sorted) for every image of a split, from its five captions."""
    ids_path, caps_path = root / f"{split}_ids.txt", root / f"{split}_caps.txt"
    ids = [line.strip() for line in read_text(ids_path, "image id file").splitlines()]
    captions = read_text(caps_path, "caption file").splitlines()
    if len(captions) != CAPTIONS_PER_IMAGE * len(ids):
        raise DataError(f"{caps_path} holds {len(captions)} captions for the {len(ids)} ids of {ids_path}: expected "
                        f"{CAPTIONS_PER_IMAGE} per image")
    out = []
    for index, image_id in enumerate(ids):
        first = index * CAPTIONS_PER_IMAGE
        found = {_WORD_TO_CONCEPT[word] for caption in captions[first:first + CAPTIONS_PER_IMAGE]
                 for word in re.findall(r"[a-z]+", caption.lower()) if word in _WORD_TO_CONCEPT}
        if len(found) != 2:
            raise DataError(f"{caps_path}:{first + 1}-{first + CAPTIONS_PER_IMAGE}: the captions of image "
                            f"{image_id!r} ({ids_path}:{index + 1}) name {len(found)} demo concepts, not 2")
        low, high = sorted(found)
        out.append((image_id, (low, high)))
    return out


def render(concepts: tuple[int, int], size: int, rng: np.random.Generator) -> Image.Image:
    """One size x size RGB picture of two concepts (see the module docstring)."""
    background = 40 + rng.normal(0.0, 8.0, (size, size, 3))
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    width, height = size / GRID[0], size / GRID[1]
    for concept in concepts:
        column, row = concept % GRID[0], concept // GRID[0]
        dx, dy = rng.integers(-1, 2, size=2)
        left, top = column * width + dx, row * height + dy
        right, bottom = left + width - 1, top + height - 1
        box = [left, top, right, bottom]
        colour = PALETTE[concept]
        shape = concept % 4
        if shape == 0:
            draw.ellipse(box, fill=colour)
        elif shape == 1:
            draw.rectangle(box, fill=colour)
        elif shape == 2:
            draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=colour)
        else:
            bar_w, bar_h = max(1.0, width / 3), max(1.0, height / 3)
            centre_x, centre_y = (left + right) / 2, (top + bottom) / 2
            draw.rectangle([centre_x - bar_w / 2, top, centre_x + bar_w / 2, bottom], fill=colour)
            draw.rectangle([left, centre_y - bar_h / 2, right, centre_y + bar_h / 2], fill=colour)
    return image


def write_precomp_demo_images(root: str | Path, size: int = 32, seed: int = 0) -> Path:
    """Renders root/images/{id}.png for every image of the demo set at `root` (see the module docstring); returns
    the images folder. Skipped when the folder already holds exactly those pictures."""
    if size < 8:
        raise DataError(f"the demo pictures need at least 8 pixels a side, got {size}")
    root = Path(root)
    folder = root / "images"
    splits = demo_splits(root)
    ids = [line.strip() for split in splits
           for line in read_text(root / f"{split}_ids.txt", "image id file").splitlines()]
    expected = {f"{image_id}.png" for image_id in ids}
    if len(expected) != len(ids):
        raise DataError(f"{root}: the splits' {{split}}_ids.txt repeat image ids; each picture needs its own id")
    if folder.is_dir() and {path.name for path in folder.glob("*.png")} == expected:
        return folder
    images = [item for split in splits for item in image_concepts(root, split)]
    folder.mkdir(parents=True, exist_ok=True)
    for number, (image_id, concepts) in enumerate(images):
        rng = np.random.default_rng([seed, number])
        render(concepts, size, rng).save(folder / f"{image_id}.png")
    return folder


def write_word_vocab(root: str | Path) -> Path:
    """root/words.txt: the demo's vocab.txt without BERT's bracketed special tokens, one word a line (what
    WordTokenizer.from_file reads)."""
    root = Path(root)
    words = [line.strip() for line in read_text(root / "vocab.txt", "vocabulary file").splitlines()]
    path = root / "words.txt"
    path.write_text("".join(f"{word}\n" for word in words if word and not word.startswith("[")), encoding="utf-8")
    return path


@command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxretrieval.data.precomp_images",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="data/precomp_demo",
                        help="the demo folder (written with seed 0 when it holds no test_ims.npy)")
    parser.add_argument("--size", type=int, default=32, help="picture side in pixels (default 32: model tiny)")
    parser.add_argument("--seed", type=int, default=0, help="background noise and jitter (default 0)")
    args = parse_command_line(parser, argv)
    root = Path(args.root)
    if not (root / "test_ims.npy").is_file():
        write_precomp_demo(root)
    folder = write_precomp_demo_images(root, args.size, args.seed)
    words = write_word_vocab(root)
    print(f"{len(list(folder.glob('*.png')))} pictures in {folder}; word vocabulary {words}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
