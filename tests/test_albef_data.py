"""ALBEF/CUSA JSON annotations: pre_caption's cleaning rules, train and test grouping, and every error naming the
file, the record and the key."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from jaxretrieval.data.albef import AlbefCaptionSource, pre_caption
from jaxretrieval.data.sources import CaptionSource, SkipCounts
from jaxretrieval.errors import ConfigError, DataError


# Worked out by hand from CUSA's dataset/utils.py: lower(); [,.'!?"()*#:;~] -> ' '; '-' '/' -> ' ';
# '<person>' -> 'person'; \s{2,} -> ' '; rstrip('\n'); strip(' '); split(' ')[:max_words].
@pytest.mark.parametrize("raw, cleaned", [
    ("A young man holding an umbrella next to a herd of cattle .",
     "a young man holding an umbrella next to a herd of cattle"),
    ("A person on a skateboard doing a trick in mid-air. ", "a person on a skateboard doing a trick in mid air"),
    ('He said: "Hi!" (twice); ok? #1 *star* ~wave', "he said hi twice ok 1 star wave"),
    ("It's a cat's toy", "it s a cat s toy"),
    ("<PERSON> rides a bike", "person rides a bike"),
    ("<person>-and/or <person>", "person and or person"),
    ("red/white  striped\t\t shirt", "red white striped shirt"),
    ("one\ttab stays", "one\ttab stays"),  # a single whitespace character other than ' ' is not collapsed
    ("  leading and trailing \n", "leading and trailing"),
    ("ends with newline\n", "ends with newline"),
    ("caf\u00e9 & co", "caf\u00e9 & co"),  # '&' and non-ASCII letters are kept
    ("a [b] {c} <d>", "a [b] {c} <d>"),
])
def test_pre_caption_matches_the_original_rules(raw, cleaned):
    assert pre_caption(raw) == cleaned


def test_pre_caption_truncates_to_max_words():
    assert pre_caption("One, two, three. Four five!", max_words=3) == "one two three"
    assert pre_caption("one two three", max_words=3) == "one two three"
    assert pre_caption(" ".join(f"w{i}" for i in range(70))) == " ".join(f"w{i}" for i in range(64))


@pytest.mark.parametrize("raw", ["", "   ", "...", "?!-/ ~"])
def test_pre_caption_empty_result_is_an_error_naming_where(raw):
    with pytest.raises(DataError, match=r"^ann\.json record 3: key 'caption' is empty once cleaned"):
        pre_caption(raw, where="ann.json record 3: key 'caption'")


# --- reading the JSON array -------------------------------------------------------------------------------------

def make_images(root: Path, names: list[str]) -> None:
    (root / "pics").mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(names):
        Image.new("RGB", (4, 4), (index * 40, 0, 0)).save(root / "pics" / name)


def write_json(path: Path, items) -> Path:
    path.write_text(json.dumps(items), encoding="utf-8")
    return path


RECORDS = [
    {"image_path": "./pics/b.png", "caption": "A dog, running.", "image_id": "b"},
    {"image_path": "./pics/a.png", "caption": "A cat on a mat", "image_id": "a"},
    {"image_path": "./pics/b.png", "caption": "The dog-walker", "image_id": "b"},
    {"image_path": "./pics/c.png", "caption": "<person> with hat", "image_id": "c"},
    {"image_path": "./pics/a.png", "caption": "Cat!", "image_id": "a"},
]


@pytest.fixture
def data(tmp_path) -> Path:
    make_images(tmp_path, ["a.png", "b.png", "c.png"])
    return write_json(tmp_path / "new_train.json", RECORDS)


def test_train_groups_by_first_appearance_and_cleans_captions(data, tmp_path):
    source = AlbefCaptionSource(data)
    assert isinstance(source, CaptionSource) and len(source) == 5 and source.root == tmp_path
    assert [r.caption for r in source] == ["a dog running", "a cat on a mat", "the dog walker", "person with hat",
                                           "cat"]
    assert [r.group for r in source.records] == [0, 1, 0, 2, 1]
    assert [r.line for r in source.records] == [1, 2, 3, 4, 5]
    assert source.image_ids == ["b", "a", "c"]
    assert source.images() == [str(tmp_path / "pics" / n) for n in ("b.png", "a.png", "c.png")]
    assert source.text_to_image() == [0, 1, 0, 2, 1]
    assert source.where(source[3]) == f"{data} record 4" and source.image_id(source[3]) == "c"
    assert source.skipped == SkipCounts()


def test_test_split_is_sorted_by_image_id_with_captions_regrouped(data, tmp_path):
    source = AlbefCaptionSource(data, sort_by_image_id=True)
    assert source.image_ids == ["a", "b", "c"]
    assert source.images() == [str(tmp_path / "pics" / n) for n in ("a.png", "b.png", "c.png")]
    assert [r.caption for r in source] == ["a cat on a mat", "cat", "a dog running", "the dog walker",
                                           "person with hat"]
    assert source.text_to_image() == [0, 0, 1, 1, 2]
    assert [source.where(r) for r in source][:2] == [f"{data} record 2", f"{data} record 5"]


def test_int_image_ids_sort_numerically_and_paths_may_be_absolute(tmp_path):
    make_images(tmp_path, ["a.png", "b.png"])
    items = [{"image_path": str(tmp_path / "pics" / "a.png"), "caption": "x", "image_id": 10},
             {"image_path": "pics/b.png", "caption": "y", "image_id": 9}]
    (tmp_path / "other").mkdir()
    source = AlbefCaptionSource(write_json(tmp_path / "other" / "t.json", items), tmp_path, sort_by_image_id=True)
    assert source.image_ids == ["9", "10"]
    assert source.images() == [str(tmp_path / "pics" / "b.png"), str(tmp_path / "pics" / "a.png")]


def test_options_raw_captions_and_max_words(data):
    assert AlbefCaptionSource(data, clean_captions=False)[0].caption == "A dog, running."
    assert AlbefCaptionSource(data, max_words=2)[2].caption == "the dog"
    with pytest.raises(ConfigError, match="max_words must be at least 1"):
        AlbefCaptionSource(data, max_words=0)


# --- errors: file, record and key -------------------------------------------------------------------------------

GOOD = {"image_path": "pics/a.png", "caption": "fine", "image_id": "a"}
BAD_RECORDS = [
    ("not an object", ["a"], r"record 2: expected a JSON object, got list"),
    ("missing key", {"image_path": "pics/a.png", "caption": "x"}, r"record 2: missing key 'image_id'"),
    ("missing path", {"caption": "x", "image_id": "a"}, r"record 2: missing key 'image_path'"),
    ("caption type", {**GOOD, "caption": ["x"]}, r"record 2: key 'caption' has the wrong type \(list\)"),
    ("image_id bool", {**GOOD, "image_id": True}, r"record 2: key 'image_id' has the wrong type \(bool\)"),
    ("image_id float", {**GOOD, "image_id": 1.5}, r"record 2: key 'image_id' has the wrong type \(float\)"),
    ("path type", {**GOOD, "image_path": 3}, r"record 2: key 'image_path' has the wrong type \(int\)"),
    ("blank path", {**GOOD, "image_path": " "}, r"record 2: key 'image_path' is blank"),
    ("missing image", {**GOOD, "image_path": "pics/zz.png"},
     r"record 2: key 'image_path': image file .*zz\.png does not exist"),
    ("blank caption", {**GOOD, "caption": "  "}, r"record 2: key 'caption' is blank"),
    ("caption cleans to nothing", {**GOOD, "caption": "?!"}, r"record 2: key 'caption' is empty once cleaned"),
]
SKIP_KIND = {"missing image": "missing_images", "blank caption": "blank_captions",
             "caption cleans to nothing": "blank_captions"}


@pytest.mark.parametrize("name, item, message", BAD_RECORDS, ids=[case[0] for case in BAD_RECORDS])
def test_bad_record_names_file_record_and_key_or_is_skipped(name, item, message, tmp_path):
    make_images(tmp_path, ["a.png"])
    path = write_json(tmp_path / "ann.json", [GOOD, item, GOOD])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))} {message}"):
        AlbefCaptionSource(path)
    source = AlbefCaptionSource(path, skip_bad=True)
    assert [r.line for r in source.records] == [1, 3]
    assert getattr(source.skipped, SKIP_KIND.get(name, "malformed_lines")) == 1 and source.skipped.total == 1


@pytest.mark.parametrize("content, message", [
    (b"[{", r"not valid JSON \(Expecting property name enclosed in double quotes at line 1 column 3\)"),
    (b'{"a": 1}', r"expected a JSON array of .* got a dict"),
    (b"\xff[]", r"not valid UTF-8 text \(byte 1\)"),
])
def test_whole_file_errors_name_the_file_even_when_skipping(content, message, tmp_path):
    path = tmp_path / "ann.json"
    path.write_bytes(content)
    for skip_bad in (False, True):
        with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: {message}"):
            AlbefCaptionSource(path, skip_bad=skip_bad)


def test_no_usable_records_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="no usable records"):
        AlbefCaptionSource(write_json(tmp_path / "empty.json", []))
    with pytest.raises(DataError, match=r"annotation file .*nope\.json does not exist"):
        AlbefCaptionSource(tmp_path / "nope.json")


def test_check_images_off_and_byte_order_mark(tmp_path):
    path = tmp_path / "ann.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([GOOD]).encode())
    source = AlbefCaptionSource(path, check_images=False)
    assert source[0].image == str(tmp_path / "pics" / "a.png") and source.image_ids == ["a"]
