"""Property-based fuzzing of the readers of the data sources users hold: open_clip CSV / TSV captions
(csv_source), Karpathy's COCO / Flickr30k split JSON (karpathy), webdataset tar shards and their brace-expanded
shard patterns (webdataset), and the decoded examples of a prepared TFDS dataset (tfds_source.parse_example).

Each property: the call returns normally and what it returns is well-formed (captions non-blank, dense groups,
every record naming the file and line / entry / sample it came from, image references that read back the image's
bytes), or it raises DataError whose message names the file (and the line, entry or sample where there is one) --
never a raw JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, IndexError, ValueError, OSError or csv /
tarfile error, and never a reader that stops making progress. Round-trip properties write well-formed inputs with
the standard library (csv, json, tarfile) and read them back exactly.
Run with `--hypothesis-show-statistics` to see how many cases each property ran.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import itertools
import json
import os
import re
import signal
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from fuzzing import fuzz
from hypothesis import event, given
from hypothesis import strategies as st

from jaxretrieval.data.csv_source import CsvCaptionSource
from jaxretrieval.data.karpathy import KarpathyCaptionSource
from jaxretrieval.data.sources import DataError, image_file
from jaxretrieval.data.tfds_source import feature, parse_example
from jaxretrieval.data.webdataset import IMAGE_EXTENSIONS, WebDatasetSource, brace_expand, tar_members
from jaxretrieval.errors import ConfigError


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz-sources")


@pytest.fixture(scope="module")
def image_root(scratch) -> Path:
    """Image files some fuzzed annotations name (the readers only check that they exist)."""
    root = scratch / "images"
    (root / "val2014").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg", "val2014/a.jpg"):
        (root / name).write_bytes(b"\xff\xd8not decoded here")
    return root


def with_tail(path: Path | str, message: str) -> str:
    """The part of `message` after `path`; fails if the message does not name the path."""
    assert str(path) in message, f"message does not name {path}: {message!r}"
    return message.split(str(path), 1)[1]


@contextlib.contextmanager
def no_hang(seconds: float = 20.0):
    """A reader that stops making progress fails the property (TimeoutError) instead of hanging the suite."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise TimeoutError(f"the reader ran for more than {seconds} s (looping?)")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------------------------------------------------
# Shared strategies


def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """st.one_of with weights (one_of drops a strategy given twice): each strategy drawn in proportion to its
    weight, so that inputs a reader accepts come often enough to check what it returns."""
    return st.sampled_from([strategy for weight, strategy in choices for _ in range(weight)]).flatmap(lambda s: s)


plain_text = st.text(max_size=12)
no_surrogates = st.characters(exclude_categories=("Cs",))
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-10**30, 10**30),
                         st.floats(allow_nan=False, allow_infinity=False),
                         st.sampled_from(["", " ", "train", "val", "test", "restval", "a.jpg", "\ud800"]), plain_text)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3) |
                           st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
nonblank_text = st.text(no_surrogates, min_size=1, max_size=12).filter(str.strip)
BAD_UTF8 = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80"]


def insert_bytes(data: bytes, position: int, insert: bytes) -> bytes:
    position %= len(data) + 1
    return data[:position] + insert + data[position:]


# ---------------------------------------------------------------------------------------------------------------
# open_clip CSV / TSV captions

TAB_NAMES = {"\\t": "\t", "tab": "\t", "TAB": "\t"}
GOOD_SEPARATORS = ["\t", ",", ";", "|", " ", "a", "\x00", "é", "\u2028", *TAB_NAMES]
BAD_SEPARATORS = ["", ",,", '"', "\n", "\r", "\\n", "tabs"]
CSV_FIELDS = ["", " ", "a.jpg", "b.jpg", "val2014/a.jpg", "missing.jpg", "/nowhere/c.jpg", '"', '""', '"a"', '"a',
              'a"b', '"a""b"', '"a"b', "x,y", "x\ty", "x;y", "x\ny", '"x\ny"', "x\r", "\ufeff", "é", "\x00", "  \t"]
HEADER_NAMES = ["filepath", "title", "group", "other", "", "Filepath", "title "]
csv_field = st.one_of(st.sampled_from(CSV_FIELDS), st.text(max_size=8))


def _csv_text(rows: list[list[str]], separator: str, quoting: int, terminator: str) -> str:
    buffer = io.StringIO(newline="")
    csv.writer(buffer, delimiter=separator, quotechar='"', quoting=quoting, lineterminator=terminator).writerows(rows)
    return buffer.getvalue()


