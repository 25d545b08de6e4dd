"""SCAN / BUTD precomputed region features (`data/{coco,f30k}_precomp/`) as SCAN, VSE++, VSE-infinity, AAHR read them.

A folder holds, for each split (`train`, `dev`, `test`, and `testall`: COCO's 5K test):
    {split}_ims.npy   float32 (N, R, D) bottom-up-attention region features (R = 36, D = 2048 in the released sets)
    {split}_caps.txt  one caption per line, the captions of each image together, in image order
    {split}_ids.txt   optional: one image id per line
The image divisor (vse_infty's `im_div`) is 5 when there are 5x as many captions as images (caption line n, from 1,
belongs to image (n - 1) // 5), 1 when the counts are equal; any other ratio is a DataError naming both counts.
The features are opened memory-mapped (`np.load(path, mmap_mode="r")`) and never read whole: `regions(i)` and
`region_batch(indices)` copy single rows out.

Records are CaptionRecords: `image` is a reference string `precomp://<absolute path of the .npy>#<image index>`
(`parse_ref` splits it), `group` the image index, `file` 0 and `line` the caption's line in `{split}_caps.txt`.
Errors name file:line; with `skip_bad` blank captions and lines that are not UTF-8 are skipped and counted (the line
still counts towards the image divisor, so the remaining captions keep their images).
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from jaxretrieval.data.sources import CaptionRecord, SkipCounts, decode_line, raw_lines, read_text
from jaxretrieval.data.wordpiece import SPECIAL_TOKENS
from jaxretrieval.errors import DataError

log = logging.getLogger(__name__)

REF_PREFIX = "precomp://"
SPLITS = ("train", "dev", "test", "testall")
PRECOMP_KINDS = ("precomp", "precomp_demo")  # data.kind values: a precomp folder, or the generated demo set


def image_ref(path: str | Path, index: int) -> str:
    """`precomp://<absolute path>#<index>`: the reference a record's `image` holds."""
    return f"{REF_PREFIX}{Path(path).absolute()}#{index}"


def parse_ref(ref: str) -> tuple[Path, int]:
    """(path of the .npy, image index) of a `precomp://` reference."""
    if not ref.startswith(REF_PREFIX) or "#" not in ref:
        raise DataError(f"not a precomp reference: {ref!r}")
    path, _, index = ref[len(REF_PREFIX):].rpartition("#")
    if not index.isdigit():
        raise DataError(f"not a precomp reference (bad index): {ref!r}")
    return Path(path), int(index)


def open_features(path: Path) -> np.memmap:
    """The (N, R, D) float array of a .npy file, memory-mapped; anything else is a DataError naming the file."""
    if not path.is_file():
        raise DataError(f"region feature file {path} does not exist")
    try:
        features = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npy array ({e})") from None
    if not isinstance(features, np.ndarray):
        raise DataError(f"{path}: expected one .npy array, got {type(features).__name__}")
    if features.ndim != 3:
        raise DataError(f"{path}: expected region features of shape (images, regions, dim), got shape "
                        f"{tuple(features.shape)}")
    if features.dtype.kind != "f":
        raise DataError(f"{path}: expected float region features, got dtype {features.dtype}")
    if not features.shape[0]:
        raise DataError(f"{path}: holds no images")
    return features


