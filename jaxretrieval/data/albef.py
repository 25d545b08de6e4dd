"""ALBEF-style annotations, as CUSA reads them: one JSON array per split, one object per caption.

    [{"image_path": "pics/COCO_val2014_000000184613.jpg", "caption": "A young man ...", "image_id": "184613"}, ...]

`image_path` is relative to the root folder (by default the file's folder) or absolute; `image_id` (a string or an
int) names the image, so every caption of one image shares its group. Captions are cleaned by `pre_caption` the way
ALBEF and CUSA clean them before tokenising (and before the text teacher encodes them).

Training keeps the records in file order, with groups numbered by each image_id's first appearance. Evaluation
(`sort_by_image_id=True`) orders the gallery by sorted image_id and puts the captions of each image together, in
that order, as CUSA's test set does. Errors name `FILE record N` (N counts array items from 1) and the key.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path

from jaxretrieval.data.sources import CaptionRecord, CaptionSource, json_value, read_text
from jaxretrieval.errors import ConfigError, DataError

_PUNCTUATION = re.compile(r"[,.'!?\"()*#:;~]")
_SPACE_RUNS = re.compile(r"\s{2,}")
_KEYS: dict[str, tuple[type, ...]] = {"image_path": (str,), "caption": (str,), "image_id": (str, int)}


def pre_caption(caption: str, max_words: int = 64, where: str = "caption") -> str:
    """ALBEF's caption cleaning: lower case; , . ' ! ? " ( ) * # : ; ~ - / become spaces; '<person>' becomes
    'person'; runs of two or more whitespace characters become one space; surrounding spaces (and a final newline)
    are stripped; at most `max_words` space-separated words are kept. As in the original, a lone tab or newline
    between words is kept as it is. A caption left empty is a DataError naming `where`."""
    text = _PUNCTUATION.sub(" ", caption.lower())
    text = text.replace("-", " ").replace("/", " ").replace("<person>", "person")
    text = _SPACE_RUNS.sub(" ", text).rstrip("\n").strip(" ")
    words = text.split(" ")
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    if not text:
        raise DataError(f"{where} is empty once cleaned (lower case, punctuation removed): {caption!r}")
    return text


def read_json_array(path: Path, what: str = '{"image_path", "caption", "image_id"} objects') -> list:
    """The items of a UTF-8 JSON file holding one array (a byte-order mark allowed) of `what`; anything else is a
    DataError naming the file."""
    items = json_value(read_text(path), str(path), position=True)
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON array of {what}, got a {type(items).__name__}")
    return items


def check_record(item: object, where: str) -> dict:
    """One array item: an object with every key of its type (bool is not an int); errors name `where` and the key."""
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(item).__name__}")
    for key, types in _KEYS.items():
        if key not in item:
            raise DataError(f"{where}: missing key '{key}'")
        value = item[key]
        if not isinstance(value, types) or isinstance(value, bool):
            raise DataError(f"{where}: key '{key}' has the wrong type ({type(value).__name__})")
    if not item["image_path"].strip():
        raise DataError(f"{where}: key 'image_path' is blank")
    return item


def _image_id_order(key: str | int) -> tuple[bool, str | int]:
    """Sort key: int ids numerically, then string ids in string order (CUSA's sorted() of one kind)."""
    return isinstance(key, str), key


class AlbefCaptionSource(CaptionSource):
    """Caption records of ALBEF/CUSA JSON array files (one or a list); the interface of CaptionSource.

    `image_ids[group]` is the image_id (as a string) of a group: the key of its image teacher feature. With
    `clean_captions` every caption is `pre_caption`'d (to `max_words` words); a caption that cleans to nothing is
    counted as blank when skipping.
    """

    def __init__(self, annotation_file: str | Path | Sequence[str | Path], root: str | Path | None = None, *,
                 skip_bad: bool = False, check_images: bool = True, clean_captions: bool = True,
                 max_words: int = 64, sort_by_image_id: bool = False):
        if max_words < 1:
            raise ConfigError(f"max_words must be at least 1, got {max_words}")
        self.clean_captions = clean_captions
        self.max_words = max_words
        self.sort_by_image_id = sort_by_image_id
        self.image_ids: list[str] = []
        super().__init__(annotation_file, root, skip_bad=skip_bad, check_images=check_images)
        if sort_by_image_id:
            self._sort_groups()

    def _read(self, file: int, path: Path) -> None:
        for number, item in enumerate(read_json_array(path), start=1):
            where = f"{path} record {number}"
            try:
                check_record(item, where)
            except DataError as e:
                self._bad("malformed_lines", e)
                continue
            image = self.root / item["image_path"]
            if self.check_images and not image.is_file():
                self._bad("missing_images", DataError(f"{where}: key 'image_path': image file {image} does not "
                                                      f"exist"))
                continue
            caption = self._clean(item["caption"], f"{where}: key 'caption'")
            if caption is None:
                continue
            key = item["image_id"]
            if key not in self._groups:
                self._groups[key] = len(self._groups)
                self.image_ids.append(str(key))
            self.records.append(CaptionRecord(str(image), caption, self._groups[key], file, number))

    def _clean(self, caption: str, what: str) -> str | None:
        """The caption as training sees it, or None when it is blank (raised unless skipping)."""
        if not self._usable_captions([caption], what):
            return None
        if not self.clean_captions:
            return caption
        try:
            return pre_caption(caption, self.max_words, what)
        except DataError as e:
            self._bad("blank_captions", e)
            return None

    def _sort_groups(self) -> None:
        """Renumbers the groups in sorted image_id order and puts each image's captions together (stable: they keep
        their file order)."""
        keys = sorted(self._groups, key=_image_id_order)
        new_group = {self._groups[key]: index for index, key in enumerate(keys)}
        moved = (dataclasses.replace(record, group=new_group[record.group]) for record in self.records)
        self.records = sorted(moved, key=lambda record: record.group)
        self._groups = {key: index for index, key in enumerate(keys)}
        self.image_ids = [str(key) for key in keys]

    def image_id(self, record: CaptionRecord) -> str:
        """The image_id of a record's image (as a string)."""
        return self.image_ids[record.group]

    def where(self, record: CaptionRecord) -> str:
        """`FILE record N` of the annotation a record came from."""
        return f"{self.paths[record.file]} record {record.line}"

    def __repr__(self) -> str:
        more = f" (and {len(self.paths) - 1} more files)" if len(self.paths) > 1 else ""
        return f"AlbefCaptionSource({self.path}{more}, {len(self)} captions, {len(self.image_ids)} images)"