@st.composite
def csv_files(draw) -> tuple[bytes, str, str | None]:
    """(file content, separator option, group_key): a header and rows, some written properly by the csv module,
    some joined by hand (unbalanced quotes, a wrong separator, the wrong number of fields), with blank lines, a
    byte-order mark and bytes that are not UTF-8."""
    option = draw(st.sampled_from(GOOD_SEPARATORS))
    separator = TAB_NAMES.get(option, option)
    group_key = draw(st.sampled_from([None, None, "group"]))
    header = draw(weighted((1, st.permutations(["filepath", "title", "group", "other"])),
                           (2, st.permutations(["filepath", "title", "group"])),
                           (2, st.permutations(["filepath", "title"])),
                           (1, st.lists(st.one_of(st.sampled_from(HEADER_NAMES), st.text(max_size=6)), max_size=4))))
    terminator = draw(st.sampled_from(["\n", "\r\n"]))
    in_order = lambda row: [row.get(name, "x") for name in header]
    valid_row = st.fixed_dictionaries({
        "filepath": st.sampled_from(["a.jpg", "b.jpg", "val2014/a.jpg"]), "title": nonblank_text,
        "group": st.sampled_from(["1", "2"]), "other": csv_field}).map(in_order)
    mixed_row = st.fixed_dictionaries({
        "filepath": weighted((3, st.sampled_from(["a.jpg", "b.jpg", "val2014/a.jpg"])), (1, csv_field)),
        "title": weighted((2, nonblank_text), (1, csv_field)),
        "group": weighted((2, st.sampled_from(["1", "2"])), (1, csv_field)),
        "other": csv_field}).map(in_order)
    quoting = st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL])
    lines = [_csv_text([header], separator, csv.QUOTE_MINIMAL, terminator)]
    for kind in draw(st.lists(st.sampled_from(["valid"] * 4 + ["mixed", "raw", "blank"]), max_size=6)):
        if kind in ("valid", "mixed"):
            row = draw(valid_row if kind == "valid" else mixed_row)
            lines.append(_csv_text([row], separator, draw(quoting), terminator))
        elif kind == "raw":
            joiner = draw(st.sampled_from([separator, ",", "\t"]))
            lines.append(joiner.join(draw(st.lists(csv_field, max_size=5))) + terminator)
        else:
            lines.append(draw(st.sampled_from(["", " ", "\t"])) + terminator)
    content = "".join(lines).encode("utf-8", "surrogatepass")
    if draw(st.booleans()):
        content = b"\xef\xbb\xbf" + content
    if draw(st.integers(0, 3)) == 0:
        content = insert_bytes(content, draw(st.integers(0, 300)), draw(st.sampled_from(BAD_UTF8)))
    return content, option, group_key


def _check_csv(path: Path, root: Path, lines: int, option: str, group_key: str | None, skip_bad: bool,
               check_images: bool) -> CsvCaptionSource | None:
    try:
        source = CsvCaptionSource(path, root, group_key=group_key, separator=option, skip_bad=skip_bad,
                                  check_images=check_images)
    except DataError as e:
        message = str(e)
        event(f"error {'skipping' if skip_bad else 'strict'}")
        tail = with_tail(path, message)
        if match := re.match(r":(\d+):", tail):
            assert 1 <= int(match.group(1)) <= lines, message
        if skip_bad:  # what is left is about the whole file: its header, or that nothing was usable
            assert re.match(r"(:\d+: the header has |: no header row|: no usable records)", tail), message
        return None
    records = source.records
    assert len(source) > 0 and all(record.caption.strip() for record in records)
    assert all(record.file == 0 and 1 <= record.line <= lines for record in records)
    assert all(source.where(record) == f"{path}:{record.line}" for record in records)
    firsts = list(dict.fromkeys(record.group for record in records))
    assert firsts == list(range(len(firsts))) == list(range(len(source.images()))), firsts
    assert len(source.group_keys()) == len(firsts) and source.text_to_image() == [r.group for r in records]
    assert [record.line for record in records] == sorted(record.line for record in records)
    if check_images:
        assert all(Path(record.image).is_file() for record in records)
    return source


@fuzz(100)
@given(file=csv_files(), check_images=st.booleans())
def test_csv_captions_read_or_name_file_and_line(scratch, image_root, file, check_images):
    content, option, group_key = file
    path = scratch / "captions.csv"
    path.write_bytes(content)
    lines = content.count(b"\n") + 1
    strict = _check_csv(path, image_root, lines, option, group_key, False, check_images)
    skipping = _check_csv(path, image_root, lines, option, group_key, True, check_images)
    if strict is not None:  # nothing to skip: both read the same records
        assert skipping is not None and skipping.records == strict.records and skipping.skipped.total == 0


@fuzz(20)
@given(option=st.sampled_from(BAD_SEPARATORS))
def test_csv_bad_separators_are_config_errors(scratch, option):
    path = scratch / "separator.csv"
    path.write_bytes(b"filepath\ttitle\na.jpg\ta dog\n")
    with pytest.raises(ConfigError, match=re.escape(repr(option))):
        CsvCaptionSource(path, scratch, separator=option, check_images=False)


csv_cells = st.text(no_surrogates, min_size=1, max_size=12).filter(str.strip)


@fuzz(100)
@given(rows=st.lists(st.tuples(csv_cells, csv_cells, st.sampled_from(["g1", "g2", " g3 "])), min_size=1, max_size=6),
       option=st.sampled_from(GOOD_SEPARATORS), quoting=st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]),
       terminator=st.sampled_from(["\n", "\r\n"]), bom=st.booleans(), use_group=st.booleans(),
       header=st.permutations(["filepath", "title", "group"]))
def test_csv_written_by_the_csv_module_reads_back_exactly(scratch, rows, option, quoting, terminator, bom, use_group,
                                                          header):
    separator = TAB_NAMES.get(option, option)
    text = _csv_text([header], separator, quoting, terminator)
    expected = []
    for image, caption, group in rows:
        line = text.count("\n") + 1
        values = {"filepath": image, "title": caption, "group": group}
        text += _csv_text([[values[name] for name in header]], separator, quoting, terminator)
        expected.append((image, caption, group if use_group else image, line))
    path = scratch / "roundtrip.csv"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    source = CsvCaptionSource(path, scratch, separator=option, group_key="group" if use_group else None,
                              check_images=False)
    groups: dict[str, int] = {}
    assert [(r.image, r.caption, r.group, r.line) for r in source.records] == [
        (str(scratch / image), caption, groups.setdefault(key, len(groups)), line)
        for image, caption, key, line in expected]
    assert source.group_keys() == list(groups) and source.skipped.total == 0


# ---------------------------------------------------------------------------------------------------------------
# Karpathy's split JSON (dataset_coco.json, dataset_flickr30k.json)

