"""A tiny synthetic text-to-person dataset in the CUHK-PEDES layout, generated locally from a seed.

Each identity is a drawn person with a gender (long or short hair), a shirt colour and pattern (plain, striped,
checked) and a lower garment (trousers, shorts, skirt) and its colour; no two identities share all five. Every
image varies in position, lighting, background and noise; every caption names the same attributes in words, in
several phrasings, with the capitals and punctuation real captions have. Train, val and test identities are
disjoint. The result is `root/reid_raw.json` (ids from 1, as CUHK-PEDES), `root/imgs/demo/*.png` and a WordPiece
`root/vocab.txt` covering the captions, read by
`jaxretrieval.data.pedes.cuhk_pedes(root, split)`.
"""

from __future__ import annotations

import json
import os
import shutil
import string
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from jaxretrieval.data.demo import install, sibling
from jaxretrieval.data.tokenizers import split_words

FORMAT_VERSION = 2  # 2: a WordPiece vocab.txt beside the annotations
METADATA_FILE = "pedes_demo.json"
ANNOTATION_FILE = "reid_raw.json"
VOCAB_FILE = "vocab.txt"
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
IMAGE_FOLDER = "demo"  # under imgs/, as CUHK-PEDES's CUHK01, CUHK03, Market, ...
SPLITS = ("train", "val", "test")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 30, 30), "orange": (240, 130, 20), "yellow": (230, 210, 40), "green": (40, 150, 60),
    "blue": (40, 80, 200), "purple": (130, 50, 170), "pink": (240, 140, 180), "white": (235, 235, 235),
    "black": (25, 25, 25), "grey": (128, 128, 128), "brown": (120, 75, 35),
}
LIGHT = ("white", "yellow", "pink")  # patterns on these are drawn in black, on the others in white
GENDERS = ("man", "woman")
PATTERNS = ("plain", "striped", "checked")
LOWER = ("trousers", "shorts", "skirt")
SKIN = ((241, 194, 167), (224, 172, 105), (198, 134, 66), (141, 85, 36))
HAIR = ((20, 16, 14), (70, 45, 25), (140, 100, 50))

SUBJECTS = {"man": ("A man", "The man", "A young man", "This man"),
            "woman": ("A woman", "The woman", "A young woman", "This lady")}
PRONOUNS = {"man": "He", "woman": "She"}
TEMPLATES = (
    "{subject} wearing {shirt} and {lower}.",
    "{subject} in {shirt}, with {lower}.",
    "{subject} is walking. {pronoun} wears {shirt} and {lower}.",
    "The person has {shirt} on; {pronoun_lower} is also wearing {lower}.",
    "{subject} dressed in {lower} and {shirt}!",
    "{pronoun} has on {shirt}, and {lower}. {pronoun} is walking forward.",
)
SHIRT_NOUNS = ("shirt", "top", "t-shirt")


def caption_vocabulary() -> list[str]:
    """Every word a demo caption can contain (as `split_words` splits it), sorted."""
    literals = [literal for template in TEMPLATES for literal, *_ in string.Formatter().parse(template)]
    words = [*literals, *COLOURS, *PATTERNS, *LOWER, *SHIRT_NOUNS, "a pair of", *PRONOUNS.values(),
             *(subject for subjects in SUBJECTS.values() for subject in subjects)]
    return sorted({word for text in words for word in split_words(text)})


def wordpiece_vocabulary() -> list[str]:
    """A BERT-style vocabulary for the demo captions: the special tokens, every caption word, the punctuation,
    and each letter alone and as a `##` piece (so any word still tokenizes, in pieces, without [UNK])."""
    letters = list(string.ascii_lowercase)
    words = [word for word in caption_vocabulary() if word not in letters]
    return [*SPECIAL_TOKENS, *words, *string.punctuation, *string.digits, *letters, *(f"##{c}" for c in letters)]


def _identities(seed: int, count: int) -> list[dict[str, Any]]:
    """`count` identities with distinct attribute combinations (and a skin and hair colour each, not described)."""
    rng = np.random.default_rng([seed, 1])
    combos = [(g, s, p, lc, lo) for g in GENDERS for s in COLOURS for p in PATTERNS for lc in COLOURS for lo in LOWER]
    picks = rng.choice(len(combos), count, replace=False)
    people = []
    for pick in picks:
        gender, shirt, pattern, lower_colour, lower = combos[int(pick)]
        people.append({"gender": gender, "shirt": shirt, "pattern": pattern, "lower_colour": lower_colour,
                       "lower": lower, "skin": SKIN[int(rng.integers(len(SKIN)))],
                       "hair": HAIR[int(rng.integers(len(HAIR)))]})
    return people


