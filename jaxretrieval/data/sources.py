"""Random-access sources: one reader per annotation format.

A caption source is a list of (image path, caption, group id) records read from one or more annotation files
(records concatenated in file order). Group ids are mapped to dense ints, shared across the files, so that
captions of one image are positives of each other in the contrastive loss.

JSON-lines files (any suffix but `.tsv`/`.txt`) hold one object per line:
    {"image": path relative to root, "caption": text or [text, ...], "image_id": string or int}
- `caption` as a list (PAB's labelled test file `annotation/test/pair.json`) gives one record per caption,
  all in the image's group; the list must be non-empty and hold only strings.
- A blank caption (empty or only whitespace, alone or as a list item) is an error; when skipping bad records it
  is dropped and counted (a line left without captions gives no record).
- `image_id` is optional: without it the image path is the group key.
- PAB's training lines (`annotation/train/pair_*.json`) carry extra keys this loss ignores: `hard_i`,
  `hard_c`, `scene` (strings) and `normal` or `anomaly` (string or bool); when given (not null) they are
  type-checked. Any other key is ignored.
`.tsv`/`.txt` files hold `image path<TAB>caption` lines.
Files are UTF-8 (a byte-order mark is allowed). Every error names file:line (and the key), and every record
keeps the file and line it came from, so errors found later (an image that does not decode) name them too.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from jaxretrieval.errors import DataError

log = logging.getLogger(__name__)

_OPTIONAL_KEYS: dict[str, tuple[type, ...]] = {
    "hard_i": (str,), "hard_c": (str,), "scene": (str,), "normal": (str, bool), "anomaly": (str, bool),
}


@dataclasses.dataclass(frozen=True, slots=True)  # slots: millions of them sit in memory
class CaptionRecord:
    image: str  # absolute path
    caption: str
    group: int  # dense id: every caption of one image shares it
    file: int = 0  # index of the annotation file in its source's `paths`
    line: int = 0  # 1-based line in that file; 0: not from a file


@dataclasses.dataclass
class SkipCounts:
    malformed_lines: int = 0
    missing_images: int = 0
    blank_captions: int = 0

    @property
    def total(self) -> int:
        return self.malformed_lines + self.missing_images + self.blank_captions

    def __str__(self) -> str:
        return (f"{self.malformed_lines} malformed lines, {self.missing_images} missing images, "
                f"{self.blank_captions} blank captions")


def _check_type(item: dict, key: str, types: tuple[type, ...], where: str) -> None:
    value = item[key]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise DataError(f"{where}: key '{key}' has the wrong type ({type(value).__name__})")


def json_value(text: str, where: str, *, position: bool = False) -> object:
    """The JSON value in `text`; malformed JSON is a DataError naming `where` (and the line and column of a
    multi-line file with `position`)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = f" at line {e.lineno} column {e.colno}" if position else ""
        raise DataError(f"{where}: not valid JSON ({e.msg}{at})") from None
    except ValueError as e:  # an integer of more digits than Python converts
        raise DataError(f"{where}: not valid JSON ({e})") from None
    except RecursionError:
        raise DataError(f"{where}: not valid JSON (nested too deeply)") from None


