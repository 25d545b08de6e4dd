"""Property-based fuzzing of every reader of user input: config files and overrides, caption annotations (JSON
lines, TSV), PAB queries, re-id folders and COCO-style JSON, tokenizer files and specs, images.

Each property: the call returns normally (and what it returns is well-formed) or raises the documented error
type (ConfigError / DataError) whose message names the file, and the line where there is one -- never a raw
JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, IndexError, PIL, YAML or numpy error.
Run with `--hypothesis-show-statistics` to see how many cases each property ran.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import random
import re
import shutil
import tempfile
import typing
from pathlib import Path

import numpy as np
import pytest
import sentencepiece
import yaml
from fuzzing import fuzz
from hypothesis import event, given
from hypothesis import strategies as st
from PIL import Image

from jaxretrieval.config import Config, ConfigError, load_config, save_config
from jaxretrieval.data.clip_bpe import ClipTokenizer
from jaxretrieval.data.pab import gallery_images, read_queries
from jaxretrieval.data.reid import SPLITS, ReidEvalTransform, dukemtmc, market1501, street2shop
from jaxretrieval.data.sources import CaptionSource, DataError
from jaxretrieval.data.spm import SentencePieceTokenizer
from jaxretrieval.data.tokenizers import WordTokenizer, build_tokenizer
from jaxretrieval.data.transforms import Preprocess


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def fresh_folder(scratch: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=scratch))


# ---------------------------------------------------------------------------------------------------------------
# Shared strategies

# Text the YAML / JSON parsers treat specially, and values that have broken readers before.
TRICKY = [
    "", " ", "\t", "[", "]", "{", "}", "[1, 2", "{a: 1}", "null", "~", "true", "yes", "off", "0x_", "0x1F", "0b",
    "1e999", "-.inf", ".nan", "1_000", "2020-13-45", "2001-12-14t21:59:43.10-99:99", "!!int abc", "!!bool x",
    "!!int ''", "!!timestamp x", "!!float .", "!!python/object:os.system x", "&a [*a]", "*a", "!!binary ###",
    "!!set {a}", "? [a]\n: b", "'", '"', "- a", "a: b: c", "|", ">", "%YAML 1.1", "---", "...", "#", "\x00",
    "\ufeff", "\u2028", "=", "==", "a=b", "-" + "9" * 30, "é", "東京", "\U0001f600",
]
# More digits than Python converts to an int (4300), and nesting deeper than a parser recurses.
LONG = st.sampled_from([4301, 5000]).map(lambda n: "9" * n) | st.sampled_from([300, 1100]).map(lambda n: "[" * n)
any_text = st.text(st.characters(exclude_categories=()), max_size=30)  # surrogates included
plain_text = st.text(max_size=30)
tricky_text = st.one_of(st.sampled_from(TRICKY), LONG, plain_text)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-10**60, 10**60),
                         st.floats(allow_nan=False), tricky_text)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3) |
                           st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
blank = st.sampled_from(["", " ", "   ", "\t", "\n", " \u3000 ", "\x1c"])


def with_tail(path: Path, message: str) -> str:
    """The part of `message` after `path`; fails if the message does not name the path."""
    assert str(path) in message, f"message does not name {path}: {message!r}"
    return message.split(str(path), 1)[1]


def named_line(path: Path, message: str, lines: int) -> int | None:
    """The line number of a `path:N:` message (checked to be in 1..lines), or None for a file-level message."""
    tail = with_tail(path, message)
    match = re.match(r":(\d+)(:|\s)", tail)
    if match is None:
        return None
    number = int(match.group(1))
    assert 1 <= number <= lines, message
    return number


# ---------------------------------------------------------------------------------------------------------------
# Config files and overrides


def _key_paths(cls: type, prefix: str = "") -> list[str]:
    paths = []
    for field in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[field.name]
        path = f"{prefix}{field.name}"
        paths += _key_paths(tp, path + ".") if dataclasses.is_dataclass(tp) else [path]
    return paths


KEY_PATHS = _key_paths(Config)
SECTIONS = [field.name for field in dataclasses.fields(Config)]
ODD_KEYS = ["", ".", "a..b", ".model", "model.", "model..name", "model.name.x", "train.lr.y", "é.ü", "東",
            "model.image", "train", "  train.lr  ", "data.mean[0]", "sharding.0"]
config_keys = st.one_of(st.sampled_from(KEY_PATHS), st.sampled_from(ODD_KEYS), st.text(max_size=12))
config_values = st.one_of(tricky_text, json_values.map(json.dumps), st.integers(-10**400, 10**400).map(str),
                          st.floats().map(repr))
ZERO_DIVISORS = {"model.image.heads", "model.text.heads", "model.multiway.heads", "model.image.patch_size"}


overrides = st.lists(st.one_of(st.builds("{}={}".format, config_keys, config_values), plain_text), max_size=4)


@pytest.mark.parametrize("key", sorted(ZERO_DIVISORS))
def test_zero_divisor_is_a_config_error(key):
    family = ["model.name=beit3_tiny"] if key.startswith("model.multiway") else []
    with pytest.raises(ConfigError):
        load_config(None, [*family, f"{key}=0"])


@fuzz(300)
@given(overrides=overrides)
def test_overrides_give_a_config_or_a_config_error(overrides):
    try:
        config = load_config(None, overrides)
    except ConfigError as e:
        event("error")
        message = str(e)
        assert "overrides" in message or any(o in message for o in overrides), message
        return
    assert isinstance(config, Config)


def _section_doc() -> st.SearchStrategy:
    field_values = st.one_of(json_values, st.sampled_from(KEY_PATHS))
    section = st.dictionaries(st.one_of(st.sampled_from([k.split(".")[-1] for k in KEY_PATHS]), st.text(max_size=6)),
                              field_values, max_size=4)
    return st.dictionaries(st.one_of(st.sampled_from(SECTIONS), st.text(max_size=6)),
                           st.one_of(section, json_values), max_size=4)


CONFIG_TEXTS = [path.read_text() for path in sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml"))]


def _edited(text: str, line: int, value: str) -> bytes:
    """One of the repository's configs with the value on one line replaced."""
    lines = text.splitlines()
    index = line % len(lines)
    lines[index] = f"{lines[index].split(':', 1)[0]}: {value}"
    return "\n".join(lines).encode("utf-8", "surrogatepass")