SPLITS = ["train", "restval", "val", "test"]
ENTRY_KEYS = ["filename", "filepath", "split", "imgid", "cocoid", "sentences"]
words = st.text("abcxyzé", min_size=1, max_size=5)
sentence = st.builds(lambda raw, tokens: {"raw": raw, "tokens": tokens, "imgid": 0, "sentid": 0},
                     nonblank_text, st.lists(words, min_size=1, max_size=4))
entry = st.fixed_dictionaries(
    {"filename": st.one_of(st.sampled_from(["a.jpg", "b.jpg"]), nonblank_text.filter(lambda s: "\x00" not in s)),
     "split": st.sampled_from(["train", *SPLITS]), "sentences": st.lists(sentence, min_size=1, max_size=3)},
    optional={"filepath": st.sampled_from(["val2014", "train2014", ""]), "cocoid": st.integers(0, 10**6)})


def numbered(items: list[dict]) -> list[dict]:
    """Entries with the imgids of the released files: their index in `images`."""
    return [{**item, "imgid": i} for i, item in enumerate(items)]


entries = st.lists(entry, max_size=6).map(numbered)
odd_values = st.one_of(st.sampled_from(["", " ", -1, True, None, [], {}, [{}], "train", 1.5, 2**70, [""], [" "]]),
                       json_values)
entry_mutations = st.one_of(
    st.tuples(st.just("drop"), st.integers(0, 9), st.sampled_from(ENTRY_KEYS)),
    st.tuples(st.just("set"), st.integers(0, 9), st.sampled_from(ENTRY_KEYS), odd_values),
    st.tuples(st.just("repeat imgid"), st.integers(0, 9), st.integers(0, 9)),
    st.tuples(st.just("sentence"), st.integers(0, 9), st.integers(0, 3), st.sampled_from(["raw", "tokens"]),
              st.one_of(odd_values, st.lists(st.one_of(plain_text, st.integers()), max_size=2))),
    st.tuples(st.just("entry"), st.integers(0, 9), json_values),
)
mutations = weighted((5, entry_mutations), (1, st.tuples(st.just("images"), json_values)))


def _mutated(items: list[dict], changes: list[tuple]) -> object:
    doc: object = {"dataset": "coco", "images": copy.deepcopy(items)}
    for change in changes:
        kind, *args = change
        images = doc.get("images") if isinstance(doc, dict) else None
        if kind == "images":
            doc = {"images": args[0]} if isinstance(args[0], list) or args[0] is None else args[0]
            continue
        if not isinstance(images, list) or not images:
            continue
        item = images[args[0] % len(images)]
        if kind == "entry":
            images[args[0] % len(images)] = args[1]
        elif not isinstance(item, dict):
            continue
        elif kind == "drop":
            item.pop(args[1], None)
        elif kind == "set":
            item[args[1]] = args[2]
        elif kind == "repeat imgid":
            other = images[args[1] % len(images)]
            item["imgid"] = other.get("imgid") if isinstance(other, dict) else 0
        elif kind == "sentence" and isinstance(item.get("sentences"), list) and item["sentences"]:
            found = item["sentences"][args[1] % len(item["sentences"])]
            if isinstance(found, dict):
                found[args[2]] = args[3]
    return doc


def _karpathy_bytes(doc: object, ascii_only: bool) -> bytes:
    return json.dumps(doc, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


mutated_files = st.builds(lambda items, changes, ascii_only: _karpathy_bytes(_mutated(items, changes), ascii_only),
                          st.lists(entry, min_size=1, max_size=6).map(numbered),
                          st.lists(mutations, min_size=1, max_size=2), st.booleans())
valid_files = st.builds(lambda items, ascii: _karpathy_bytes({"images": items}, ascii), entries, st.booleans())
karpathy_files = weighted(
    (6, mutated_files), (3, valid_files), (1, json_values.map(lambda value: json.dumps(value).encode())),
    (1, st.sampled_from([b"", b"{", b'{"images": [', b"\xef\xbb\xbf{}", b'{"images": []}', b"[" * 1100, b"\xff",
                         b'{"images": [{"split": "train", "imgid": ' + b"9" * 5000 + b"}]}"])),
    (1, st.binary(max_size=30)),
)


def _selected_splits(split: str, restval: bool) -> set[str]:
    return {split, "restval"} if split == "train" and restval else {split}


def _check_karpathy(path: Path, root: Path, content: bytes, split: str, restval: bool, captions: str,
                    skip_bad: bool) -> KarpathyCaptionSource | None:
    try:
        doc = json.loads(content.decode("utf-8-sig"))
        images = doc["images"] if isinstance(doc, dict) and isinstance(doc.get("images"), list) else None
    except (ValueError, RecursionError):
        images = None
    try:
        source = KarpathyCaptionSource(path, root, split=split, restval=restval, captions=captions,
                                       skip_bad=skip_bad, check_images=False)
    except DataError as e:
        message = str(e)
        event(f"error {'skipping' if skip_bad else 'strict'}")
        tail = with_tail(path, message)
        if match := re.match(r" images\[(\d+)\]", tail):
            assert not skip_bad, message  # an entry's error is skipped and counted with skip_bad
            assert images is not None and 0 <= int(match.group(1)) < len(images), message
        else:
            assert tail.startswith(":"), message
        return None
    assert images is not None
    records, selected = source.records, _selected_splits(split, restval)
    assert len(source) > 0 and all(record.caption.strip() and record.file == 0 for record in records)
    groups = [record.group for record in records]
    assert groups == sorted(groups) and sorted(set(groups)) == list(range(len(source.images())))
    assert len(source.group_keys()) == len(source.images())
    for record in records:
        assert source.where(record) == f"{path} images[{record.line - 1}]"
        item = images[record.line - 1]
        assert item["split"] in selected
        folder = item.get("filepath", "")
        assert record.image == str(root / (f"{folder}/{item['filename']}" if folder else item["filename"]))
        texts = [s[captions] if captions == "raw" else " ".join(s[captions]) for s in item["sentences"]]
        assert record.caption in texts
        assert source.group_keys()[record.group] == item.get("cocoid", item["imgid"])
    return source


@fuzz(100)
@given(content=karpathy_files, split=st.sampled_from([*SPLITS, "train", "train", "nope"]), restval=st.booleans(),
       captions=st.sampled_from(["raw", "tokens"]))
def test_karpathy_json_reads_or_names_file_and_entry(scratch, content, split, restval, captions):
    path = scratch / "dataset_coco.json"
    path.write_bytes(content)
    strict = _check_karpathy(path, scratch, content, split, restval, captions, skip_bad=False)
    skipping = _check_karpathy(path, scratch, content, split, restval, captions, skip_bad=True)
    if strict is not None:
        assert skipping is not None and skipping.records == strict.records and skipping.skipped.total == 0


@fuzz(60)
@given(items=entries, split=st.sampled_from(SPLITS), restval=st.booleans(), captions=st.sampled_from(["raw", "tokens"]),
       bom=st.booleans())
def test_karpathy_valid_entries_read_back_per_split(scratch, image_root, items, split, restval, captions, bom):
    path = scratch / "dataset_roundtrip.json"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + json.dumps({"images": items}).encode())
    chosen = [item for item in items if item["split"] in _selected_splits(split, restval)]
    if not chosen:
        with pytest.raises(DataError, match=f"no images of split '{split}'"):
            KarpathyCaptionSource(path, image_root, split=split, restval=restval, check_images=False)
        return
    source = KarpathyCaptionSource(path, image_root, split=split, restval=restval, captions=captions,
                                   check_images=False)
    expected = [(item["imgid"], s["raw"] if captions == "raw" else " ".join(s["tokens"]))
                for item in chosen for s in item["sentences"]]
    assert len(source) == len(expected) == sum(len(item["sentences"]) for item in chosen)
    assert [(r.line - 1, r.caption) for r in source.records] == expected
    assert source.group_keys() == [item.get("cocoid", item["imgid"]) for item in chosen]
    assert source.skipped.total == 0


