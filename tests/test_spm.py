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


def slow_ids(sp: sentencepiece.SentencePieceProcessor, text: str) -> list[int]:
    """transformers 4's slow XLMRobertaTokenizer on text without special tokens: pieces, PieceToId + 1, 0 -> <unk>."""
    return [sp.piece_to_id(piece) + 1 if sp.piece_to_id(piece) else 3 for piece in sp.encode(text, out_type=str)]


def test_ids_match_transformers(unigram: Path, hf) -> None:
    tok = SentencePieceTokenizer.from_file(unigram)
    texts = varied_texts()
    ids = tok(texts)
    assert ids.dtype == np.int32 and ids.shape == (len(texts), 64)
    np.testing.assert_array_equal(ids, unilm_rows(hf, texts))
    short = SentencePieceTokenizer.from_file(unigram, context_length=8)
    np.testing.assert_array_equal(short(texts), unilm_rows(hf, texts, 8))
    assert (ids == tok.unk_id).any() and (ids == tok.mask_id).any() and (ids[:, -1] != tok.pad_id).any()


def test_special_ids_and_vocab_size_match_transformers(unigram: Path, hf) -> None:
    tok = SentencePieceTokenizer.from_file(unigram)
    assert (tok.sot_id, tok.pad_id, tok.eot_id, tok.unk_id) == (0, 1, 2, 3)
    assert (hf.bos_token_id, hf.pad_token_id, hf.eos_token_id, hf.unk_token_id) == (0, 1, 2, 3)
    assert tok.mask_id == hf.mask_token_id == 201
    assert tok.vocab_size == len(hf) == 202


def test_bpe_model_matches_slow_tokenizer(bpe: Path) -> None:
    """transformers 5 loads every XLM-R model as a Unigram model, which can split a BPE model's text differently."""
    sp = sentencepiece.SentencePieceProcessor(model_file=str(bpe))
    tok = SentencePieceTokenizer.from_file(bpe)
    for text in (text for text in varied_texts(200, seed=1) if "<" not in text):
        assert tok.encode(text) == slow_ids(sp, text), text


def test_normalised_lookalikes_are_not_special_tokens(unigram: Path) -> None:
    sp = sentencepiece.SentencePieceProcessor(model_file=str(unigram))
    tok = SentencePieceTokenizer.from_file(unigram)
    for text in LOOKALIKES:
        assert tok.encode(text) == slow_ids(sp, text), text
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