config_files = st.one_of(
    st.sampled_from(CONFIG_TEXTS).map(str.encode),
    st.builds(_edited, st.sampled_from(CONFIG_TEXTS), st.integers(0, 100), st.one_of(tricky_text, any_text)),
    _section_doc().map(lambda doc: yaml.safe_dump(doc, allow_unicode=True).encode()),
    st.builds(lambda key, value: f"{key.split('.')[0]}:\n  {key.rsplit('.', 1)[-1]}: {value}\n".encode(),
              st.sampled_from(KEY_PATHS), tricky_text),
    st.text(max_size=80).map(lambda text: text.encode("utf-8", "surrogatepass")),
    st.binary(max_size=80),
)


@fuzz(300)
@given(content=config_files)
def test_config_files_give_a_config_or_an_error_naming_the_file(scratch, content):
    path = scratch / "config.yaml"
    path.write_bytes(content)
    try:
        config = load_config(path)
    except ConfigError as e:
        event("error")
        with_tail(path, str(e))
        return
    saved = scratch / "saved.yaml"
    save_config(config, saved)
    assert load_config(saved) == config  # what loads is saved and reloaded unchanged


# ---------------------------------------------------------------------------------------------------------------
# Caption annotations: JSON lines and TSV


def _caption_object() -> st.SearchStrategy[dict]:
    caption = st.one_of(plain_text, blank, st.lists(st.one_of(plain_text, blank), max_size=3), json_values)
    image = st.one_of(st.sampled_from(["a.png", "b.png", "missing.png", "", "sub", "/nowhere/x.png", "a\x00.png"]),
                      any_text, json_values)
    optional = st.fixed_dictionaries({}, optional={
        "image_id": st.one_of(st.integers(), st.integers(-10**50, 10**50), plain_text, json_values),
        "hard_i": json_values, "normal": json_values, "anomaly": st.one_of(st.booleans(), plain_text),
        "scene": json_values, "other": json_values})
    return st.builds(lambda required, extra: {**extra, **required},
                     st.fixed_dictionaries({}, optional={"image": image, "caption": caption}), optional)


def _good_caption_object() -> st.SearchStrategy[dict]:
    """Lines a reader must accept (unless the caption is blank), so that whole files read often enough."""
    return st.fixed_dictionaries({"image": st.sampled_from(["a.png", "b.png"]),
                                  "caption": st.one_of(plain_text, st.lists(plain_text, min_size=1, max_size=3))},
                                 optional={"image_id": st.one_of(st.integers(0, 3), st.sampled_from(["0", "x"]))})


