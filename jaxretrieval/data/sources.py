"""Random-access sources: one reader per annotation format.

A caption source is a list of (image path, caption, group id) records read from JSON-lines files of
`{"image": path relative to root, "caption": text, "image_id": any JSON scalar}`. Group ids are mapped to
dense ints so that captions of one image are positives of each other in the contrastive loss.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad input data: the message names the file, the line or the key."""


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


def _parse_json_line(text: str, where: str) -> dict:
    try:
        item = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(item).__name__}")
    for key, types in (("image", str), ("caption", str), ("image_id", (str, int))):
        if key not in item:
            if key == "image_id":  # optional: captions of one image path form its group
                continue
            raise DataError(f"{where}: missing key '{key}'")
        if not isinstance(item[key], types) or isinstance(item[key], bool):
            raise DataError(f"{where}: key '{key}' has the wrong type ({type(item[key]).__name__})")
    return item


def _parse_tab_line(text: str, where: str) -> dict:
    image, tab, caption = text.rstrip("\r\n").partition("\t")
    if not tab or not image.strip() or not caption.strip():
        raise DataError(f"{where}: expected 'image path<TAB>caption'")
    return {"image": image.strip(), "caption": caption.strip()}


class CaptionSource:
    """Caption records of one annotation file; usable as a grain RandomAccessDataSource.

    `.tsv` and `.txt` files hold `image path<TAB>caption` lines; any other file JSON lines.
    """

    def __init__(self, annotation_file: str | Path, root: str | Path | None = None, *, skip_bad: bool = False,
                 check_images: bool = True):
        path = Path(annotation_file)
        root = Path(root) if root is not None else path.parent
        if not path.is_file():
            raise DataError(f"annotation file {path} does not exist")
        self.path = path
        self.skipped = SkipCounts()
        groups: dict[str | int, int] = {}
        records = []
        parse = _parse_tab_line if path.suffix in (".tsv", ".txt") else _parse_json_line
        with path.open(encoding="utf-8") as f:
            for number, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    item = parse(text, where)
                    image = root / item["image"]
                    if check_images and not image.is_file():
                        raise DataError(f"{where}: image file {image} does not exist")
                except DataError as e:
                    if not skip_bad:
                        raise
                    log.warning("skipping %s", e)
                    missing = "does not exist" in str(e)
                    self.skipped.missing_images += int(missing)
                    self.skipped.malformed_lines += int(not missing)
                    continue
                group = groups.setdefault(item.get("image_id", item["image"]), len(groups))
                records.append(CaptionRecord(str(image), item["caption"], group))
        if not records:
            raise DataError(f"{path}: no usable records")
        if self.skipped.total:
            log.warning("%s: skipped %d records (%d malformed lines, %d missing images)", path,
                        self.skipped.total, self.skipped.malformed_lines, self.skipped.missing_images)
        self.records = records

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
        return f"CaptionSource({self.path}, {len(self)} captions)"
