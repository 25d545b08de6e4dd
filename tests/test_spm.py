"""SentencePieceTokenizer gives unilm BEiT-3's ids (transformers' XLMRobertaTokenizer), survives its spec, names bad
files. The sentencepiece models are trained here on a small generated corpus, so nothing is downloaded.
"""

from __future__ import annotations

import base64
import json
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import sentencepiece

from jaxretrieval.data.spm import SentencePieceTokenizer
from jaxretrieval.data.tokenizers import build_tokenizer

SYLLABLES = ["ka", "ri", "to", "me", "su", "na", "lo", "pe", "chi", "do", "ban", "qu", "ex", "café", "ñu", "über",
             "ß", "東", "京", "日", "Ж"]
FRAGMENTS = [
    "A photo of", "kari", "TOME", "sunalo", "café", "naïve", "Straße", "Ångström", "東京", "日本語", "한국어",
    "Русский", "ωμέγα", "😀", "👍🏽", "ﬁne", "ｆｕｌｌ ｗｉｄｔｈ", "１２３", "x²", "①", "e\u0301", "3.14",
    "2024-01-31", "$9.99", "50%", "hello, world!", "?!", "...", "(brackets)", "dog's", "\u201cquotes\u201d",
    "\u2014", "\u00a0", "\u200b", "\u3000", "\ufeff", "\x00", "\x7f", "\r\n", "\t", "  ", "▁", "▁▁x", "zzzqqq",
    "<s>", "</s>", "<pad>", "<unk>", "<mask>", " <mask> ", "<MASK>", "<s", "s>",
]
# Full-width look-alikes that NFKC turns into special tokens: transformers 4 (unilm's) leaves them to sentencepiece,
# transformers 5 matches them after normalisation, so they are checked against sentencepiece, not transformers.
LOOKALIKES = ["＜s＞", "＜/s＞", "<ｓ>", "＜pad＞", "＜unk＞", "＜mask＞", "a ＜mask＞ b"]


def varied_texts(count: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = ["", " ", "\n\t ", "  leading and trailing  ", "a  b\t\tc\n\nd", *FRAGMENTS]
    texts += [" ".join(f"kari{i} tome, café 東京!" for i in range(40)), "su" * 500]  # cut at context_length
    separators = [" ", "", "  ", "\n", "\t", " \n "]
    while len(texts) < count:
        picks = rng.choices(FRAGMENTS, k=rng.randint(1, 12))
        texts.append("".join(piece + rng.choice(separators) for piece in picks))
    return texts


def train(directory: Path, model_type: str) -> Path:
    rng = random.Random(0)
    words = ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(400)]
    lines = [" ".join(rng.choices(words, k=rng.randint(3, 12))) + rng.choice(["", ".", ",", "!", " 42"])
             for _ in range(3000)]
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(lines), encoding="utf-8")
    prefix = directory / model_type
    sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(prefix), vocab_size=200,
                                             model_type=model_type, minloglevel=2)
    return prefix.with_suffix(".model")


@pytest.fixture(scope="module")
def unigram(tmp_path_factory) -> Path:
    return train(tmp_path_factory.mktemp("unigram"), "unigram")


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> Path:
    return train(tmp_path_factory.mktemp("bpe"), "bpe")


@pytest.fixture(scope="module")
def hf(unigram: Path, tmp_path_factory):
    """transformers' XLMRobertaTokenizer for the unigram model.

    In transformers 5, ``XLMRobertaTokenizer(vocab_file=path)`` ignores the file (5 ids, everything <unk>) and a
    positional path fails; ``from_pretrained`` on a folder holding ``sentencepiece.bpe.model`` reads it.
    """
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf")
    shutil.copy(unigram, folder / "sentencepiece.bpe.model")
    return transformers.XLMRobertaTokenizer.from_pretrained(str(folder))


def unilm_rows(hf, texts: list[str], max_len: int = 64) -> np.ndarray:
    """unilm BEiT-3: tokenize, convert_tokens_to_ids, keep max_len - 2, add bos/eos, pad."""
    rows = []
    for text in texts:
        ids = hf.convert_tokens_to_ids(hf.tokenize(text))[: max_len - 2]
        row = [hf.bos_token_id, *ids, hf.eos_token_id]
        rows.append(row + [hf.pad_token_id] * (max_len - len(row)))
    return np.array(rows, dtype=np.int32)