class PrecompSource:
    """One split of a precomp folder as caption records; the interface of CaptionSource (records, `images()`,
    `text_to_image()`, `group_keys()`, `where(record)`) plus `regions(i)` / `region_batch(indices)` for the features.

    `features` is the memory-mapped (N, R, D) array, `im_div` the captions per image (5 or 1), `ids` the image ids
    of `{split}_ids.txt` (None without the file).
    """

    def __init__(self, root: str | Path, split: str, *, skip_bad: bool = False):
        self.root = Path(root)
        self.split = split
        self.skip_bad = skip_bad
        self.skipped = SkipCounts()
        self.features_path = self.root / f"{split}_ims.npy"
        self.captions_path = self.root / f"{split}_caps.txt"
        self.ids_path = self.root / f"{split}_ids.txt"
        self.paths = [self.captions_path]
        self.path = self.captions_path
        if not self.captions_path.is_file():
            raise DataError(f"caption file {self.captions_path} does not exist")
        self.features = open_features(self.features_path)
        count = int(self.features.shape[0])
        lines = list(raw_lines(self.captions_path))
        self.num_lines = len(lines)  # caption lines, blank and skipped ones included
        if len(lines) == 5 * count:
            self.im_div = 5
        elif len(lines) == count:
            self.im_div = 1
        else:
            raise DataError(f"{self.captions_path} holds {len(lines)} captions for the {count} images of "
                            f"{self.features_path}: expected {count} or {5 * count}")
        self.ids = self._read_ids(count) if self.ids_path.is_file() else None
        self._refs = [image_ref(self.features_path, index) for index in range(count)]
        self.records: list[CaptionRecord] = []
        for number, raw in lines:
            where = f"{self.captions_path}:{number}"
            try:
                caption = decode_line(raw, where, first=number == 1).rstrip("\r\n")
            except DataError as e:
                self._bad("malformed_lines", e)
                continue
            if not caption.strip():
                self._bad("blank_captions", DataError(f"{where}: the caption is blank (empty or only whitespace)"))
                continue
            group = (number - 1) // self.im_div
            self.records.append(CaptionRecord(self._refs[group], caption.strip(), group, 0, number))
        if not self.records:
            raise DataError(f"{self.captions_path}: no usable captions")
        if self.skipped.total:
            log.warning("%s: skipped %d captions (%s)", self.captions_path, self.skipped.total, self.skipped)

    def _read_ids(self, count: int) -> list[str]:
        ids = read_text(self.ids_path, "image id file").splitlines()
        if len(ids) != count:
            raise DataError(f"{self.ids_path} holds {len(ids)} image ids for the {count} images of "
                            f"{self.features_path}")
        for number, value in enumerate(ids, start=1):
            if not value.strip():
                raise DataError(f"{self.ids_path}:{number}: the image id is blank")
        return [value.strip() for value in ids]

    def _bad(self, kind: str, error: DataError) -> None:
        if not self.skip_bad:
            raise error
        log.warning("skipping %s", error)
        setattr(self.skipped, kind, getattr(self.skipped, kind) + 1)

    def __getstate__(self) -> dict:
        # grain's worker processes get the source pickled: they reopen the memory map rather than copy the array
        return {**self.__dict__, "features": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.features = open_features(self.features_path)

    @property
    def num_images(self) -> int:
        return int(self.features.shape[0])

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> CaptionRecord:
        return self.records[index]

    def images(self) -> list[str]:
        """One `precomp://` reference per image, in image order (the retrieval gallery; every image, even one
        whose captions were all skipped, so group i is image i)."""
        return list(self._refs)

    def text_to_image(self) -> list[int]:
        """For every caption, the index of its image in `images()`."""
        return [record.group for record in self.records]

    def group_keys(self) -> list[str | int]:
        """The image ids of `{split}_ids.txt` (strings as written), or without it the image indices."""
        return list(self.ids) if self.ids is not None else list(range(self.num_images))

    def where(self, record: CaptionRecord) -> str:
        """`file:line` of the caption a record came from."""
        return f"{self.captions_path}:{record.line}"

    def _index(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < self.num_images:
            raise IndexError(f"image index {index} out of range for the {self.num_images} images of "
                             f"{self.features_path}")
        return index

    def regions(self, index: int) -> np.ndarray:
        """The (R, D) float32 region features of one image, copied out of the memory map."""
        return np.array(self.features[self._index(index)], dtype=np.float32)

    def region_batch(self, indices: Iterable[int]) -> np.ndarray:
        """The (len(indices), R, D) float32 region features of some images (a copy)."""
        rows = np.asarray([self._index(i) for i in indices], dtype=np.int64)
        return np.asarray(self.features[rows], dtype=np.float32).reshape(len(rows), *self.features.shape[1:])

    def __repr__(self) -> str:
        return (f"PrecompSource({self.root} {self.split}, {len(self)} captions, {self.num_images} images of "
                f"{self.features.shape[1]}x{self.features.shape[2]} regions)")


@dataclasses.dataclass(frozen=True)
class Fold:
    images: range  # image indices (groups) of the fold
    captions: range  # record indices of the fold's captions


def folds(source: PrecompSource, count: int = 5) -> list[Fold]:
    """COCO 1K x 5 protocol: `count` consecutive folds of equal image count (1000 images, 5000 captions each for
    COCO's 5K `testall`); the image count must divide by `count`."""
    if count < 1:
        raise DataError(f"the fold count must be positive, got {count}")
    images = source.num_images
    if images % count:
        raise DataError(f"{source.features_path}: {images} images do not split into {count} equal folds")
    size = images // count
    groups = source.text_to_image()  # records are in image order
    result = []
    for fold in range(count):
        start, stop = fold * size, (fold + 1) * size
        result.append(Fold(range(start, stop), range(bisect.bisect_left(groups, start),
                                                      bisect.bisect_left(groups, stop))))
    return result


# --- a generated demo set --------------------------------------------------------------------------------------

_CONCEPTS = (
    ("dog", "puppy"), ("cat", "kitten"), ("car", "automobile"), ("tree", "oak"), ("boat", "ship"),
    ("horse", "pony"), ("bicycle", "bike"), ("pizza", "pie"), ("train", "locomotive"), ("bird", "sparrow"),
    ("umbrella", "parasol"), ("clock", "watch"),
)
_TEMPLATES = (
    "a photo of a {0} and a {1}", "a {0} next to a {1}", "there is a {0} with a {1}",
    "the {1} is near the {0}", "an image showing a {0} and a {1}",
)


def _demo_split(rng: np.random.Generator, count: int, regions: int, projection: np.ndarray, centres: np.ndarray,
                noise: float) -> tuple[np.ndarray, list[str]]:
    concepts = len(centres)
    features = np.empty((count, regions, projection.shape[1]), np.float32)
    captions = []
    for image in range(count):
        pair = rng.choice(concepts, size=2, replace=False)
        # each region shows one of the two concepts or background; its feature is the concept's latent through the
        # fixed projection plus noise
        shown = rng.choice(np.concatenate([pair, [-1]]), size=regions, p=[0.4, 0.4, 0.2])
        shown[:2] = pair  # both concepts appear in at least one region
        latent = np.where(shown[:, None] >= 0, centres[np.maximum(shown, 0)], 0.0)
        latent = latent + noise * rng.standard_normal(latent.shape)
        features[image] = np.maximum(latent @ projection, 0.0)
        for _ in range(5):
            words = [_CONCEPTS[c][rng.integers(2)] for c in rng.permutation(pair)]
            captions.append(_TEMPLATES[rng.integers(len(_TEMPLATES))].format(*words))
    return features, captions


def write_precomp_demo(root: str | Path, *, seed: int = 0, images: int = 240, regions: int = 10, dim: int = 64,
                       split_sizes: Mapping[str, int] | None = None, latent: int = 16, noise: float = 0.3) -> Path:
    """A tiny precomp folder at `root` (created): `{split}_ims.npy` (N, regions, dim) float32, `{split}_caps.txt`
    (5 captions per image), `{split}_ids.txt` and `vocab.txt` (a WordPiece vocabulary: BERT's special tokens, then the
    caption words sorted).

    Each image shows two of 12 concepts; its regions are noisy `latent`-dim concept vectors through one fixed random
    (latent, dim) projection (ReLU'd like BUTD features), and its captions name the two concepts (each by one of two
    synonyms) in one of a few templates, so a model can learn to match them. `split_sizes` (image counts per split)
    defaults to train `images`, dev and test `images // 6` (at least 5). Same seed, same files.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    sizes = dict(split_sizes) if split_sizes is not None else {
        "train": images, "dev": max(images // 6, 5), "test": max(images // 6, 5)}
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((len(_CONCEPTS), latent))
    projection = rng.standard_normal((latent, dim)) / np.sqrt(latent)
    next_id = 0
    for split, count in sizes.items():
        if count < 1:
            raise DataError(f"split {split!r} needs at least one image, got {count}")
        features, captions = _demo_split(rng, count, regions, projection, centres, noise)
        np.save(root / f"{split}_ims.npy", features)
        (root / f"{split}_caps.txt").write_text("".join(f"{c}\n" for c in captions), encoding="utf-8")
        (root / f"{split}_ids.txt").write_text("".join(f"{next_id + i}\n" for i in range(count)), encoding="utf-8")
        next_id += count
    words = {word for pair in _CONCEPTS for word in pair}
    words |= {word for template in _TEMPLATES for word in template.split() if not word.startswith("{")}
    (root / "vocab.txt").write_text("".join(f"{w}\n" for w in [*SPECIAL_TOKENS, *sorted(words)]), encoding="utf-8")
    return root
