"""open_clip's CSV / TSV captions (`--dataset-type csv`): a header row, then one image and one caption per row.

    filepath<TAB>title
    images/0001.jpg<TAB>A dog on a beach
    images/0002.jpg<TAB>"A quoted caption: a <TAB> or a line break inside is text, and "" is one quote"

open_clip reads these with `pandas.read_csv(file, sep=sep)` and takes the `img_key` column (default `filepath`) as
the image path and the `caption_key` column (default `title`) as the caption, `str()`'d; its separator defaults to a
tab. Here the csv module reads them the same way without pandas: any one-character separator, fields quoted with
`"` (a doubled `""` inside is one quote) may hold the separator or newlines, blank lines are skipped, and the first
non-blank row is the header. Image paths are relative to `root` (by default the file's folder) unless absolute.
Captions of one image path share a group, or, with `group_key`, the rows of one value of that column.

Files are UTF-8 (a byte-order mark allowed). Every error names file:line (the row's first line) and the column.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from pathlib import Path

from jaxretrieval.data.sources import CaptionRecord, CaptionSource, decode_line, raw_lines
from jaxretrieval.errors import ConfigError, DataError

# Spellings of a tab that a YAML file or a command line passes through as two characters.
_TAB_NAMES = ("\\t", "tab", "TAB")


def csv_separator(value: str) -> str:
    """The separator `value` names: one character (not a quote or a line break), or `\\t` / `tab` for a tab."""
    separator = "\t" if value in _TAB_NAMES else value
    if len(separator) != 1 or separator in "\"\r\n":
        raise ConfigError(f"the CSV separator must be one character other than a quote or a line break (or \\t "
                          f"for a tab), got {value!r}")
    return separator


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


class CsvCaptionSource(CaptionSource):
    """Caption records of open_clip-style CSV / TSV files (one or a list); the interface of CaptionSource.

    `img_key` and `caption_key` name the image path and caption columns, `group_key` (optional) a column whose
    value groups captions (without it, the image path as written does); `separator` is one character, `\\t` or
    `tab`. A row whose number of fields differs from the header's, or whose image path or group is blank, is
    malformed; with `skip_bad` bad rows are skipped and counted (see CaptionSource).
    """

    def __init__(self, annotation_file: str | Path | Sequence[str | Path], root: str | Path | None = None, *,
                 img_key: str = "filepath", caption_key: str = "title", group_key: str | None = None,
                 separator: str = "\t", skip_bad: bool = False, check_images: bool = True):
        self.separator = csv_separator(separator)
        self.img_key, self.caption_key, self.group_key = img_key, caption_key, group_key or None
        super().__init__(annotation_file, root, skip_bad=skip_bad, check_images=check_images)

    def _lines(self, path: Path) -> Iterator[str]:
        """The decoded lines of a file; with skip_bad a line that is not UTF-8 is counted and read as blank (so the
        csv reader's line count stays the file's)."""
        for number, raw in raw_lines(path):
            try:
                yield decode_line(raw, f"{path}:{number}", first=number == 1)
            except DataError as e:
                self._bad("malformed_lines", e)
                yield "\n"

    def _rows(self, path: Path) -> Iterator[tuple[int, list[str]]]:
        """(first line, fields) of every non-blank row; a row the csv module cannot parse is a malformed line."""
        # strict: a quote left open runs to the end of the file or to a quote followed by other text; both are
        # errors rather than rows that silently swallow the lines after them.
        reader = csv.reader(self._lines(path), delimiter=self.separator, quotechar='"', strict=True)
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                self._bad("malformed_lines", DataError(f"{path}:{start}: not a valid CSV row ({e})"))
                continue
            if row:
                yield start, row

    def _columns(self, path: Path, line: int, header: list[str]) -> dict[str, int]:
        """The index of every column this source reads; a column missing from the header is a DataError."""
        wanted = [self.img_key, self.caption_key] + ([self.group_key] if self.group_key else [])
        found = ", ".join(repr(name) for name in header)
        columns = {}
        for key in wanted:
            if key not in header:
                hint = f"; one column: is the separator {self.separator!r} right?" if len(header) == 1 else ""
                raise DataError(f"{path}:{line}: the header has no column '{key}' (its columns: {found}){hint}")
            if header.count(key) > 1:
                raise DataError(f"{path}:{line}: the header has column '{key}' {header.count(key)} times")
            columns[key] = header.index(key)
        return columns

    def _read(self, file: int, path: Path) -> None:
        rows = self._rows(path)
        first = next(rows, None)
        if first is None:
            raise DataError(f"{path}: no header row (an open_clip CSV starts with one naming its columns)")
        line, header = first
        columns = self._columns(path, line, header)
        for number, row in rows:
            where = f"{path}:{number}"
            try:
                image_path, group = self._fields(row, header, columns, where)
            except DataError as e:
                self._bad("malformed_lines", e)
                continue
            image = self.root / image_path
            if self.check_images and not image.is_file():
                self._bad("missing_images", DataError(f"{where}: column '{self.img_key}': image file {image} does "
                                                      f"not exist"))
                continue
            caption = row[columns[self.caption_key]]
            if self._usable_captions([caption], f"{where}: column '{self.caption_key}'"):
                index = self._groups.setdefault(group, len(self._groups))
                self.records.append(CaptionRecord(str(image), caption, index, file, number))

    def _fields(self, row: list[str], header: list[str], columns: dict[str, int], where: str) -> tuple[str, str]:
        """(image path, group key) of a row whose field count matches the header's."""
        if len(row) < len(header):
            raise DataError(f"{where}: {_plural(len(row), 'field')} where the header has {len(header)} (column "
                            f"'{header[len(row)]}' is missing)")
        if len(row) > len(header):
            raise DataError(f"{where}: {_plural(len(row), 'field')} where the header has {len(header)} (a field "
                            f"holding the separator {self.separator!r} must be quoted)")
        image = row[columns[self.img_key]]
        if not image.strip():
            raise DataError(f"{where}: column '{self.img_key}' is blank")
        if not self.group_key:
            return image, image
        group = row[columns[self.group_key]]
        if not group.strip():
            raise DataError(f"{where}: column '{self.group_key}' is blank")
        return image, group

    def __repr__(self) -> str:
        more = f" (and {len(self.paths) - 1} more files)" if len(self.paths) > 1 else ""
        return f"CsvCaptionSource({self.path}{more}, {len(self)} captions, {len(self._groups)} groups)"
