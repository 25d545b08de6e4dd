"""WebDataset tar shards as a random-access caption source.

Training reads records by index in one global shuffled order (jaxretrieval.data.order), so shards are not streamed:
construction reads each shard's tar headers once (payloads skipped; only the small caption members are read) and keeps
one CaptionRecord per sample. Samples are grouped as webdataset groups them: consecutive members sharing a key, the
path up to the first dot of the basename (`d/0001.jpg`: key `d/0001`, extension `jpg`). A sample needs an image (`jpg`,
`jpeg`, `png`, `webp`) and a caption: its `txt` member, else its `json` member's `caption` (or `text`), as img2dataset
writes them. A record's `image` is `tar://<absolute shard path>#<offset>:<size>` (`sources.image_file` opens it
for PIL); `group` is the sample index, `file` the shard index in `paths`, `line` the sample's number in its shard.

The index depends only on the shards, so `len(source)` and record i agree on every process: no per-process shard
assignment, each process reads its rows of every global batch by index. Shards must be uncompressed tars (convert
with `gzip -d shard.tar.gz`). Bad samples (no image or caption, a caption not UTF-8 / JSON / non-blank, a shard cut
off) are DataErrors naming shard and key, or with `skip_bad` dropped and counted in `skipped`.
"""

from __future__ import annotations

import glob
import itertools
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, NamedTuple

from jaxretrieval.data.sources import CaptionRecord, SkipCounts, json_value
from jaxretrieval.errors import DataError

log = logging.getLogger(__name__)

TAR_PREFIX = "tar://"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEYS = ("caption", "text")
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
_REGULAR = (b"0", b"\0", b"7")  # tar type flags of regular files
_META = re.compile(r"__[^/]*__($|/)")  # members webdataset skips
_OCTAL = re.compile(rb"[0-7]+")
_DECIMAL = re.compile(r"[0-9]+")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.-?(\d+))?$")


def _range(body: str) -> list[str] | None:
    """The numbers of `a..b[..step]`, zero-padded to the wider end when either end has a leading zero (None when
    `body` is not a range)."""
    if not (match := _RANGE.match(body)):
        return None
    left, right, step = match.groups()
    padded = any(s.lstrip("-").startswith("0") and s.lstrip("-") != "0" for s in (left, right))
    start, end, step = int(left), int(right), int(step or 1) or 1
    numbers = range(start, end + 1, step) if start <= end else range(start, end - 1, -step)
    return [f"{n:0{max(len(left), len(right)) if padded else 0}d}" for n in numbers]


def _top_level_split(body: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, char in enumerate(body):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts, start = [*parts, body[start:i]], i + 1
    return [*parts, body[start:]]


def brace_expand(pattern: str) -> list[str]:
    """Brace expansion as webdataset's braceexpand does it, in its order: `{0..3}`, `{08..10}` (zero-padded),
    `{0..10..5}`, `{x,y}` (nestable), several groups (the first varies slowest). Braces holding neither a range nor a
    comma stay literal; unbalanced braces are a DataError. No letter ranges, no backslash escapes."""
    depth, start = 0, 0
    for i, char in enumerate(pattern):
        if char == "{":
            start, depth = (i if depth == 0 else start), depth + 1
        elif char == "}" and (depth := depth - 1) == 0:
            body, tails = pattern[start + 1:i], brace_expand(pattern[i + 1:])
            options, parts = _range(body), _top_level_split(body)
            if options is None:
                options = [o for part in parts for o in brace_expand(part)] if len(parts) > 1 else \
                    [f"{{{o}}}" for o in brace_expand(body)]
            return [pattern[:start] + option + tail for option in options for tail in tails]
        if depth < 0:
            break
    if depth:
        raise DataError(f"unbalanced braces in the shard pattern '{pattern}'")
    return [pattern]


def expand_shards(pattern: str, root: str | os.PathLike | None = None) -> list[str]:
    """The shard files a webdataset pattern names, in expansion order: `::`-separated patterns, each brace-expanded,
    then globbed where it holds `*?[` (matches sorted); relative paths are under `root` when given. A pattern that
    matches no file, or a named shard that does not exist, is a DataError naming it."""
    shards: list[str] = []
    for part in filter(None, pattern.split("::")):
        for item in brace_expand(part):
            path = os.path.join(root or "", os.path.expanduser(item))
            if any(c in item for c in "*?["):
                shards.extend(matches := sorted(p for p in glob.glob(path) if os.path.isfile(p)))
                if not matches:
                    raise DataError(f"no shard matches {path} (from the shard pattern '{pattern}')")
            elif os.path.isfile(path):
                shards.append(path)
            else:
                raise DataError(f"shard {path} does not exist (from the shard pattern '{pattern}')")
    if not shards:
        raise DataError(f"the shard pattern '{pattern}' names no shard")
    if len(set(shards)) < len(shards):
        log.warning("the shard pattern '%s' names some shards more than once: their samples repeat", pattern)
    return shards


def image_ref(shard: str | os.PathLike, offset: int, size: int) -> str:
    """The reference a record carries for a member's bytes: `tar://<absolute shard path>#<offset>:<size>`."""
    return f"{TAR_PREFIX}{os.path.abspath(shard)}#{offset}:{size}"


class _Descriptors:
    """Read-only descriptors of the shards read last, shared by this process's threads (positional reads: no shared
    file position). At most `capacity` stay open; one evicted while a thread reads it is closed after that read."""

    def __init__(self, capacity: int = 64):
        self.capacity, self.lock = capacity, threading.Lock()
        self.open: OrderedDict[str, list[int]] = OrderedDict()  # path -> [descriptor, readers, evicted]

    def forget(self) -> None:
        """In a forked child: the parent's descriptors are closed here and the cache starts empty."""
        for fd, _, _ in self.open.values():
            os.close(fd)
        self.__init__(self.capacity)

    def read(self, path: str, offset: int, size: int) -> bytes:
        with self.lock:
            if (entry := self.open.get(path)) is None:
                entry = self.open[path] = [os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0)), 0, 0]
                while len(self.open) > self.capacity:
                    old = self.open.popitem(last=False)[1]
                    old[2] = 1
                    if not old[1]:
                        os.close(old[0])
            self.open.move_to_end(path)
            entry[1] += 1
        try:
            if hasattr(os, "pread"):
                return os.pread(entry[0], size, offset)
            with open(path, "rb") as f:  # no positional reads (Windows)
                f.seek(offset)
                return f.read(size)
        finally:
            with self.lock:
                entry[1] -= 1
                if entry[2] and not entry[1]:
                    os.close(entry[0])