def _jsonl_line() -> st.SearchStrategy[bytes]:
    return st.one_of(
        _good_caption_object().map(lambda item: json.dumps(item, ensure_ascii=False).encode()),
        _caption_object().map(lambda item: json.dumps(item).encode()),
        _caption_object().map(lambda item: json.dumps(item, ensure_ascii=False).encode("utf-8", "surrogatepass")),
        json_values.map(lambda value: json.dumps(value).encode()),
        st.one_of(st.sampled_from(TRICKY), LONG.map('{{"image": "a.png", "caption": "x", "image_id": {}}}'.format),
                  st.sampled_from(['{"caption": "x", "image": "a.png"', '{"image": "a.png", "caption": "\\ud800"}']),
                  ).map(str.encode),
        st.binary(max_size=20),
    ).map(lambda line: line.replace(b"\n", b" "))


def _tsv_line() -> st.SearchStrategy[bytes]:
    field = st.one_of(st.sampled_from(["a.png", "b.png", "missing.png", ""]), plain_text, blank)
    return st.one_of(
        st.builds("{}\t{}".format, st.sampled_from(["a.png", "b.png"]), plain_text).map(str.encode),
        st.builds(lambda image, caption: f"{image}\t{caption}".encode("utf-8", "surrogatepass"), field,
                  st.one_of(plain_text, blank, any_text)),
        st.builds(lambda a, b, c: f"{a}\t{b}\t{c}".encode(), field, plain_text, plain_text),
        plain_text.map(str.encode),
        st.binary(max_size=20),
    ).map(lambda line: line.replace(b"\n", b" ").replace(b"\r", b" "))


@pytest.fixture(scope="module")
def image_root(scratch) -> Path:
    root = scratch / "images"
    root.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (4, 4)).save(root / name)
    return root


def _check_source(path: Path, root: Path, lines: int, skip_bad: bool) -> CaptionSource | None:
    try:
        source = CaptionSource(path, root, skip_bad=skip_bad)
    except DataError as e:
        event(f"error {'skipping' if skip_bad else 'strict'}")
        line = named_line(path, str(e), lines)
        assert line is not None or "no usable records" in str(e), str(e)
        assert line is None or not skip_bad, str(e)
        return None
    assert len(source) > 0 and all(record.caption.strip() for record in source.records)
    assert all(record.file == 0 and 1 <= record.line <= lines for record in source.records)
    assert sorted(set(source.text_to_image())) == list(range(len(source.images())))
    return source


def _check_both_modes(path: Path, root: Path, content: list[bytes]) -> None:
    path.write_bytes(b"\n".join(content))
    strict = _check_source(path, root, len(content), skip_bad=False)
    skipping = _check_source(path, root, len(content), skip_bad=True)
    if strict is not None:  # nothing to skip: both read the same records
        assert skipping is not None and skipping.records == strict.records and skipping.skipped.total == 0


@fuzz(250)
@given(content=st.lists(_jsonl_line(), max_size=6))
def test_json_lines_annotations_read_or_name_file_and_line(scratch, image_root, content):
    _check_both_modes(scratch / "train.jsonl", image_root, content)


@fuzz(150)
@given(content=st.lists(_tsv_line(), max_size=6))
def test_tsv_annotations_read_or_name_file_and_line(scratch, image_root, content):
    _check_both_modes(scratch / "train.tsv", image_root, content)


# ---------------------------------------------------------------------------------------------------------------
# PAB queries (read by jaxretrieval.predict)