# transformers' XLMRobertaTokenizer (fairseq's dictionary layout): these four first, then sentencepiece id i as i + 1
# (its fairseq_offset), sentencepiece's own unknown id 0 as <unk>, <mask> after the last piece.
FAIRSEQ_BOS, FAIRSEQ_PAD, FAIRSEQ_EOS, FAIRSEQ_UNK = 0, 1, 2, 3
SPECIAL_STRINGS = ("<s>", "</s>", "<pad>", "<unk>", "<mask>")
# Code point ranges for random text: ASCII, Latin, combining marks, Greek, Cyrillic, Hebrew/Arabic, Devanagari, Thai,
# Hangul jamo, general punctuation (zero-width and bidi marks), letterlike symbols, kana, CJK, Hangul syllables,
# full-width forms, emoji and C0 controls.
CODE_POINTS = [(0x20, 0x7E), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF),
               (0x900, 0x97F), (0xE00, 0xE7F), (0x1100, 0x11FF), (0x2000, 0x206F), (0x2100, 0x21FF), (0x3000, 0x30FF),
               (0x4E00, 0x4EFF), (0xAC00, 0xACFF), (0xFF00, 0xFFEF), (0x1F300, 0x1F64F), (0x0, 0x1F)]


def random_texts(count: int, seed: int) -> list[str]:
    """Random code points from many scripts (most unknown to the 200-piece models), some long enough to be cut."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        length = rng.choice([rng.randint(0, 12), rng.randint(0, 40), rng.randint(60, 200)])
        texts.append("".join(chr(rng.randint(*rng.choice(CODE_POINTS))) for _ in range(length)))
    return texts


def fairseq_ids(sp: sentencepiece.SentencePieceProcessor, text: str) -> list[int]:
    """sentencepiece's own ids for `text`, renumbered as transformers' XLMRobertaTokenizer does it."""
    return [FAIRSEQ_UNK if index == sp.unk_id() else index + 1 for index in sp.encode(text, out_type=int)]


def fairseq_rows(id_lists: list[list[int]], context_length: int) -> np.ndarray:
    """unilm BEiT-3's rows: <s>, the first context_length - 2 ids, </s>, then <pad>."""
    rows = []
    for ids in id_lists:
        row = [FAIRSEQ_BOS, *ids[: context_length - 2], FAIRSEQ_EOS]
        rows.append(row + [FAIRSEQ_PAD] * (context_length - len(row)))
    return np.array(rows, dtype=np.int32)


def test_fairseq_layout_is_transformers(unigram: Path, hf) -> None:
    """The renumbering the sentencepiece reference uses is transformers' vocabulary, piece by piece."""
    sp = sentencepiece.SentencePieceProcessor(model_file=str(unigram))
    vocab = hf.get_vocab()
    assert {name: vocab[name] for name in ("<s>", "<pad>", "</s>", "<unk>")} == {
        "<s>": FAIRSEQ_BOS, "<pad>": FAIRSEQ_PAD, "</s>": FAIRSEQ_EOS, "<unk>": FAIRSEQ_UNK}
    for index in range(3, sp.get_piece_size()):  # 0-2 are sentencepiece's <unk>, <s>, </s>
        assert vocab[sp.id_to_piece(index)] == index + 1, sp.id_to_piece(index)
    assert vocab["<mask>"] == sp.get_piece_size() + 1


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
@pytest.mark.parametrize("context_length", [2, 9, 64])
def test_ids_match_sentencepiece(model_type: str, context_length: int, request) -> None:
    """Text without literal special tokens: sentencepiece's own encoding, renumbered. This is what unilm's
    transformers 4 (slow, sentencepiece-backed) XLMRobertaTokenizer gives, for BPE models too; transformers 5 loads
    every XLM-R model as a tokenizers Unigram model, which splits some runs of unknown characters differently."""
    path = request.getfixturevalue(model_type)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    tok = SentencePieceTokenizer.from_file(path, context_length=context_length)
    texts = [text for text in varied_texts(300, seed=2) + random_texts(600, seed=3)
             if not any(special in text for special in SPECIAL_STRINGS)]
    assert len(texts) > 600
    reference = [fairseq_ids(sp, text) for text in texts]
    # What the comparison covers: unknown characters, ids past the special ones, empty, cut and padded rows.
    flat = [index for ids in reference for index in ids]
    assert FAIRSEQ_UNK in flat and max(flat) > 150 and min(flat) >= FAIRSEQ_UNK
    assert min(map(len, reference)) == 0 and max(map(len, reference)) > 64
    if context_length == 64:  # one text at a time, no row layout in between
        for text, want in zip(texts, reference, strict=True):
            assert tok.encode(text) == want, repr(text)
    ids = tok(texts)
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, fairseq_rows(reference, context_length))