# ---------------------------------------------------------------------------------------------------------------
# webdataset tar shards

KEYS = ["0001", "0002", "a", "d/0003", "é", "k" * 120, "dir/sub/k", "__key__", "A B"]
tar_keys = st.one_of(st.sampled_from(KEYS), st.lists(st.text("ab0é", min_size=1, max_size=3), min_size=1, max_size=3
                                                     ).map("/".join))
EXTENSIONS = ["jpg", "png", "jpeg", "webp", "txt", "json", "cls", "JPG", "TXT", "Json", "txt.gz"]
# Members that belong to no sample: no extension, no key, a webdataset __meta__ file, a folder, a link.
ODD_MEMBERS = [("noext", "file"), (".hidden", "file"), ("__meta__/x.txt", "file"), ("__meta__", "file"),
               ("d", "dir"), ("d/link.jpg", "link")]
sized = st.sampled_from([0, 1, 511, 512, 513, 1500]).map(lambda n: bytes(range(256)) * (n // 256) + bytes(n % 256))
image_payload = st.one_of(st.binary(max_size=24), sized)
text_payload = weighted(
    (4, nonblank_text.map(str.encode)), (1, st.sampled_from([b"", b"  \n", b"\xef\xbb\xbfcaption", *BAD_UTF8])),
    (1, st.binary(max_size=12)))
json_payload = weighted(
    (4, st.builds(lambda key, text: json.dumps({key: text}).encode(), st.sampled_from(["caption", "text"]),
                  nonblank_text)),
    (1, st.builds(lambda key, text: json.dumps({key: text}).encode(), st.sampled_from(["caption", "text", "other"]),
                  st.one_of(nonblank_text, st.just(" ")))),
    (1, json_values.map(lambda value: json.dumps(value).encode())), (1, st.binary(max_size=12)))


def _payload(ext: str) -> st.SearchStrategy[bytes]:
    return {"txt": text_payload, "json": json_payload}.get(ext.lower(), image_payload)


sample_member = st.builds(lambda key, ext: (key, ext), tar_keys, st.sampled_from(EXTENSIONS)).flatmap(
    lambda ke: _payload(ke[1]).map(lambda data: (f"{ke[0]}.{ke[1]}", "file", data)))
odd_member = st.sampled_from(ODD_MEMBERS).flatmap(
    lambda odd: st.binary(max_size=8).map(lambda data: (odd[0], odd[1], data)))


@st.composite
def whole_sample(draw, number: int) -> list[tuple[str, str, bytes]]:
    """A sample as img2dataset writes one: an image and a caption (txt, json or both), sometimes a class, in any
    order; its key ends in `number`."""
    key = f"{draw(tar_keys)}_{number}"
    exts = [draw(st.sampled_from(["jpg", "png", "jpeg", "webp", "JPG"])),
            *draw(st.lists(st.sampled_from(["txt", "json", "cls"]), min_size=1, max_size=3, unique=True))]
    return draw(st.permutations([(f"{key}.{ext}", "file", draw(_payload(ext))) for ext in exts]))




@st.composite
def archives(draw) -> tuple[list[tuple[str, str, bytes]], int]:
    """(members, tar format): whole samples with keys of their own, among single members whose keys may repeat or
    interleave and members of no sample."""
    members = []
    for number in range(draw(st.integers(1, 5))):
        members += draw(weighted((4, whole_sample(number)), (1, sample_member.map(lambda m: [m])),
                                 (1, odd_member.map(lambda m: [m]))))
    return members, draw(st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT]))