_DESCRIPTORS = _Descriptors()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_DESCRIPTORS.forget)


def read_ref(ref: str) -> bytes:
    """The bytes an image_ref points at; a missing shard is FileNotFoundError, a short one a DataError."""
    path, _, span = ref[len(TAR_PREFIX):].rpartition("#")
    offset, _, size = span.partition(":")
    if not ref.startswith(TAR_PREFIX) or not path or not offset.isdigit() or not size.isdigit():
        raise DataError(f"'{ref}' is not a tar member reference (tar://shard#offset:size)")
    offset, size = int(offset), int(size)
    if len(data := _DESCRIPTORS.read(path, offset, size)) != size:
        raise DataError(f"{path} ends before byte {offset + size} (changed since it was indexed?)")
    return data


class _BadSample(DataError):
    """A sample `skip_bad` drops, counted under `kind` (a SkipCounts field)."""

    def __init__(self, message: str, kind: str = "malformed_lines"):
        super().__init__(message)
        self.kind = kind


class _Member(NamedTuple):
    name: str
    offset: int  # of its data in the shard
    size: int


def _split_name(name: str) -> tuple[str, str] | None:
    """(key, lower-cased extension) of a member path, as webdataset's base_plus_ext; None without a dot."""
    head, _, base = name.rpartition("/")
    key, dot, ext = base.partition(".")
    return (f"{head}/{key}" if head else key, ext.lower()) if dot and key else None


def _octal(field: bytes) -> int:
    """A tar numeric field: octal digits only, padded with spaces or NULs (no sign: int() would take one)."""
    digits = field.strip(b" \0") or b"0"
    if not _OCTAL.fullmatch(digits):
        raise ValueError(f"bad numeric field {field!r}")
    return int(digits, 8)


def _pax_size(value: str | None, size: int) -> int:
    """A pax `size` record (decimal digits) where one was given, else the header's size."""
    if value is None:
        return size
    if not _DECIMAL.fullmatch(value):
        raise ValueError(f"bad pax size {value!r}")
    return int(value)


def _header(block: bytes) -> tuple[str, int, bytes]:
    """(name, size, type flag) of a ustar / GNU / v7 header block; ValueError for a bad checksum or size."""
    if _octal(block[148:156]) != sum(block) - sum(block[148:156]) + 8 * 32:
        raise ValueError("checksum mismatch")
    size = int.from_bytes(block[125:136], "big") if block[124] & 0x80 else _octal(block[124:136])
    name = block[:100].partition(b"\0")[0]
    if block[257:265] == b"ustar\x0000" and block[345]:  # POSIX ustar: a path prefix
        name = block[345:500].partition(b"\0")[0] + b"/" + name
    return name.decode("utf-8", "replace"), size, block[156:157]