def test_normalised_lookalikes_are_not_special_tokens(unigram: Path) -> None:
    sp = sentencepiece.SentencePieceProcessor(model_file=str(unigram))
    tok = SentencePieceTokenizer.from_file(unigram)
    for text in LOOKALIKES:
        assert tok.encode(text) == fairseq_ids(sp, text), text
        assert not {0, 1, 2, tok.mask_id} & set(tok.encode(text)), text


def test_rows_and_padding_mask(unigram: Path) -> None:
    tok = SentencePieceTokenizer.from_file(unigram, context_length=10)
    ids = tok(["", "kari <pad>", "su" * 50])
    assert ids[0].tolist() == [0, 2] + [1] * 8
    assert ids[1, -1] == 1 and 1 in ids[1, 1:4].tolist()  # the literal <pad> is a real token, not padding
    assert ids[2, -1] == 2 and (ids[2] != 1).all()
    length = (ids != 1).cumsum(1).argmax(1) + 1
    np.testing.assert_array_equal(tok.padding_mask(ids), np.arange(10) >= length[:, None])
    np.testing.assert_array_equal(tok.padding_mask(ids[1]), tok.padding_mask(ids)[1])
    assert tok(["kari tome"]).shape == tok("kari tome").shape == (1, 10)


def test_decode(unigram: Path) -> None:
    tok = SentencePieceTokenizer.from_file(unigram)
    assert tok.decode(tok("  kari   tome café ")[0]) == "kari tome café"
    assert tok.decode(tok("")[0]) == ""


def test_spec_round_trip(unigram: Path) -> None:
    tok = SentencePieceTokenizer.from_file(unigram, context_length=20)
    spec = json.loads(json.dumps(tok.to_spec()))
    assert spec["kind"] == "sentencepiece" and base64.b64decode(spec["model"]) == unigram.read_bytes()
    rebuilt = build_tokenizer(spec)
    assert isinstance(rebuilt, SentencePieceTokenizer) and rebuilt.context_length == 20
    texts = varied_texts(100)
    np.testing.assert_array_equal(rebuilt(texts), tok(texts))
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(tok))(texts), tok(texts))


def test_spm_suffix_and_clear_errors(unigram: Path, tmp_path: Path) -> None:
    renamed = tmp_path / "beit3.spm"
    shutil.copy(unigram, renamed)
    assert SentencePieceTokenizer.from_file(renamed).vocab_size == 202
    with pytest.raises(ValueError, match="nowhere.spm"):
        SentencePieceTokenizer.from_file(tmp_path / "nowhere.spm")
    for name, data in [("empty.spm", b""), ("junk.spm", b"not a model"), ("cut.spm", unigram.read_bytes()[:100])]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=f"{name}.*corrupt"):
            SentencePieceTokenizer.from_file(tmp_path / name)
    with pytest.raises(ValueError, match="context_length"):
        SentencePieceTokenizer.from_file(unigram, context_length=1)
    with pytest.raises(ValueError, match="lacks model"):
        build_tokenizer({"kind": "sentencepiece", "context_length": 64})
    with pytest.raises(ValueError, match="base64"):
        build_tokenizer({"kind": "sentencepiece", "model": "%%%", "context_length": 64})