def _tar(members: list[tuple[str, str, bytes]], fmt: int) -> bytes:
    """An archive written by tarfile (PAX where the asked format cannot hold a name)."""
    for form in (fmt, tarfile.PAX_FORMAT):
        buffer = io.BytesIO()
        try:
            with tarfile.open(fileobj=buffer, mode="w", format=form) as tar:
                for name, kind, data in members:
                    info = tarfile.TarInfo(name)
                    if kind == "dir":
                        info.type = tarfile.DIRTYPE
                    elif kind == "link":
                        info.type, info.linkname = tarfile.SYMTYPE, "a.jpg"
                    else:
                        info.size = len(data)
                    tar.addfile(info, io.BytesIO(data) if kind == "file" else None)
        except ValueError:  # a name ustar cannot hold
            continue
        return buffer.getvalue()
    raise AssertionError("tarfile cannot write these members")


def _split_name(name: str) -> tuple[str, str] | None:
    """(key, lower-cased extension) as webdataset's base_plus_ext; None without a dot or a key."""
    head, _, base = name.rpartition("/")
    key, dot, ext = base.partition(".")
    return ((f"{head}/{key}" if head else key), ext.lower()) if dot and key else None


def _samples(members: list[tuple[str, str, bytes]]) -> list[tuple[str, list[tuple[str, bytes]]]]:
    """Consecutive sample members sharing a key: [(key, [(extension, payload), ...]), ...]."""
    named = [(parts, data) for name, kind, data in members
             if kind == "file" and not re.match(r"__[^/]*__($|/)", name) and (parts := _split_name(name))]
    return [(key, [(parts[1], data) for parts, data in group])
            for key, group in itertools.groupby(named, key=lambda item: item[0][0])]


def _caption(by_ext: dict[str, bytes]) -> str | None:
    data = by_ext.get("txt", by_ext.get("json"))
    if data is None:
        return None
    try:
        text = data.decode("utf-8-sig")
        if "txt" in by_ext:
            return text.strip()
        item = json.loads(text)
    except (ValueError, RecursionError):
        return None
    found = next((item[k] for k in ("caption", "text") if isinstance(item, dict) and isinstance(item.get(k), str)),
                 None)
    return found.strip() if found is not None else None


def expected_records(members: list[tuple[str, str, bytes]]) -> tuple[list[tuple[int, str, bytes, str]], int]:
    """What a whole shard of these members reads as: (sample number, key, image bytes, caption) of every usable
    sample, and how many samples are bad (two members of one extension, no image, no usable caption)."""
    records, bad = [], 0
    for number, (key, sample) in enumerate(_samples(members), start=1):
        by_ext = dict(sample)
        image = next((by_ext[ext] for ext in IMAGE_EXTENSIONS if ext in by_ext), None)
        caption = _caption(by_ext)
        if len(by_ext) < len(sample) or image is None or not caption:
            bad += 1
        else:
            records.append((number, key, image, caption))
    return records, bad


def _read_records(source: WebDatasetSource) -> list[tuple[int, str, bytes, str]]:
    return [(r.line, source.keys[r.group], image_file(r.image).read(), r.caption) for r in source.records]


def _check_shard(path: Path, skip_bad: bool) -> WebDatasetSource | None:
    """The source of one shard, checked to be well-formed, or None after a DataError naming the shard."""
    try:
        with no_hang():
            source = WebDatasetSource([path], skip_bad=skip_bad)
    except DataError as e:
        event(f"error {'skipping' if skip_bad else 'strict'}")
        with_tail(path, str(e))
        return None
    assert len(source) > 0 and len(source.keys) == len(source.records)
    for index, record in enumerate(source.records):
        assert isinstance(record.caption, str) and record.caption == record.caption.strip() != ""
        assert record.group == index and record.file == 0 and record.line >= 1
        assert source.where(record) == f"{path}:{source.keys[index]}"
        assert record.image.startswith(f"tar://{os.path.abspath(path)}#")
        size = int(record.image.rpartition(":")[2])
        assert len(image_file(record.image).read()) == size
    assert [r.line for r in source.records] == sorted(set(r.line for r in source.records))
    return source


@fuzz(100)
@given(archive=archives())
def test_webdataset_whole_shards_read_exactly(scratch, archive):
    members, fmt = archive
    path = scratch / "whole.tar"
    path.write_bytes(_tar(members, fmt))
    expected, bad = expected_records(members)
    skipping = _check_shard(path, skip_bad=True)
    if skipping is None:
        assert not expected
    else:
        assert _read_records(skipping) == expected and skipping.skipped.total == bad
    strict = _check_shard(path, skip_bad=False)
    assert (strict is None) == (bad > 0 or not expected)
    if strict is not None:
        assert strict.records == skipping.records


def _content_end(data: bytes) -> int:
    """Where the members of an archive end, and 1 KiB more (tarfile pads an archive with zeros to 10 KiB: cuts and
    damage there change nothing)."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return min(max((info.offset_data + info.size for info in tar.getmembers()), default=0) + 1024, len(data))


def _cut_is_seen(data: bytes, cut: int) -> bool:
    """Whether an archive cut at byte `cut` is cut inside a member: after its first header byte (a pax or GNU
    long-name header included) and before the end of its data. A cut at a header's first byte or in a member's
    padding leaves an archive that is whole as far as its bytes tell (one without end-of-archive blocks)."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return any(info.offset < cut < info.offset_data + info.size for info in tar.getmembers())