def render_person(person: dict[str, Any], rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """One uint8 (height, width, 3) image of `person`, with per-image jitter from `rng`."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    canvas = np.broadcast_to(rng.uniform(60, 190, 3).astype(np.float32), (height, width, 3)).copy()
    canvas += (yy / height - 0.5)[..., None] * rng.uniform(-40, 40)
    span = height * rng.uniform(0.86, 0.96)
    top = (height - span) / 2 + rng.uniform(-0.03, 0.03) * height
    centre = width / 2 + rng.uniform(-0.06, 0.06) * width
    y, x = (yy - top) / span, (xx - centre) / span  # y in [0, 1] from head to feet
    skin, hair = np.array(person["skin"], np.float32), np.array(person["hair"], np.float32)
    shirt, lower = np.array(COLOURS[person["shirt"]], np.float32), np.array(COLOURS[person["lower_colour"]], np.float32)
    if person["gender"] == "woman":  # long hair, behind the shoulders
        canvas[(y >= 0.03) & (y < 0.3) & (np.abs(x) < 0.1)] = hair
    legs = (y >= 0.52) & (y < 0.94) & (np.abs(x) < 0.12) & (np.abs(x) > 0.015)
    canvas[legs] = skin
    if person["lower"] == "trousers":
        canvas[legs] = lower
    elif person["lower"] == "shorts":
        canvas[legs & (y < 0.7)] = lower
    else:
        canvas[(y >= 0.52) & (y < 0.74) & (np.abs(x) < 0.12 + (y - 0.52) * 0.35)] = lower
    canvas[(y >= 0.94) & (y <= 1.0) & (np.abs(x) < 0.12) & (np.abs(x) > 0.01)] = (30, 30, 30)
    torso = (y >= 0.17) & (y < 0.53) & (np.abs(x) < 0.13)
    mark = np.array(COLOURS["black" if person["shirt"] in LIGHT else "white"], np.float32)
    phase = rng.uniform(0, 2)
    second = {"plain": np.zeros_like(torso), "striped": ((y - 0.17) / 0.045 + phase) % 2 < 1,
              "checked": (((y - 0.17) / 0.06 + phase) // 1 + ((x + 0.13) / 0.06) // 1) % 2 < 1}[person["pattern"]]
    canvas[torso] = shirt
    canvas[torso & second] = mark
    arms = (y >= 0.18) & (y < 0.5) & (np.abs(x) >= 0.13) & (np.abs(x) < 0.18)
    canvas[arms] = skin
    canvas[arms & (y < 0.3)] = shirt
    head = ((y - 0.09) / 0.08) ** 2 + (x / 0.07) ** 2 < 1
    canvas[head] = skin
    canvas[head & (y < 0.06)] = hair
    canvas = canvas * rng.uniform(0.85, 1.15) + rng.normal(0, 4, canvas.shape)
    return np.clip(canvas, 0, 255).astype(np.uint8)


def describe(person: dict[str, Any], rng: np.random.Generator, count: int) -> list[str]:
    """`count` captions of `person` in different templates, each naming its gender, shirt colour, pattern (a plain
    shirt may go without the word), lower garment and its colour."""
    captions = []
    for template in rng.choice(len(TEMPLATES), count, replace=False):
        noun = SHIRT_NOUNS[int(rng.integers(len(SHIRT_NOUNS)))]
        kind = "" if person["pattern"] == "plain" and rng.random() < 0.5 else f"{person['pattern']} "
        shirt = f"a {person['shirt']} {kind}{noun}"
        lower = {"trousers": "{} trousers", "shorts": "{} shorts", "skirt": "a {} skirt"}[person["lower"]]
        if person["lower"] != "skirt" and rng.random() < 0.3:
            lower = "a pair of " + lower
        subjects = SUBJECTS[person["gender"]]
        pronoun = PRONOUNS[person["gender"]]
        captions.append(TEMPLATES[int(template)].format(
            subject=subjects[int(rng.integers(len(subjects)))], pronoun=pronoun, pronoun_lower=pronoun.lower(),
            shirt=shirt, lower=lower.format(person["lower_colour"])))
    return captions


def _write_dataset(directory: Path, params: dict[str, Any]) -> dict[str, dict[str, int]]:
    seed = params["seed"]
    sizes = dict(zip(SPLITS, (params["num_train_ids"], params["num_val_ids"], params["num_test_ids"]), strict=True))
    people = _identities(seed, sum(sizes.values()))
    (directory / "imgs" / IMAGE_FOLDER).mkdir(parents=True)
    records: list[dict[str, Any]] = []
    counts = {split: {"ids": size, "images": 0, "captions": 0} for split, size in sizes.items()}
    splits = [split for split, size in sizes.items() for _ in range(size)]
    for pid, (person, split) in enumerate(zip(people, splits, strict=True), start=1):
        rng = np.random.default_rng([seed, 2, pid])
        for index in range(int(rng.integers(params["min_images"], params["max_images"] + 1))):
            pixels = render_person(person, np.random.default_rng([seed, 3, pid, index]), params["height"],
                                   params["width"])
            file_path = f"{IMAGE_FOLDER}/{pid:04d}{index + 1:03d}.png"
            Image.fromarray(pixels).save(directory / "imgs" / file_path)
            captions = describe(person, np.random.default_rng([seed, 4, pid, index]), params["captions_per_image"])
            records.append({"split": split, "captions": captions, "file_path": file_path, "id": pid,
                            "processed_tokens": [split_words(caption) for caption in captions]})
            counts[split]["images"] += 1
            counts[split]["captions"] += len(captions)
    (directory / ANNOTATION_FILE).write_text(json.dumps(records) + "\n", encoding="utf-8")
    (directory / VOCAB_FILE).write_text("\n".join(wordpiece_vocabulary()) + "\n", encoding="utf-8")
    return counts


def _read_params(root: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((root / METADATA_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta.get("params") if isinstance(meta, dict) else None


def write_pedes_demo(root: str | os.PathLike[str], *, num_train_ids: int = 256, num_val_ids: int = 4,
                     num_test_ids: int = 16, min_images: int = 2, max_images: int = 4, captions_per_image: int = 2,
                     height: int = 48, width: int = 24, seed: int = 0) -> Path:
    """Writes the demo under `root` unless it is there with the same parameters; returns `root`.

    Identities get ids 1.. in split order (train, val, test), each `min_images`..`max_images` images with
    `captions_per_image` captions. Files are written to a hidden sibling folder renamed to `root` when complete
    (`pedes_demo.json`, holding the parameters and per-split counts, last).
    """
    root = Path(root)
    if min(num_train_ids, num_test_ids) < 1 or num_val_ids < 0:
        raise ValueError(f"need num_train_ids >= 1, num_val_ids >= 0 and num_test_ids >= 1, got {num_train_ids}, "
                         f"{num_val_ids} and {num_test_ids}")
    if not 1 <= min_images <= max_images:
        raise ValueError(f"need 1 <= min_images <= max_images, got {min_images} and {max_images}")
    if not 1 <= captions_per_image <= len(TEMPLATES):
        raise ValueError(f"captions_per_image must be in 1..{len(TEMPLATES)}, got {captions_per_image}")
    if height < 24 or width < 12:
        raise ValueError(f"height must be >= 24 and width >= 12, got {height} and {width}")
    params = {"format_version": FORMAT_VERSION, "num_train_ids": int(num_train_ids), "num_val_ids": int(num_val_ids),
              "num_test_ids": int(num_test_ids), "min_images": int(min_images), "max_images": int(max_images),
              "captions_per_image": int(captions_per_image), "height": int(height), "width": int(width),
              "seed": int(seed)}
    if _read_params(root) == params:
        return root
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"text-person demo root {root} exists and is not a directory")
    if root.is_dir() and any(root.iterdir()) and _read_params(root) is None:
        raise FileExistsError(f"{root} is not empty and holds no text-person demo; refusing to overwrite it")
    root.parent.mkdir(parents=True, exist_ok=True)
    staged = sibling(root, "tmp")
    staged.mkdir()
    try:
        counts = _write_dataset(staged, params)
        meta = {"params": params, "counts": counts}
        (staged / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        install(staged, root, lambda: _read_params(root) == params)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return root