def _pax(data: bytes) -> dict[str, str]:
    """The `<length> <key>=<value>` records of a pax extended header."""
    fields, pos = {}, 0
    while pos < len(data) and data[pos]:
        space = data.index(b" ", pos)
        if (end := pos + int(data[pos:space])) <= space:
            raise ValueError("bad pax record length")
        key, _, value = data[space + 1:end - 1].partition(b"=")
        fields[key.decode()], pos = value.decode(), end
    return fields


def tar_members(f: BinaryIO, path: str | os.PathLike) -> tuple[list[_Member], tuple[str, str | None] | None]:
    """The regular members of an uncompressed tar from its headers alone (GNU long names and pax paths / sizes
    honoured, `__meta__` files left out), and where the archive is cut off: (why, the key of the sample cut, None
    when unknown), or None when it is whole."""
    length, members, offset, pending = os.fstat(f.fileno()).st_size, [], 0, {}
    while True:
        f.seek(offset)
        block = f.read(512)
        if offset == 0 and (kind := next((k for m, k in _COMPRESSED.items() if block.startswith(m)), None)):
            raise DataError(f"{path} is {kind}-compressed, which has no random access: decompress the shards "
                            f"(`{kind} -d {path}`) and name the uncompressed .tar files")
        if offset == 0 and not block:
            raise DataError(f"{path} is empty (0 bytes), not a tar archive")
        if not block.strip(b"\0"):  # the end, with or without end-of-archive blocks
            if pending:  # an extended header whose member never came
                cut = _split_name(pending.get("path", ""))
                return members, (f"the file ends after the extended header at byte {offset}", cut and cut[0])
            return members, None
        if len(block) < 512:
            name, nul, _ = block[:100].partition(b"\0")
            cut = _split_name(name.decode("utf-8", "replace")) if nul else None
            return members, (f"the file ends inside the header at byte {offset}", cut and cut[0])
        try:
            name, size, flag = _header(block)
            if flag in _REGULAR:
                name, size = pending.get("path", name), _pax_size(pending.get("size"), size)
        except ValueError:  # UnicodeDecodeError included
            if offset == 0:
                raise DataError(f"{path} is not a tar archive (no valid header at its start)") from None
            return members, (f"no valid tar header at byte {offset}", None)
        if offset + 512 + size > length:
            cut = _split_name(name) if flag in _REGULAR else None
            return members, (f"member '{name}' lacks its last {offset + 512 + size - length} bytes", cut and cut[0])
        if flag in (b"L", b"x"):  # the next member's long name, or its pax records
            f.seek(offset + 512)
            data = f.read(size)
            try:
                pending.update(_pax(data) if flag == b"x" else {"path": data.partition(b"\0")[0].decode()})
            except ValueError:
                return members, (f"bad extended header at byte {offset}", None)
        else:
            pending = {}
            if flag in _REGULAR and not _META.match(name):
                members.append(_Member(name, offset + 512, size))
        offset += 512 + (size + 511) // 512 * 512


def _group(members: list[_Member]) -> list[tuple[str, list[tuple[_Member, str]]]]:
    """Consecutive members sharing a key, as webdataset's group_by_keys: (key, [(member, extension), ...])."""
    named = [(parts, member) for member in members if (parts := _split_name(member.name))]
    return [(key, [(member, parts[1]) for parts, member in group])
            for key, group in itertools.groupby(named, key=lambda item: item[0][0])]