# Where to cut: anywhere, or near a member's first header (a pax / GNU long-name header, its records, the member's
# own header, its data), where a reader must tell a cut from the end of the archive.
cut_points = weighted((1, st.floats(0, 1)), (2, st.tuples(st.integers(0, 30), st.sampled_from(
    [1, 100, 511, 512, 513, 600, 1023, 1024, 1025, 1100, 1535, 1536, 1537]))))


def _cut_at(data: bytes, point: float | tuple[int, int]) -> int:
    if isinstance(point, float):
        return int(point * _content_end(data))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        starts = [info.offset for info in tar.getmembers()] or [0]
    member, delta = point  # counted from the last member: a cut there leaves the samples before it
    return min(starts[-1 - member % len(starts)] + delta, len(data))


@fuzz(100)
@given(archive=archives(), point=cut_points)
def test_webdataset_cut_shards_drop_the_cut_sample(scratch, archive, point):
    """With skip_bad a shard cut off anywhere reads (the cut sample dropped and counted), unless nothing usable is
    left; what it reads is what the whole shard reads."""
    members, fmt = archive
    data = _tar(members, fmt)
    cut = _cut_at(data, point)
    path = scratch / "cut.tar"
    path.write_bytes(data[:cut])
    whole, _ = expected_records(members)
    images = {(key, payload) for key, sample in _samples(members) for ext, payload in sample
              if ext in IMAGE_EXTENSIONS}
    seen = _cut_is_seen(data, cut)
    event(f"cut seen: {seen}")
    try:
        with no_hang():
            source = WebDatasetSource([path], skip_bad=True)
    except DataError as e:
        assert re.fullmatch(rf"{re.escape(str(path))}(: no usable samples| is empty \(0 bytes\), not a tar archive)",
                            str(e)), str(e)
        return
    read = _read_records(source)
    assert all((key, image) in images for _, key, image, _ in read)
    if seen:
        assert source.skipped.total >= 1
        assert all(record in whole for record in read), (read, whole)
    _check_shard(path, skip_bad=False)


corruptions = st.one_of(
    st.tuples(st.just("overwrite"), st.integers(0, 10**6), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("append"), st.integers(0, 0), st.one_of(st.binary(max_size=600), st.just(b"\0" * 1024))),
    st.tuples(st.just("cut and append"), st.integers(0, 10**6), st.binary(min_size=1, max_size=600)),
)


@fuzz(100)
@given(archive=archives(), corruption=corruptions, skip_bad=st.booleans())
def test_webdataset_corrupt_shards_read_or_name_the_shard(scratch, archive, corruption, skip_bad):
    members, fmt = archive
    data = bytearray(_tar(members, fmt))
    kind, position, garbage = corruption
    position %= _content_end(bytes(data))
    if kind == "overwrite":
        data[position:position + len(garbage)] = garbage
    elif kind == "append":
        data += garbage
    else:
        data = data[:position] + garbage
    path = scratch / "corrupt.tar"
    path.write_bytes(bytes(data))
    _check_shard(path, skip_bad)


class _CountedReads(io.FileIO):
    """A file that fails the property once read more often than a reader that makes progress would."""

    def __init__(self, path: Path, limit: int):
        super().__init__(path, "rb")
        self.reads, self.limit = 0, limit

    def read(self, size: int = -1) -> bytes:
        self.reads += 1
        assert self.reads <= self.limit, f"tar_members read the archive {self.reads} times: it is not progressing"
        return super().read(size)


def _regular_members(data: bytes) -> list[tuple[str, int, int]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(info.name, info.offset_data, info.size) for info in tar.getmembers()
                if info.isreg() and not re.match(r"__[^/]*__($|/)", info.name)]


