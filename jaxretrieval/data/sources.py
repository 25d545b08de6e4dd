"""Random-access sources: one reader per annotation format.

A caption source is a list of (image path, caption, group id) records read from one or more annotation files
(records concatenated in file order). Group ids are mapped to dense ints, shared across the files, so that
captions of one image are positives of each other in the contrastive loss.

JSON-lines files (any suffix but `.tsv`/`.txt`) hold one object per line:
    {"image": path relative to root, "caption": text or [text, ...], "image_id": string or int}
- `caption` as a list (PAB's labelled test file `annotation/test/pair.json`) gives one record per caption,
  all in the image's group; the list must be non-empty and hold only strings.
- `image_id` is optional: without it the image path is the group key.
- PAB's training lines (`annotation/train/pair_*.json`) carry extra keys this loss ignores: `hard_i`,
  `hard_c`, `scene` (strings) and `normal` or `anomaly` (string or bool); when given (not null) they are
  type-checked. Any other key is ignored.
`.tsv`/`.txt` files hold `image path<TAB>caption` lines.
Every error names file:line (and the key).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from jaxretrieval.errors import DataError

log = logging.getLogger(__name__)

_OPTIONAL_KEYS: dict[str, tuple[type, ...]] = {
    "hard_i": (str,), "hard_c": (str,), "scene": (str,), "normal": (str, bool), "anomaly": (str, bool),
}


@dataclasses.dataclass(frozen=True)
class CaptionRecord:
    image: str  # absolute path
    caption: str
    group: int  # dense id: every caption of one image shares it


@dataclasses.dataclass
class SkipCounts:
    malformed_lines: int = 0
    missing_images: int = 0

    @property
    def total(self) -> int:
        return self.malformed_lines + self.missing_images


def _check_type(item: dict, key: str, types: tuple[type, ...], where: str) -> None:
    value = item[key]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise DataError(f"{where}: key '{key}' has the wrong type ({type(value).__name__})")


def parse_json_object(text: str, where: str, required: dict[str, tuple[type, ...]]) -> dict:
    """One JSON-lines record: a JSON object holding every `required` key with a value of its types (bool is
    not an int here); errors name `where` (file:line) and the key."""
    try:
        item = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(item).__name__}")
    for key in required:
        if key not in item:
            raise DataError(f"{where}: missing key '{key}'")
    for key, types in required.items():
        _check_type(item, key, types, where)
    return item


def _captions(item: dict, where: str) -> list[str]:
    captions = item["caption"]
    if isinstance(captions, str):
        return [captions]
    if not captions:
        raise DataError(f"{where}: key 'caption' is an empty list")
    for index, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise DataError(f"{where}: key 'caption' item {index} has the wrong type ({type(caption).__name__})")
    return captions


def _parse_json_line(text: str, where: str) -> dict:
    item = parse_json_object(text, where, {"image": (str,), "caption": (str, list)})
    if "image_id" in item:  # optional: captions of one image path form its group
        _check_type(item, "image_id", (str, int), where)
    for key, types in _OPTIONAL_KEYS.items():
        if item.get(key) is not None:
            _check_type(item, key, types, where)
    return {"image": item["image"], "captions": _captions(item, where),
            "group": item.get("image_id", item["image"])}


def _parse_tab_line(text: str, where: str) -> dict:
    image, tab, caption = text.rstrip("\r\n").partition("\t")
    if not tab or not image.strip() or not caption.strip():
        raise DataError(f"{where}: expected 'image path<TAB>caption'")
    return {"image": image.strip(), "captions": [caption.strip()], "group": image.strip()}


def _annotation_paths(annotation_file: str | Path | Sequence[str | Path]) -> list[Path]:
    files = [annotation_file] if isinstance(annotation_file, str | os.PathLike) else list(annotation_file)
    if not files:
        raise DataError("no annotation files given")
    paths = [Path(file) for file in files]
    for path in paths:
        if not path.is_file():
            raise DataError(f"annotation file {path} does not exist")
    return paths


def _describe(paths: list[Path]) -> str:
    return str(paths[0]) if len(paths) == 1 else f"{paths[0]} (and {len(paths) - 1} more files)"


class CaptionSource:
    """Caption records of one annotation file or a list of them; usable as a grain RandomAccessDataSource.

    `root` (the folder image paths are relative to) defaults to the first file's folder.
    """

    def __init__(self, annotation_file: str | Path | Sequence[str | Path], root: str | Path | None = None, *,
                 skip_bad: bool = False, check_images: bool = True):
        self.paths = _annotation_paths(annotation_file)
        self.path = self.paths[0]
        self.root = Path(root) if root is not None else self.path.parent
        self.check_images = check_images
        self.skip_bad = skip_bad
        self.skipped = SkipCounts()
        self._groups: dict[str | int, int] = {}
        self.records: list[CaptionRecord] = []
        for path in self.paths:
            self._read(path)
        if not self.records:
            raise DataError(f"{_describe(self.paths)}: no usable records")
        if self.skipped.total:
            log.warning("%s: skipped %d records (%d malformed lines, %d missing images)", _describe(self.paths),
                        self.skipped.total, self.skipped.malformed_lines, self.skipped.missing_images)

    def _read(self, path: Path) -> None:
        parse = _parse_tab_line if path.suffix in (".tsv", ".txt") else _parse_json_line
        with path.open(encoding="utf-8") as f:
            for number, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    item = parse(text, where)
                    image = self.root / item["image"]
                    if self.check_images and not image.is_file():
                        raise DataError(f"{where}: image file {image} does not exist")
                except DataError as e:
                    if not self.skip_bad:
                        raise
                    self._count_skip(e)
                    continue
                group = self._groups.setdefault(item["group"], len(self._groups))
                self.records.extend(CaptionRecord(str(image), caption, group) for caption in item["captions"])

    def _count_skip(self, error: DataError) -> None:
        log.warning("skipping %s", error)
        missing = "does not exist" in str(error)
        self.skipped.missing_images += int(missing)
        self.skipped.malformed_lines += int(not missing)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> CaptionRecord:
        return self.records[index]

    def images(self) -> list[str]:
        """One image path per group, in group order (the retrieval gallery)."""
        first: dict[int, str] = {}
        for record in self.records:
            first.setdefault(record.group, record.image)
        return [first[g] for g in range(len(first))]

    def text_to_image(self) -> list[int]:
        """For every caption, the index of its image in `images()`."""
        return [record.group for record in self.records]

    def __repr__(self) -> str:
        return f"CaptionSource({_describe(self.paths)}, {len(self)} captions)"