def _query_line() -> st.SearchStrategy[bytes]:
    item = st.fixed_dictionaries({}, optional={
        "query_index": st.one_of(st.integers(0, 5), st.sampled_from(["0", "1", "q"]), json_values),
        "caption": st.one_of(plain_text, blank, any_text, json_values)})
    return st.one_of(item.map(lambda value: json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")),
                     json_values.map(lambda value: json.dumps(value).encode()),
                     st.sampled_from(TRICKY).map(str.encode), st.binary(max_size=16),
                     ).map(lambda line: line.replace(b"\n", b" "))


@fuzz(200)
@given(content=st.lists(_query_line(), max_size=5))
def test_pab_queries_read_or_name_file_and_line(scratch, content):
    path = scratch / "query.json"
    path.write_bytes(b"\n".join(content))
    try:
        ids, captions = read_queries(path)
    except DataError as e:
        event("error")
        line = named_line(path, str(e), len(content))
        assert line is not None or "no queries" in str(e), str(e)
        return
    assert len(ids) == len(set(ids)) == len(captions) > 0
    assert all(isinstance(i, str) for i in ids) and all(caption.strip() for caption in captions)


file_names = st.text(st.characters(exclude_characters="/\x00", exclude_categories=("Cs",)), min_size=1, max_size=12
                     ).filter(lambda name: name not in (".", "..") and len(name.encode()) < 200)


@fuzz(100)
@given(entries=st.lists(st.tuples(file_names, st.sampled_from([".jpg", ".JPEG", ".png", ".webp", ".txt", ""]),
                                  st.booleans()), max_size=6))
def test_pab_gallery_folders_list_or_name_the_folder(scratch, entries):
    folder = fresh_folder(scratch)
    try:
        for stem, suffix, is_folder in entries:
            path = folder / f"{stem}{suffix}"
            if not path.exists():
                path.mkdir() if is_folder else path.write_bytes(b"")
        try:
            stems, paths = gallery_images(folder)
        except DataError as e:
            event("error")
            with_tail(folder, str(e))
            return
        assert stems == sorted(set(stems)) and [Path(path).stem for path in paths] == stems
        assert all(Path(path).is_file() for path in paths)
    finally:
        shutil.rmtree(folder)


# ---------------------------------------------------------------------------------------------------------------
# Re-id: Market-1501 / DukeMTMC folders and COCO-style JSON (Street2Shop, DeepFashion)

_DIGITS = "0123456789-١٣٥"  # Arabic-Indic digits are digits to int() and to \d
market_names = st.one_of(
    st.builds("{}_c{}s1_{}".format, st.integers(-3, 3000), st.sampled_from("01234567899٣"),
              st.text("0123456789_", max_size=6)),
    st.builds("{}_c{}{}".format, st.text(_DIGITS, max_size=5), st.text(_DIGITS, max_size=2),
              st.text("abc_s0", max_size=4)),
    file_names,
)
market_files = st.lists(st.tuples(market_names, st.sampled_from([".jpg", ".jpg", ".JPG", ".png", ""])), max_size=6)


@fuzz(150)
@given(files=st.dictionaries(st.sampled_from(SPLITS), market_files, max_size=3),
       reader=st.sampled_from([market1501, dukemtmc]), split=st.sampled_from(SPLITS))
def test_reid_folders_read_or_name_the_file(scratch, files, reader, split):
    root = fresh_folder(scratch)
    try:
        for part, names in files.items():
            folder = root / {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}[part]
            folder.mkdir()
            for stem, suffix in names:
                (folder / f"{stem}{suffix}").write_bytes(b"")
        try:
            source = reader(root, split)
        except DataError as e:
            event("error")
            with_tail(root, str(e))
            return
        pids, camids = source.pids, source.camids
        assert len(source) > 0 and (pids >= 0).all() and (camids >= 0).all() and (camids < 8).all()
        if split == "train":
            assert sorted(set(pids.tolist())) == list(range(source.num_ids))
    finally:
        shutil.rmtree(root)


coco_image = st.fixed_dictionaries({}, optional={"id": st.one_of(st.integers(0, 4), plain_text, json_values),
                                                  "file_name": st.one_of(st.sampled_from(["x.jpg", "y.jpg"]),
                                                                         json_values)})
coco_annotation = st.fixed_dictionaries({}, optional={
    "image_id": st.one_of(st.integers(0, 4), json_values), "pair_id": st.one_of(st.integers(-2, 3), json_values),
    "source": st.one_of(st.sampled_from(["user", "shop", "User", ""]), json_values)})
coco_docs = st.one_of(
    st.fixed_dictionaries({}, optional={"images": st.one_of(st.lists(st.one_of(coco_image, json_values), max_size=5),
                                                            json_values),
                                        "annotations": st.one_of(st.lists(st.one_of(coco_annotation, json_values),
                                                                          max_size=6), json_values)}
                          ).map(lambda doc: json.dumps(doc).encode()),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.sampled_from(TRICKY).map(str.encode),
    st.binary(max_size=40),
)


@fuzz(200)
@given(content=coco_docs, split=st.sampled_from(SPLITS), by_source=st.booleans())
def test_coco_reid_json_reads_or_names_the_file(scratch, content, split, by_source):
    path = scratch / "train.json"
    path.write_bytes(content)
    try:
        source = street2shop(scratch, path, split, by_source=by_source)
    except DataError as e:
        event("error")
        with_tail(path, str(e))
        return
    assert len(source) > 0 and (source.pids >= 0).all()
    assert set(source.camids.tolist()) == {1 if split == "gallery" else 0}


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers: vocabulary files, CLIP BPE merges, sentencepiece models, saved specs, arbitrary text

# Text with everything tokenizers find hard: lone surrogates, special-token look-alikes, controls, long runs.
SPECIAL_TEXT = ["<s>", "</s>", "<pad>", "<unk>", "<mask>", "<start_of_text>", "<end_of_text>", "&amp;", "&#x0;",
                "\ud800", "\udfff", "\x00", "\u200b", "ﬁ", "İ", "ß", "\U0001f600" * 3, "a" * 300, "'s", "ǅ"]
texts = st.lists(st.one_of(any_text, st.lists(st.sampled_from(SPECIAL_TEXT) | any_text, max_size=6).map("".join)),
                 min_size=1, max_size=4)
WORDS = ["a", "red", "circle", "the", "left", "café", "東京", "x2"]


def _merges_for(words: list[str]) -> list[str]:
    """BPE merges that build each word left to right (valid: every symbol is a byte or an earlier merge)."""
    merges, seen = [], set()
    for word in words:
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            merge = f"{symbols[0]} {symbols[1]}"
            if merge not in seen:
                seen.add(merge)
                merges.append(merge)
            symbols = [symbols[0] + symbols[1], *symbols[2:]]
    return merges


MERGES = _merges_for(["the", "red", "circle", "left", "and", "in", "on", "a"])


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> bytes:
    folder = tmp_path_factory.mktemp("spm")
    rng = random.Random(0)
    words = ["".join(rng.choices(["ka", "ri", "to", "東", "ß", "ñu"], k=rng.randint(1, 3))) for _ in range(100)]
    (folder / "corpus.txt").write_text("\n".join(" ".join(rng.choices(words, k=6)) for _ in range(500)),
                                       encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(input=str(folder / "corpus.txt"), model_prefix=str(folder / "m"),
                                             vocab_size=40, minloglevel=2)
    return (folder / "m.model").read_bytes()


@pytest.fixture(scope="module")
def tokenizers(spm_model) -> list:
    return [WordTokenizer(WORDS, 12), ClipTokenizer(MERGES, 12), SentencePieceTokenizer(spm_model, 12)]


def _check_rows(tokenizer, batch: list[str]) -> None:
    rows = tokenizer(batch)
    assert rows.shape == (len(batch), tokenizer.context_length) and rows.dtype == np.int32
    assert (rows[:, 0] == tokenizer.sot_id).all() and (rows == tokenizer.eot_id).any(axis=1).all()
    assert (rows >= 0).all() and (rows < tokenizer.vocab_size).all()


@fuzz(200)
@given(batch=texts)
def test_tokenizers_take_any_text(tokenizers, batch):
    for tokenizer in tokenizers:
        _check_rows(tokenizer, batch)


vocab_files = st.one_of(
    st.lists(st.one_of(st.sampled_from(WORDS + ["Red", "two words", "", "  a  ", "a", "<eot>", "x_y"]), plain_text),
             max_size=6).map(lambda words: "\n".join(words).encode("utf-8", "surrogatepass")),
    st.binary(max_size=40),
).flatmap(lambda raw: st.sampled_from([raw, b"\xef\xbb\xbf" + raw]))


@fuzz(150)
@given(content=vocab_files)
def test_vocabulary_files_load_or_name_the_file(scratch, content):
    path = scratch / "vocab.txt"
    path.write_bytes(content)
    try:
        tokenizer = WordTokenizer.from_file(path, 8)
    except DataError as e:
        event("error")
        with_tail(path, str(e))
        return
    _check_rows(tokenizer, ["a red circle", ""])


merge_lines = st.one_of(st.sampled_from(MERGES + ["t h e", "th", "", " ", "é e", "ĠĠ Ġ", "t h</w>"]), plain_text)
merges_files = st.one_of(
    st.lists(merge_lines, max_size=8).map(lambda lines: "\n".join(["#version: 0.2", *lines]).encode()),
    st.binary(max_size=40),
).flatmap(lambda raw: st.sampled_from([raw, gzip.compress(raw, mtime=0), gzip.compress(raw, mtime=0)[:-5]]))


@fuzz(150)
@given(content=merges_files)
def test_clip_merges_files_load_or_name_the_file(scratch, content):
    path = scratch / "merges.txt.gz"
    path.write_bytes(content)
    try:
        tokenizer = ClipTokenizer.from_file(path, 8)
    except DataError as e:
        event("error")
        with_tail(path, str(e))
        return
    _check_rows(tokenizer, ["the red circle", "\ud800 <end_of_text>"])


def _damaged(model: bytes) -> st.SearchStrategy[bytes]:
    cut = st.integers(0, len(model)).map(lambda n: model[:n])
    flips = st.lists(st.tuples(st.integers(0, len(model) - 1), st.integers(0, 255)), min_size=1, max_size=8).map(
        lambda changes: bytes(_apply(model, changes)))
    return st.one_of(cut, flips, st.binary(max_size=64))


def _apply(model: bytes, changes: list[tuple[int, int]]) -> bytearray:
    out = bytearray(model)
    for index, value in changes:
        out[index] = value
    return out


@fuzz(200)
@given(data=st.data())
def test_sentencepiece_files_load_or_name_the_file(scratch, spm_model, data):
    path = scratch / "beit3.spm"
    path.write_bytes(data.draw(_damaged(spm_model)))
    try:
        tokenizer = SentencePieceTokenizer.from_file(path, 8)
    except DataError as e:
        event("error")
        with_tail(path, str(e))
        return
    _check_rows(tokenizer, ["kari tomé 東", "<mask> \ud800"])


def _specs(spm_model: bytes) -> st.SearchStrategy:
    import base64

    model = st.one_of(st.just(base64.b64encode(spm_model).decode()), st.sampled_from(["", "%%%", "é", "AAAA"]),
                      json_values)
    spec = st.fixed_dictionaries({}, optional={
        "kind": st.one_of(st.sampled_from(["words", "clip_bpe", "sentencepiece", "bpe"]), json_values),
        "vocab": st.one_of(st.just(WORDS), st.lists(st.one_of(st.sampled_from(WORDS), plain_text), max_size=4),
                           json_values),
        "merges": st.one_of(st.just(MERGES), st.lists(merge_lines, max_size=4), json_values),
        "model": model,
        "context_length": st.one_of(st.integers(-2, 80), st.sampled_from([True, "8", 8.0, None]), json_values)})
    return st.one_of(spec, json_values)


@fuzz(200)
@given(data=st.data())
def test_tokenizer_specs_build_or_raise_data_error(spm_model, data):
    spec = data.draw(_specs(spm_model))
    try:
        tokenizer = build_tokenizer(spec)
    except DataError as e:
        event("error")
        assert "tokenizer" in str(e) or "context_length" in str(e) or "merge" in str(e) or "vocabulary" in str(e) \
            or "sentencepiece" in str(e), str(e)
        return
    assert build_tokenizer(tokenizer.to_spec()).to_spec() == tokenizer.to_spec()
    _check_rows(tokenizer, ["a red circle"])


# ---------------------------------------------------------------------------------------------------------------
# Images


def _encoded(fmt: str) -> bytes:
    pixels = (np.random.default_rng(0).random((12, 10, 3)) * 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


IMAGES = [_encoded(fmt) for fmt in ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")]
# A BMP header declaring far more pixels than PIL will decode (its decompression-bomb check).
BOMB = bytearray(IMAGES[2])
BOMB[18:26] = (40000).to_bytes(4, "little") * 2
image_files = st.one_of(st.sampled_from(IMAGES).flatmap(_damaged), st.just(bytes(BOMB)))


@pytest.fixture(scope="module")
def small_bomb_limit():
    """PIL's decompression-bomb limit lowered to 1M pixels (errors past 2M), so that damaged headers claiming
    large sizes fail in PIL's check instead of decoding 100M pixels each: the same code path, in milliseconds."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 1 << 20
    yield
    Image.MAX_IMAGE_PIXELS = limit


@fuzz(200)
@given(content=image_files)
def test_image_files_decode_or_name_the_file(scratch, small_bomb_limit, content):
    path = scratch / "image.png"
    path.write_bytes(content)
    for transform in (Preprocess(8, (0.5,) * 3, (0.5,) * 3), ReidEvalTransform((8, 4))):
        try:
            pixels = transform(str(path))
        except DataError as e:
            event(f"error {type(transform).__name__}")
            with_tail(path, str(e))
            continue
        assert pixels.dtype == np.float32 and pixels.shape[-1] == 3 and np.isfinite(pixels).all()
