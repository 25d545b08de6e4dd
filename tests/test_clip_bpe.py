"""ClipTokenizer gives the same ids as open_clip, survives its spec, and names a bad merges file."""

from __future__ import annotations

import gzip
import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest

from jaxretrieval.data.clip_bpe import ClipTokenizer
from jaxretrieval.data.tokenizers import build_tokenizer
from jaxretrieval.errors import DataError

open_clip = pytest.importorskip("open_clip")

MERGES_FILE = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"

FRAGMENTS = [
    "A photo of", "the", "DOG", "Cat", "mIxEd CaSe", "dog's", "isn't", "they're", "we've", "I'm", "you'll",
    "he'd", "it'S", "rock 'n' roll", "''", "hello, world!", "?!", "...", "e-mail", "snake_case", "(brackets)",
    "[x]", "{y}", "#tag", "@user", "$9.99", "50%", "3.14159", "2024-01-31", "１２３", "½", "Ⅻ", "x²", "0",
    "café", "naïve", "Ångström", "Straße", "İstanbul", "ﬁne", "ｆｕｌｌ ｗｉｄｔｈ", "東京タワー", "北京",
    "한국어", "😀", "🐶🐱", "👍🏽", "🇯🇵", "שלום", "مرحبا بالعالم", "Ελληνικά", "Русский", "हिन्दी", "ไทย",
    "&amp;", "&lt;b&gt;bold&lt;/b&gt;", "&amp;amp;lt;", "&quot;quoted&quot;", "&#39;", "&nbsp;", "&eacute;",
    "â€™", "Ã©", "\u201csmart quotes\u201d", "\u2018single\u2019", "\u2014", "\u00a0", "\u200b", "\u0345",
    "it'ſ", "\x1b[31mred\x1b[0m", "\x00", "\x7f", "\r\n", "\t", "\n\n", "   ", "\u3000", "\x0b",
    "<start_of_text>", "<END_OF_TEXT>", "</w>", "<|endoftext|>", "a\u0301", "ĳ", "Ǆ", "ﬀ",
]


def varied_texts(count: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = ["", " ", "\n\t ", "!", "!!", "!?", "a", "A.", *FRAGMENTS]
    separators = [" ", "", "  ", "\n", "\t", " \n "]
    while len(texts) < count:
        picks = rng.choices(FRAGMENTS, k=rng.randint(1, 12))
        texts.append("".join(piece + rng.choice(separators) for piece in picks))
    return texts


def long_text() -> str:
    return " ".join(f"word{i} and-more, café 東京!" for i in range(200))


@pytest.fixture(scope="module")
def tok() -> ClipTokenizer:
    return ClipTokenizer.from_file(MERGES_FILE)


def reference(texts: list[str], context_length: int = 77) -> np.ndarray:
    return open_clip.tokenize(texts, context_length=context_length).numpy()


def test_id_layout(tok: ClipTokenizer) -> None:
    assert (tok.vocab_size, tok.pad_id, tok.sot_id, tok.eot_id, tok.context_length) == (49408, 0, 49406, 49407, 77)
    ids = tok("a photo of a cat")
    assert ids.dtype == np.int32 and ids.shape == (1, 77)
    assert ids[0, 0] == tok.sot_id and tok.eot_id in ids[0]


def test_matches_open_clip_tokenize(tok: ClipTokenizer) -> None:
    texts = [*varied_texts(), long_text()]
    ours = tok(texts)
    theirs = reference(texts)
    mismatched = [texts[i] for i in np.flatnonzero((ours != theirs).any(axis=1))]
    assert not mismatched, f"{len(mismatched)} texts differ from open_clip, e.g. {mismatched[:3]!r}"


def test_matches_open_clip_model_tokenizer(tok: ClipTokenizer) -> None:
    texts = varied_texts(count=150, seed=1)
    np.testing.assert_array_equal(tok(texts), open_clip.get_tokenizer("ViT-B-32")(texts).numpy())


@pytest.mark.parametrize("context_length", [2, 5, 32, 64])
def test_matches_open_clip_at_other_context_lengths(tok: ClipTokenizer, context_length: int) -> None:
    short = ClipTokenizer.from_spec({**tok.to_spec(), "context_length": context_length})
    texts = [*varied_texts(count=100, seed=context_length), long_text()]
    ours = short(texts)
    assert ours.shape == (len(texts), context_length)
    np.testing.assert_array_equal(ours, reference(texts, context_length))


def test_truncation_keeps_eot_last(tok: ClipTokenizer) -> None:
    row = tok(long_text())[0]
    assert row[0] == tok.sot_id and row[-1] == tok.eot_id
    assert (row[1:-1] != tok.eot_id).all()
    np.testing.assert_array_equal(row[1:-1], tok.encode(long_text())[:75])


def test_single_string_and_empty_inputs(tok: ClipTokenizer) -> None:
    np.testing.assert_array_equal(tok("a dog"), tok(["a dog"]))
    assert tok([]).shape == (0, 77)
    assert tok("")[0, :3].tolist() == [tok.sot_id, tok.eot_id, 0]


def test_decode(tok: ClipTokenizer) -> None:
    for text in ["a photo of a dog.", "Hello, World!? café 東京 😀", "isn't it!!"]:
        row = tok(text)[0]
        content = [int(i) for i in row[1 : int(np.argmax(row == tok.eot_id))]]
        assert tok.decode(row) == open_clip.tokenizer._tokenizer.decode(content).strip()
    assert tok.decode(tok("wow!!")[0]) == "wow !!"


def test_spec_round_trip(tok: ClipTokenizer) -> None:
    spec = json.loads(json.dumps(tok.to_spec()))
    assert spec["kind"] == "clip_bpe" and spec["context_length"] == 77 and len(spec["merges"]) == 48894
    rebuilt = build_tokenizer(spec)
    assert isinstance(rebuilt, ClipTokenizer)
    texts = varied_texts(count=60, seed=2)
    np.testing.assert_array_equal(rebuilt(texts), tok(texts))
    unpickled = pickle.loads(pickle.dumps(rebuilt))
    np.testing.assert_array_equal(unpickled(texts), tok(texts))
    with pytest.raises(ValueError, match="lacks merges"):
        build_tokenizer({"kind": "clip_bpe", "context_length": 77})


def test_plain_text_merges_file(tmp_path: Path, tok: ClipTokenizer) -> None:
    path = tmp_path / "merges.txt"
    path.write_bytes(gzip.decompress(MERGES_FILE.read_bytes()))
    texts = varied_texts(count=40, seed=3)
    np.testing.assert_array_equal(ClipTokenizer.from_file(path, context_length=16)(texts), reference(texts, 16))


def test_missing_merges_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.txt.gz"
    with pytest.raises(DataError, match="nowhere.txt.gz.*does not exist"):
        ClipTokenizer.from_file(path)


@pytest.mark.parametrize(
    "content",
    [
        b"\x1f\x8b\x08\x00 not really gzip",
        gzip.compress(b"#version: 0.2\ni n\nt h", mtime=0)[:-12],
        b"\xff\xfe\x00 binary",
        b"#version: 0.2\n",
        b"#version: 0.2\nthis line has three\n",
        b"#version: 0.2\nhello world\n",
    ],
)
def test_corrupt_merges_file_is_named(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken_merges.txt.gz"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="broken_merges.txt.gz"):
        ClipTokenizer.from_file(path)


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        ClipTokenizer(["i n"], context_length=1)
    with pytest.raises(TypeError):
        ClipTokenizer("i n")