class WebDatasetSource:
    """One caption record per sample of a list of tar shards; a grain RandomAccessDataSource with what the pipeline
    uses of a CaptionSource (records, paths, where, images, group_keys, text_to_image, skipped).

    `shards`: a pattern for expand_shards (relative to `root`) or a list of shard paths. `caption_keys`: the keys of
    a `json` member tried for the caption when there is no `txt` member. `scan_seconds`: how long the scan took.
    """

    def __init__(self, shards: str | Sequence[str | os.PathLike], root: str | os.PathLike | None = None, *,
                 skip_bad: bool = False, caption_keys: Sequence[str] = CAPTION_KEYS):
        self.paths = [Path(file) for file in (expand_shards(shards, root) if isinstance(shards, str) else shards)]
        if not self.paths:
            raise DataError("no shards given")
        self.path, self.skip_bad, self.caption_keys = self.paths[0], skip_bad, tuple(caption_keys)
        self.skipped = SkipCounts()
        self.keys: list[str] = []  # the sample key of each group
        self.records: list[CaptionRecord] = []
        start = time.perf_counter()
        for file, path in enumerate(self.paths):
            self._scan(file, path)
        self.scan_seconds = time.perf_counter() - start
        what = f"{self.path}" + (f" (and {len(self.paths) - 1} more shards)" if len(self.paths) > 1 else "")
        if not self.records:
            raise DataError(f"{what}: no usable samples")
        if self.skipped.total:
            log.warning("%s: skipped %d samples (%s)", what, self.skipped.total, self.skipped)
        log.info("%s: %d samples indexed in %.2f s", what, len(self.records), self.scan_seconds)

    def _scan(self, file: int, path: Path) -> None:
        try:
            f = path.open("rb", buffering=0)  # unbuffered: a header read reads no payload bytes
        except OSError as e:
            raise DataError(f"cannot read shard {path} ({e.strerror or e})") from None
        with f:
            members, cut = tar_members(f, path)
            samples = _group(members)
            cut_last = cut is not None and bool(samples) and cut[1] in (None, samples[-1][0])
            for number, (key, sample) in enumerate(samples, start=1):
                try:
                    if cut_last and number == len(samples):  # it may have lost members: dropped
                        raise DataError(f"{path}: sample '{key}': the shard is cut off or corrupt ({cut[0]})")
                    self._add(file, number, key, path, f, sample)
                except DataError as e:
                    self._bad(e)
            if cut is not None and not cut_last:  # the sample cut off has no complete member
                what = f"sample '{cut[1]}'" if cut[1] else "its first sample"
                self._bad(DataError(f"{path}: {what}: the shard is cut off or corrupt ({cut[0]})"))

    def _bad(self, error: DataError) -> None:
        """Raises `error`, or with skip_bad logs it and counts it (under its `kind`, else as malformed)."""
        if not self.skip_bad:
            raise error
        log.warning("skipping %s", error)
        kind = getattr(error, "kind", "malformed_lines")
        setattr(self.skipped, kind, getattr(self.skipped, kind) + 1)

    def _add(self, file: int, number: int, key: str, path: Path, f: BinaryIO,
             sample: list[tuple[_Member, str]]) -> None:
        where, by_ext = f"{path}: sample '{key}'", {}
        for member, ext in sample:
            if ext in by_ext:
                raise DataError(f"{where}: two members with extension '{ext}'")
            by_ext[ext] = member
        if (image := next((by_ext[ext] for ext in IMAGE_EXTENSIONS if ext in by_ext), None)) is None:
            raise _BadSample(f"{where}: no image member ({', '.join(IMAGE_EXTENSIONS)}); it has {sorted(by_ext)}",
                             "missing_images")
        if not (caption := self._caption(where, f, by_ext)):
            raise _BadSample(f"{where}: the caption is blank (empty or only whitespace)", "blank_captions")
        self.records.append(CaptionRecord(image_ref(path, image.offset, image.size), caption, len(self.keys), file,
                                          number))
        self.keys.append(key)

    def _caption(self, where: str, f: BinaryIO, by_ext: dict[str, _Member]) -> str:
        if (member := by_ext.get("txt") or by_ext.get("json")) is None:
            raise DataError(f"{where}: no caption member (txt or json)")
        f.seek(member.offset)
        try:
            text = f.read(member.size).decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: member '{member.name}' is not valid UTF-8 text (byte {e.start + 1})") from None
        if "txt" in by_ext:
            return text.strip()
        item = json_value(text, f"{where}: member '{member.name}'")
        found = next((item[k] for k in self.caption_keys if isinstance(item, dict) and isinstance(item.get(k), str)),
                     None)
        if found is None:
            raise DataError(f"{where}: member '{member.name}' has no string caption under {list(self.caption_keys)}")
        return found.strip()

    def where(self, record: CaptionRecord) -> str:
        """`shard:key` of the sample a record came from."""
        return f"{self.paths[record.file]}:{self.keys[record.group]}"

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> CaptionRecord:
        return self.records[index]

    def images(self) -> list[str]:
        """One image reference per group (sample), in group order (the retrieval gallery)."""
        return [record.image for record in self.records]

    def group_keys(self) -> list[str]:
        """The webdataset key of every sample, in group order."""
        return list(self.keys)

    def text_to_image(self) -> list[int]:
        """For every caption, the index of its image in `images()`: each sample is its own group."""
        return [record.group for record in self.records]

    def __repr__(self) -> str:
        return f"WebDatasetSource({self.path}, {len(self.paths)} shards, {len(self)} samples)"