def read_text(path: Path, what: str = "") -> str:
    """The text of a UTF-8 file (a byte-order mark allowed); an unreadable file or bad bytes are a DataError naming the
    file (`what` says what it is: "cannot read synonym table PATH")."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {what + ' ' if what else ''}{path} ({e.strerror or e})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 text (byte {e.start + 1})") from None


def image_file(path: str) -> str | io.BytesIO:
    """What `PIL.Image.open` should open for a record's image: a file path itself, or the bytes a `tar://`
    (webdataset) or `tfds://` (TFDS) record reference points at."""
    if path.startswith("tar://"):
        from jaxretrieval.data import webdataset

        return io.BytesIO(webdataset.read_ref(path))
    if path.startswith("tfds://"):
        from jaxretrieval.data import tfds_source

        return io.BytesIO(tfds_source.read_ref(path))
    return path


def json_field(item: dict, key: str, types: tuple[type, ...], where: str) -> Any:
    """item[key], which must be present and of `types` (bool is not an int here); errors name `where` and the key."""
    if key not in item:
        raise DataError(f"{where}: missing key '{key}'")
    value = item[key]
    if not isinstance(value, types) or isinstance(value, bool):
        raise DataError(f"{where}: key '{key}' has the wrong type ({type(value).__name__})")
    return value


def parse_json_object(text: str, where: str, required: dict[str, tuple[type, ...]]) -> dict:
    """One JSON-lines record: a JSON object holding every `required` key with a value of its types (bool is
    not an int here); errors name `where` (file:line) and the key."""
    item = json_value(text, where)
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
            "group": item.get("image_id", item["image"]), "field": "key 'caption'"}


def _parse_tab_line(text: str, where: str) -> dict:
    image, tab, caption = text.rstrip("\r\n").partition("\t")
    if not tab or not image.strip():
        raise DataError(f"{where}: expected 'image path<TAB>caption'")
    return {"image": image.strip(), "captions": [caption.strip()], "group": image.strip(), "field": "the caption"}


def decode_line(raw: bytes, where: str, first: bool = False) -> str:
    """One line of a UTF-8 text file (a byte-order mark allowed on the first); bad bytes are a DataError."""
    try:
        return raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not valid UTF-8 text (byte {e.start + 1} of the line)") from None


def raw_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, bytes) of every line of a file; a file that cannot be opened is a DataError."""
    try:
        f = path.open("rb")
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror or e})") from None
    with f:
        yield from enumerate(f, start=1)


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
        for file, path in enumerate(self.paths):
            self._read(file, path)
        if not self.records:
            raise DataError(f"{_describe(self.paths)}: no usable records")
        if self.skipped.total:
            log.warning("%s: skipped %d records (%s)", _describe(self.paths), self.skipped.total, self.skipped)

    def _read(self, file: int, path: Path) -> None:
        parse = _parse_tab_line if path.suffix in (".tsv", ".txt") else _parse_json_line
        for number, raw in raw_lines(path):
            where = f"{path}:{number}"
            try:
                text = decode_line(raw, where, first=number == 1)
                item = parse(text, where) if text.strip() else None
            except DataError as e:
                self._bad("malformed_lines", e)
                continue
            if item is None:
                continue
            image = self.root / item["image"]
            if self.check_images and not image.is_file():
                self._bad("missing_images", DataError(f"{where}: image file {image} does not exist"))
                continue
            captions = self._usable_captions(item["captions"], f"{where}: {item['field']}")
            if captions:
                group = self._groups.setdefault(item["group"], len(self._groups))
                self.records.extend(CaptionRecord(str(image), caption, group, file, number) for caption in captions)

    def _usable_captions(self, captions: list[str], what: str) -> list[str]:
        """The captions that are not blank; each blank one is an error, or counted when skipping."""
        usable = []
        for index, caption in enumerate(captions):
            if caption.strip():
                usable.append(caption)
            else:
                item = f" item {index}" if len(captions) > 1 else ""
                self._bad("blank_captions", DataError(f"{what}{item} is blank (empty or only whitespace)"))
        return usable

    def _bad(self, kind: str, error: DataError) -> None:
        """Raises `error`, or with skip_bad logs it and counts it under `kind` (a SkipCounts field)."""
        if not self.skip_bad:
            raise error
        log.warning("skipping %s", error)
        setattr(self.skipped, kind, getattr(self.skipped, kind) + 1)

    def where(self, record: CaptionRecord) -> str:
        """`file:line` of the annotation a record came from."""
        return f"{self.paths[record.file]}:{record.line}"

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

    def group_keys(self) -> list[str | int]:
        """The key of every group (its image_id, or image path without one), in group order."""
        return list(self._groups)

    def text_to_image(self) -> list[int]:
        """For every caption, the index of its image in `images()`."""
        return [record.group for record in self.records]

    def __repr__(self) -> str:
        return f"CaptionSource({_describe(self.paths)}, {len(self)} captions)"