@fuzz(60)
@given(archive=archives())
def test_tar_members_match_tarfile(scratch, archive):
    members, fmt = archive
    data = _tar(members, fmt)
    path = scratch / "members.tar"
    path.write_bytes(data)
    with _CountedReads(path, limit=4 * (len(data) // 512 + 4)) as f:
        found, cut = tar_members(f, path)
    assert cut is None and [tuple(member) for member in found] == _regular_members(data)


def _cuts_inside(info: tarfile.TarInfo) -> list[int]:
    """Cut points inside a member (after its first header byte, before the end of its data): both sides of every
    block boundary (pax / GNU long-name header, their records, the member's own header, its data), and a few bytes
    in."""
    end = info.offset_data + info.size
    points = {info.offset + 1, info.offset + 100, end - 1, (info.offset + end) // 2}
    for boundary in range(info.offset + 512, end + 1, 512):
        points |= {boundary - 1, boundary, boundary + 1, boundary + 30}
    return sorted(point for point in points if info.offset < point < end)


@fuzz(60)
@given(archive=archives())
def test_tar_members_report_a_cut_inside_a_member(scratch, archive):
    """An archive cut after a member's first header byte (its pax / GNU long-name header included) and before the end
    of its data is not whole: tar_members says it is cut, and lists the members before the cut."""
    members, fmt = archive
    data = _tar(members, fmt)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        infos = tar.getmembers()
    event(f"extended headers: {any(info.offset_data - info.offset > 512 for info in infos)}")
    path = scratch / "cut-members.tar"
    for info in infos:
        for cut in _cuts_inside(info):
            path.write_bytes(data[:cut])
            try:
                with _CountedReads(path, limit=4 * (len(data) // 512 + 4)) as f:
                    found, where = tar_members(f, path)
            except DataError as e:  # the archive starts with a whole header (or a cut one): a tar archive, cut off
                raise AssertionError(f"an archive cut at byte {cut}, inside {info.name!r} (bytes {info.offset} to "
                                     f"{info.offset_data + info.size}), is not reported as cut: {e}") from e
            assert where is not None, (f"an archive cut at byte {cut}, inside {info.name!r} (bytes {info.offset} to "
                                       f"{info.offset_data + info.size}), reads as whole")
            assert [tuple(m) for m in found] == [m for m in _regular_members(data) if m[1] + m[2] <= cut]


# Numeric header fields as a tar writer other than Python's (or a damaged shard) may hold them, the checksum right.
size_fields = st.one_of(st.sampled_from([b"-1", b"-1000", b"-2000", b"+1", b"1_0", b" 7 ", b"0", b"77777777777",
                                         b"\x80" + bytes(10) + b"\x01", b"8", b""]),
                        st.integers(-4096, 4096).map(lambda n: (b"-" if n < 0 else b"") + b"%o" % abs(n)))
pax_sizes = st.one_of(st.sampled_from(["-1", "-512", "-1024", "+5", "1_0", " 3", "\u0661", "x", ""]),
                      st.integers(-3000, 3000).map(str))


def _set_size(data: bytearray, header: int, field: bytes) -> None:
    data[header + 124:header + 136] = field.ljust(12, b"\0")[:12]
    data[header + 148:header + 156] = b" " * 8
    data[header + 148:header + 156] = b"%06o\0 " % sum(data[header:header + 512])


@fuzz(100)
@given(which=st.integers(0, 3), field=size_fields, pax=st.booleans(), pax_size=pax_sizes)
def test_tar_members_survive_odd_size_fields(scratch, which, field, pax, pax_size):
    """Any size a header holds (signed, underscored, base-256, or a pax `size` record): members lie inside the file
    at increasing offsets with sizes >= 0, or the cut / DataError names the shard; never a loop or an OSError."""
    members = [("a.jpg", b"x" * 700), ("a.txt", b"cap a"), ("b.jpg", b"y"), ("b.txt", b"cap b")]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT if pax else tarfile.GNU_FORMAT) as tar:
        for index, (name, payload) in enumerate(members):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            if pax and index == which:
                info.pax_headers = {"size": pax_size}
            tar.addfile(info, io.BytesIO(payload))
    data = bytearray(buffer.getvalue())
    if not pax:
        with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
            _set_size(data, tar.getmembers()[which].offset, field)
    path = scratch / "sizes.tar"
    path.write_bytes(bytes(data))
    try:
        with _CountedReads(path, limit=64) as f:
            found, cut = tar_members(f, path)
    except DataError as e:
        with_tail(path, str(e))
        return
    offsets = [member.offset for member in found]
    assert offsets == sorted(set(offsets)), found
    assert all(member.size >= 0 and member.offset + member.size <= len(data) for member in found), found
    assert cut is None or isinstance(cut[0], str)


# Pieces of shard patterns; numbers stay small so that no pattern expands to many names.
PATTERN_PIECES = ["{", "}", ",", "..", "a", "b", "0", "1", "2", "07", "-", "/", "*", ".tar", "::", "é"]


@fuzz(100)
@given(pattern=st.one_of(st.lists(st.sampled_from(PATTERN_PIECES), max_size=10).map("".join), st.text(max_size=10)))
def test_brace_expand_gives_names_or_data_error(pattern):
    try:
        names = brace_expand(pattern)
    except DataError as e:
        assert f"'{pattern}'" in str(e) and "unbalanced braces" in str(e), str(e)
        assert pattern.count("{") != pattern.count("}") or re.search(r"}[^{]*{", pattern), pattern
        return
    assert isinstance(names, list) and names and all(isinstance(name, str) for name in names)
    if "{" not in pattern and "}" not in pattern:
        assert names == [pattern]


brace_free = st.text(st.characters(exclude_characters="{},", exclude_categories=("Cs",)), max_size=5)


@fuzz(100)
@given(prefix=brace_free, suffix=brace_free, start=st.integers(-30, 30), end=st.integers(-30, 30),
       width=st.integers(0, 3), options=st.lists(brace_free, min_size=2, max_size=4))
def test_brace_expand_ranges_and_lists(prefix, suffix, start, end, width, options):
    left, right = (f"{n:0{width}d}" if n >= 0 else f"{n}" for n in (start, end))
    names = brace_expand(f"{prefix}{{{left}..{right}}}{suffix}")
    assert len(names) == abs(end - start) + 1
    step = 1 if start <= end else -1
    assert [int(name[len(prefix):len(name) - len(suffix)]) for name in names] == list(range(start, end + step, step))
    assert all(name.startswith(prefix) and name.endswith(suffix) for name in names)
    assert brace_expand(f"{prefix}{{{','.join(options)}}}{suffix}") == [f"{prefix}{o}{suffix}" for o in options]


# ---------------------------------------------------------------------------------------------------------------
# TFDS examples (decoded, the image left encoded)

FEATURE_NAMES = ["image", "caption", "id", "captions", "text", "objects", "a", "b", "a/b", "captions/text",
                 "image/id", "", "/"]
feature_names = st.one_of(st.sampled_from(FEATURE_NAMES), st.text("ab/é", max_size=4))
lookup_keys = st.one_of(feature_names, st.sampled_from(["a/b/c", "a//b", "/a", "a/", "objects/id"]))
small_bytes = st.one_of(st.binary(max_size=8), st.sampled_from([b"", b" ", *BAD_UTF8]))
tf_leaves = st.one_of(
    small_bytes, plain_text, st.integers(-2**63, 2**63 - 1), st.booleans(), st.none(),
    st.floats(allow_nan=False), st.integers(-2**63, 2**63 - 1).map(np.int64), small_bytes.map(np.bytes_),
    st.booleans().map(np.bool_), st.floats(width=32, allow_nan=False).map(np.float32),
    st.lists(small_bytes, max_size=3).map(lambda items: np.array(items, dtype=object)),
    st.lists(st.binary(max_size=6), max_size=3).map(lambda items: np.array(items, dtype="S")),
    st.lists(st.text(max_size=4), max_size=3).map(lambda items: np.array(items, dtype=str)),
    st.integers(-100, 100).map(np.array), small_bytes.map(lambda b: np.array(b, dtype=object)),
    st.just(np.zeros((2, 2))), st.just(np.array([[b"a"]], dtype=object)),
    st.lists(st.one_of(small_bytes, plain_text, st.integers()), max_size=3),
    st.tuples(small_bytes, plain_text),
)
tf_values = st.recursive(tf_leaves, lambda inner: st.dictionaries(feature_names, inner, max_size=3), max_leaves=6)
# Examples shaped like a TFDS captioning dataset's (an encoded image, a caption or a list of them, an id), with
# other features beside them or in their place.
shaped_examples = st.builds(
    lambda example, dropped: {key: value for key, value in example.items() if key not in dropped},
    st.fixed_dictionaries({
        "image": weighted((2, small_bytes), (1, small_bytes.map(np.bytes_)), (1, tf_values)),
        "caption": st.one_of(plain_text, small_bytes, tf_values),
        "captions": st.one_of(st.fixed_dictionaries({"text": tf_leaves}, optional={"id": tf_leaves}), tf_values),
        "image/id": st.one_of(st.integers(), st.integers(0, 9).map(np.int64), plain_text, small_bytes, tf_leaves),
        "objects": st.one_of(st.fixed_dictionaries({"id": tf_leaves}), tf_values)}),
    st.sets(st.sampled_from(["image", "caption", "captions", "image/id", "objects"]), max_size=2))
tf_examples = weighted(
    (2, shaped_examples),
    (1, st.builds(lambda shaped, extra: {**extra, **shaped}, shaped_examples,
                  st.dictionaries(feature_names, tf_values, max_size=3))),
    (1, st.dictionaries(feature_names, tf_values, max_size=5)))
common_keys = st.sampled_from(["image", "caption", "captions/text", "image/id", "objects/id", "captions/id", "id"])
wheres = st.one_of(st.sampled_from(["coco_captions/2017:1.1.0 train[3]", ""]), st.text(max_size=8))


def _walk(example: dict, key: str) -> tuple[bool, object]:
    if key in example:
        return True, example[key]
    value: object = example
    for part in key.split("/"):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value


@fuzz(100)
@given(example=tf_examples, key=st.one_of(common_keys, lookup_keys), where=wheres)
def test_tfds_feature_finds_the_key_or_names_it(example, key, where):
    found, expected = _walk(example, key)
    try:
        value = feature(example, key, where)
    except DataError as e:
        assert not found and str(e).startswith(where) and f"'{key}'" in str(e), str(e)
        return
    assert found and value is expected


@fuzz(100)
@given(example=tf_examples, image_key=weighted((3, st.just("image")), (1, lookup_keys)),
       caption_key=weighted((3, st.sampled_from(["caption", "captions/text"])), (1, lookup_keys)),
       id_key=st.one_of(st.just(""), common_keys, lookup_keys), where=wheres)
def test_tfds_examples_parse_or_name_the_example(example, image_key, caption_key, id_key, where):
    try:
        captions, key = parse_example(example, image_key, caption_key, id_key, where)
    except DataError as e:
        event("error")
        assert str(e).startswith(where), str(e)
        return
    assert isinstance(feature(example, image_key, where), bytes | np.bytes_)
    assert isinstance(captions, list) and captions and all(type(caption) is str for caption in captions)
    if id_key:
        assert type(key) in (int, str), key
    else:
        assert key is None


def _caption_feature(texts: list[str], form: str) -> object:
    if form == "str":
        return texts[0]
    if form == "bytes":
        return texts[0].encode()
    if form == "0-d array":
        return np.array(texts[0].encode(), dtype=object)
    encoded = [text.encode() for text in texts]
    return {"list": encoded, "object array": np.array(encoded, dtype=object),
            "bytes array": np.array(encoded, dtype="S")}[form]


@fuzz(100)
@given(image=st.binary(min_size=1, max_size=16), texts=st.lists(st.text(no_surrogates, max_size=8), min_size=1,
                                                               max_size=3),
       form=st.sampled_from(["str", "bytes", "0-d array", "list", "object array", "bytes array"]),
       group=st.one_of(st.integers(-2**63, 2**63 - 1), st.text(no_surrogates, max_size=6)),
       group_form=st.sampled_from(["plain", "numpy"]), nested=st.booleans())
def test_tfds_well_formed_examples_parse_exactly(image, texts, form, group, group_form, nested):
    if form in ("str", "bytes", "0-d array"):
        texts = texts[:1]
    if form == "bytes array":  # numpy's fixed-width bytes drop trailing NULs
        texts = [text.rstrip("\x00") for text in texts]
    caption = _caption_feature(texts, form)
    if group_form == "numpy":
        group_value = np.int64(group) if isinstance(group, int) else np.array(group.encode(), dtype=object)
    else:
        group_value = group
    if nested:
        example = {"image": image, "captions": {"text": caption}, "objects": {"id": group_value}}
        keys = ("image", "captions/text", "objects/id")
    else:
        example = {"image": np.bytes_(image) if image[-1:] != b"\0" else image, "caption": caption,
                   "image/id": group_value}
        keys = ("image", "caption", "image/id")
    captions, key = parse_example(example, *keys, where="ds train[0]")
    assert captions == texts and key == group and type(key) is type(group)
    assert parse_example(example, *keys[:2], "", where="ds train[0]") == (texts, None)
