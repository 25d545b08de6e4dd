"""Stand-in teacher features for the demo dataset, so CUSA's soft-label losses run on a CPU with nothing downloaded.

An image's teacher feature describes its scene (re-drawn from the demo's seed): per object the colour, shape, size,
row and column, as indicator counts; a caption's describes the attribute words it uses (synonyms merged). Both go
through one fixed random projection with a little noise, so images and captions that share attributes are similar,
as a real teacher's features of similar scenes and sentences are.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jaxretrieval.data.demo import COLORS, METADATA_FILE, SHAPES, SPLITS, sample_scene
from jaxretrieval.data.teacher_features import save_teachers
from jaxretrieval.data.tokenizers import split_words

IMAGE_FILE = "teachers_image.npz"
TEXT_FILE = "teachers_text.npz"
DIM = 48
_WORDS = {**{color: f"color:{color}" for color in COLORS}, **{shape: f"shape:{shape}" for shape in SHAPES},
          "small": "size:small", "tiny": "size:small", "large": "size:large", "big": "size:large",
          "top": "row:0", "upper": "row:0", "bottom": "row:2", "lower": "row:2", "left": "col:0", "right": "col:2",
          "center": "cell:center", "middle": "cell:center"}
_ATTRIBUTES = sorted(set(_WORDS.values()) | {"row:1", "col:1"})


def _projection(seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 7]).normal(size=(len(_ATTRIBUTES), DIM)).astype(np.float32)


def _indicators(attributes: list[str]) -> np.ndarray:
    counts = np.zeros(len(_ATTRIBUTES), np.float32)
    for attribute in attributes:
        counts[_ATTRIBUTES.index(attribute)] += 1
    return counts


def _scene_attributes(params: dict, split: str, index: int) -> list[str]:
    rng = np.random.default_rng([params["seed"], SPLITS.index(split), index])
    attributes = []
    for o in sample_scene(rng, params["image_size"]):
        attributes += [f"color:{o.color}", f"shape:{o.shape}", f"size:{o.size}", f"row:{o.row}", f"col:{o.col}"]
        attributes += ["cell:center"] if (o.row, o.col) == (1, 1) else []
    return attributes


def write_demo_teachers(root: str | Path) -> tuple[Path, Path]:
    """Writes IMAGE_FILE (one feature per image_id) and TEXT_FILE (one per caption) into the demo folder `root`,
    unless they are there; returns their paths."""
    root = Path(root)
    image_path, text_path = root / IMAGE_FILE, root / TEXT_FILE
    if image_path.is_file() and text_path.is_file():
        return image_path, text_path
    params = json.loads((root / METADATA_FILE).read_text())
    projection = _projection(params["seed"])
    noise = np.random.default_rng([params["seed"], 8])
    image_ids, captions = {}, {}
    first_id = 0
    for split in SPLITS:
        for index in range(params[f"num_{split}"]):
            image_ids[str(first_id + index)] = _indicators(_scene_attributes(params, split, index))
        first_id += params[f"num_{split}"]
        for line in (root / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            caption = json.loads(line)["caption"]
            captions[caption] = _indicators([_WORDS[w] for w in split_words(caption) if w in _WORDS])

    def features(table: dict[str, np.ndarray]) -> np.ndarray:
        x = np.stack(list(table.values())) @ projection
        return x + 0.1 * noise.normal(size=x.shape).astype(np.float32)

    save_teachers(image_path, list(image_ids), features(image_ids))
    save_teachers(text_path, list(captions), features(captions))
    return image_path, text_path
