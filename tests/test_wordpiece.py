"""WordPieceTokenizer gives transformers' BertTokenizerFast ids (padding="max_length", truncation=True), survives its
spec, and names bad files. The vocabulary is trained here on the demo captions and a few hundred unicode and
punctuation words, so nothing is downloaded.
"""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
from tokenizers import BertWordPieceTokenizer
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models as backend_models

from jaxretrieval.data.tokenizers import build_tokenizer
from jaxretrieval.data.wordpiece import WordPieceTokenizer
from jaxretrieval.errors import DataError

# Placed as in bert-base-uncased: [PAD] first, other ids between it and the rest of the specials, so no id is 0..4 by
# luck.
HEAD = ["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Tokens the trainer cannot make from lower-cased, accent-stripped text, for the cased and accent-keeping options.
CASED = ["The", "A", "Circle", "##E", "café", "naïve", "é", "##é", "ü", "##ü", "Ä", "straße"]
WORDS = ["Café", "naïve", "Straße", "Ångström", "résumé", "über", "İstanbul", "ǅemal", "ΣΑΣ", "ωμέγα", "Русский",
         "東京", "日本語", "中文字符", "한국어", "ﬁne", "Ａｂｃ", "１２３", "x²", "①", "e\u0301", "3.14", "$9.99",
         "50%", "2024-01-31", "dog's", "can't", "\u201cquoted\u201d", "\u2014", "--", "...", "?!", "((()))", "#hash",
         "##ing", "😀", "👍🏽", "🇫🇷", "🧑\u200d🤝\u200d🧑", "[MASK]", "[mask]", "[CLS]", "[SEP]", "[PAD]", "[UNK]",
         "[unused0]", "x[SEP]y", "a[MASK]b", "THE", "The", "Circle", "circles", "triangular", "diamonds",
         "unbelievably"]
EDGE_TEXTS = ["", " ", "\n\t ", "  leading and trailing  ", "a  b\t\tc\n\nd", "\r\ncrlf", "\x00null\x7fdel\x1f",
              "zero\u200bwidth", "\u00a0nbsp\u00a0", "\u3000ideographic", "\ufeffbom", "\u0301lone combining",
              "a" * 100, "a" * 101, "ab" * 80, "[MASK][MASK]", "[CLS] [SEP] [PAD] [UNK]", "a.b,c;d:e!f?g",
              "Hello, World!!! ... ?! --- (((brackets)))", "中文字符和English混合", "東京は日本の首都です"]
# Code point ranges for random text: ASCII, Latin, combining marks, Greek, Cyrillic, Arabic, Devanagari, Thai, general
# punctuation (zero-width and bidi marks), kana, CJK, Hangul, full-width forms, emoji and C0 controls.
CODE_POINTS = [(0x20, 0x7E), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x3FF), (0x400, 0x4FF), (0x600, 0x6FF),
               (0x900, 0x97F), (0xE00, 0xE7F), (0x2000, 0x206F), (0x3000, 0x30FF), (0x4E00, 0x4EFF), (0xAC00, 0xACFF),
               (0xFF00, 0xFFEF), (0x1F300, 0x1F64F), (0x0, 0x1F)]
OPTIONS = [(True, None), (True, False), (False, None), (False, True)]


def demo_captions(root: Path) -> list[str]:
    return [json.loads(line)["caption"] for split in ("train", "test")
            for line in (root / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def varied_texts(captions: list[str], count: int, seed: int, code_points: bool = True) -> list[str]:
    """Demo captions, edge cases, words from WORDS in random case and spacing and (unless told not to) random code
    points; some are long enough to be cut."""
    rng = random.Random(seed)
    texts = [*EDGE_TEXTS, *WORDS, " ".join(captions[:12]), " ".join(WORDS) * 3]
    texts += rng.sample(captions, 150)
    separators = [" ", "", "  ", "\n", "\t", ", ", "!"]
    while len(texts) < count:
        if rng.random() < 0.6 or not code_points:
            words = rng.choices(WORDS + rng.choice(captions).split(), k=rng.randint(1, 14))
            words = [word.upper() if rng.random() < 0.2 else word.capitalize() if rng.random() < 0.2 else word
                     for word in words]
            texts.append("".join(word + rng.choice(separators) for word in words))
        else:
            length = rng.choice([rng.randint(0, 10), rng.randint(10, 80)])
            texts.append("".join(chr(rng.randint(*rng.choice(CODE_POINTS))) for _ in range(length)))
    return texts


@pytest.fixture(scope="module")
def captions(demo_root: Path) -> list[str]:
    return demo_captions(demo_root)


@pytest.fixture(scope="module")
def vocab_folder(captions: list[str], tmp_path_factory) -> Path:
    """A bert-base-uncased-like vocab.txt, small enough that many words become several ## pieces."""
    trainer = BertWordPieceTokenizer(lowercase=True)
    corpus = captions + WORDS * 3 + [" ".join(WORDS)] * 3
    trainer.train_from_iterator(corpus, vocab_size=260, min_frequency=1, special_tokens=HEAD, limit_alphabet=500)
    folder = tmp_path_factory.mktemp("bert")
    trainer.save_model(str(folder))
    trained = (folder / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1]
    tokens = HEAD + [token for token in trained if token not in HEAD]
    tokens += [token for token in CASED if token not in tokens]
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def vocab(vocab_folder: Path) -> list[str]:
    return (vocab_folder / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1]


def hf_tokenizer(folder: Path, lowercase: bool, strip_accents: bool | None):
    """transformers' BertTokenizerFast for the folder's vocab.txt. In transformers 5 ``BertTokenizerFast(vocab_file=)``
    ignores the file (five ids, everything [UNK]); ``from_pretrained`` on the folder reads it."""
    transformers = pytest.importorskip("transformers")
    return transformers.BertTokenizerFast.from_pretrained(str(folder), do_lower_case=lowercase,
                                                          strip_accents=strip_accents)


def hf_rows(hf, texts: list[str], context_length: int) -> np.ndarray:
    out = hf(texts, padding="max_length", truncation=True, max_length=context_length, return_tensors="np")
    return out["input_ids"].astype(np.int32)


def test_vocabulary_covers_the_cases(vocab: list[str]) -> None:
    """What the comparisons rely on: multi-piece words, specials away from 0..4, accented and cased tokens."""
    assert vocab.index("[UNK]") == 3 and vocab.index("[MASK]") == 6
    assert sum(token.startswith("##") for token in vocab) > 50
    assert {"東", "京", "circle", "##é", "The"} <= set(vocab)


@pytest.mark.parametrize(("lowercase", "strip_accents"), OPTIONS)
@pytest.mark.parametrize("context_length", [2, 7, 24, 96])
def test_ids_match_bert_tokenizer_fast(vocab_folder: Path, captions: list[str], lowercase: bool,
                                       strip_accents: bool | None, context_length: int) -> None:
    hf = hf_tokenizer(vocab_folder, lowercase, strip_accents)
    tok = WordPieceTokenizer.from_file(vocab_folder / "vocab.txt", context_length, lowercase=lowercase,
                                       strip_accents=strip_accents)
    texts = varied_texts(captions, 500, seed=context_length)
    reference = hf(texts, add_special_tokens=False)["input_ids"]
    # What the comparison covers: [UNK], ## pieces, literal specials, empty rows and rows cut at context_length.
    flat = {index for ids in reference for index in ids}
    assert {tok.unk_id, tok.mask_id} <= flat and tok.continues_word[list(flat)].sum() > 20
    assert min(map(len, reference)) == 0 and max(map(len, reference)) > 96
    if context_length == 96:
        assert [tok.encode(text) for text in texts] == reference
    ids = tok(texts)
    assert ids.dtype == np.int32 and ids.shape == (len(texts), context_length)
    np.testing.assert_array_equal(ids, hf_rows(hf, texts, context_length))


def test_options_change_the_ids(vocab_folder: Path) -> None:
    """The option matrix above is no tautology: each option changes some ids, in transformers and here alike."""
    texts = ["The Circle", "café naïve", "CAFÉ"]
    rows = {}
    for lowercase, strip_accents in OPTIONS:
        tok = WordPieceTokenizer.from_file(vocab_folder / "vocab.txt", 8, lowercase=lowercase,
                                           strip_accents=strip_accents)
        rows[lowercase, strip_accents] = tok(texts)
        np.testing.assert_array_equal(rows[lowercase, strip_accents],
                                      hf_rows(hf_tokenizer(vocab_folder, lowercase, strip_accents), texts, 8))
    assert len({value.tobytes() for value in rows.values()}) == len(OPTIONS)


def test_ids_match_the_python_bert_tokenizer(vocab_folder: Path, captions: list[str]) -> None:
    """X2-VLM and UIT ran transformers 4's pure-Python BertTokenizer (BertTokenizerLegacy in transformers 5). It parts
    from the Rust one (BertTokenizerFast, and this tokenizer) on Greek capital sigma at a word's end, which Python's
    str.lower makes final sigma, and on code points unassigned in one Unicode version; those are left out here."""
    legacy = pytest.importorskip("transformers.models.bert.tokenization_bert_legacy")
    hf = legacy.BertTokenizerLegacy(vocab_file=str(vocab_folder / "vocab.txt"), do_lower_case=True)
    tok = WordPieceTokenizer.from_file(vocab_folder / "vocab.txt", 40)
    texts = [text for text in varied_texts(captions, 300, seed=7, code_points=False) if "Σ" not in text]
    assert len(texts) > 250
    np.testing.assert_array_equal(tok(texts), hf_rows(hf, texts, 40))


def test_special_ids_and_continuation_flags(vocab_folder: Path, vocab: list[str]) -> None:
    hf = hf_tokenizer(vocab_folder, True, None)
    tok = WordPieceTokenizer.from_file(vocab_folder, 16)
    assert (tok.pad_id, tok.unk_id, tok.sot_id, tok.eot_id, tok.mask_id) == (
        hf.pad_token_id, hf.unk_token_id, hf.cls_token_id, hf.sep_token_id, hf.mask_token_id) == (0, 3, 4, 5, 6)
    assert tok.vocab_size == len(hf) == len(vocab) and tok.vocab == vocab
    flags = tok.continues_word
    assert flags.dtype == bool and flags.shape == (len(vocab),)
    assert flags.tolist() == [token.startswith("##") for token in vocab]
    with pytest.raises(ValueError):
        flags[0] = True


def test_rows(vocab_folder: Path) -> None:
    tok = WordPieceTokenizer.from_file(vocab_folder / "vocab.txt", 6)
    ids = tok(["", "circle", "a circle circle circle circle circle"])
    assert ids[0].tolist() == [4, 5, 0, 0, 0, 0]
    assert ids[1, 0] == 4 and ids[1, -1] == 0 and 5 in ids[1].tolist()
    assert ids[2, -1] == 5 and (ids[2] != 0).all()
    assert tok("circle").shape == (1, 6) and tok([]).shape == (0, 6)
    # A lone surrogate has no UTF-8; it becomes U+FFFD, as a UTF-8 decoder would make it.
    np.testing.assert_array_equal(tok(["a \ud800 b"]), tok(["a \ufffd b"]))


def test_decode(vocab_folder: Path, captions: list[str]) -> None:
    tok = WordPieceTokenizer.from_file(vocab_folder / "vocab.txt", 64)
    for caption in captions[:50]:
        assert tok.decode(tok(caption)[0]) == caption
    assert tok.decode(tok("  A Circle. [MASK] ☃ ")[0]) == "a circle. [MASK] [UNK]"
    row = tok("circle")[0]
    assert tok.decode(np.concatenate([row, row])) == "circle"  # stops at the first [SEP]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.sot_id, tok.vocab_size])


def test_spec_round_trip(vocab_folder: Path, captions: list[str]) -> None:
    tok = WordPieceTokenizer.from_file(vocab_folder / "vocab.txt", 20, lowercase=False, strip_accents=True)
    spec = json.loads(json.dumps(tok.to_spec()))
    assert spec["kind"] == "wordpiece" and spec["vocab"] == tok.vocab
    rebuilt = build_tokenizer(spec)
    assert isinstance(rebuilt, WordPieceTokenizer) and rebuilt.context_length == 20
    assert (rebuilt.lowercase, rebuilt.strip_accents) == (False, True)
    texts = varied_texts(captions, 200, seed=3)
    np.testing.assert_array_equal(rebuilt(texts), tok(texts))
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(tok))(texts), tok(texts))


@pytest.mark.parametrize(("lowercase", "strip_accents"), OPTIONS)
def test_tokenizer_json(vocab_folder: Path, captions: list[str], tmp_path: Path, lowercase: bool,
                        strip_accents: bool | None) -> None:
    """A tokenizer.json saved by transformers gives its options and ids; a folder holding one prefers it."""
    hf = hf_tokenizer(vocab_folder, lowercase, strip_accents)
    hf.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "vocab.txt").write_text("[PAD]\n", encoding="utf-8")  # unusable: the folder must not read it
    for source in (tmp_path / "tokenizer.json", tmp_path):
        tok = WordPieceTokenizer.from_file(source, 24)
        assert (tok.lowercase, tok.strip_accents) == (lowercase, strip_accents)
        texts = varied_texts(captions, 200, seed=5)
        np.testing.assert_array_equal(tok(texts), hf_rows(hf, texts, 24))
    overridden = WordPieceTokenizer.from_file(tmp_path / "tokenizer.json", 24, lowercase=not lowercase)
    assert overridden.lowercase is not lowercase and overridden.strip_accents is None


def write(path: Path, data: str | bytes) -> Path:
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    return path


GOOD = "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\ndog\n##s\n"


@pytest.mark.parametrize(("content", "message"), [
    (b"[PAD]\n[UNK]\n\xff\xfe\n", r"line 3 is not valid UTF-8"),
    ("[PAD]\n[UNK]\n\n[CLS]\n", r"line 3 is empty"),
    (GOOD + "cat\n##s\n", r"line 9: '##s' is already .*line 7"),
    (GOOD + "cat 1234\n", r"line 8: 'cat 1234' holds a space"),
    (GOOD.replace("\n", "\r\n"), r"line 1: '\[PAD\]\\r' holds a carriage return"),
    ("[PAD]\n[UNK]\n[CLS]\ndog\n", r"lacks the special token\(s\) \[SEP\], \[MASK\]"),
    ("", r"lacks the special token\(s\) \[PAD\], \[UNK\], \[CLS\], \[SEP\], \[MASK\]"),
])
def test_bad_vocab_txt(tmp_path: Path, content: str | bytes, message: str) -> None:
    path = write(tmp_path / "vocab.txt", content)
    with pytest.raises(DataError, match=message) as caught:
        WordPieceTokenizer.from_file(path, 16)
    assert str(path) in str(caught.value)


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"'.*nothere.txt' does not exist"):
        WordPieceTokenizer.from_file(tmp_path / "nothere.txt", 16)
    with pytest.raises(DataError, match="holds neither tokenizer.json nor vocab.txt"):
        WordPieceTokenizer.from_file(tmp_path, 16)
    assert WordPieceTokenizer.from_file(write(tmp_path / "vocab.txt", GOOD), 16).encode("dogs") == [5, 6]


def bert_json(**changes) -> str:
    """A transformers-like tokenizer.json for GOOD's vocabulary, with top-level keys changed."""
    vocab = {token: index for index, token in enumerate(GOOD.split())}
    data = {"added_tokens": [{"id": vocab[token], "content": token, "special": True} for token in list(vocab)[:5]],
            "normalizer": {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True,
                           "strip_accents": None, "lowercase": True},
            "pre_tokenizer": {"type": "BertPreTokenizer"},
            "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                      "max_input_chars_per_word": 100, "vocab": vocab}}
    return json.dumps(data | changes)


def test_bert_json_is_read(tmp_path: Path) -> None:
    tok = WordPieceTokenizer.from_file(write(tmp_path / "tokenizer.json", bert_json()), 8)
    assert tok.encode("Dogs") == [5, 6] and tok.vocab == GOOD.split()


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "its model is None, not 'WordPiece'"),
    (bert_json(model={"type": "BPE", "vocab": {}, "merges": []}), "its model is 'BPE', not 'WordPiece'"),
    (bert_json(model={"type": "WordPiece", "vocab": {"[PAD]": 0, "[UNK]": 2}}), r"ids are not 0..1, each once"),
    (bert_json(model={"type": "WordPiece", "vocab": {"a": "0"}}), "not a mapping of tokens to integer ids"),
    (bert_json(model={"type": "WordPiece", "vocab": {"[PAD]": 0}, "continuing_subword_prefix": "@@"}),
     "continuing_subword_prefix is '@@', not '##'"),
    (bert_json(model={"type": "WordPiece", "vocab": {"[PAD]": 0, "[UNK]": 1}}), r"lacks the special token\(s\) "
                                                                                 r"\[CLS\], \[SEP\], \[MASK\]"),
    (bert_json(normalizer={"type": "NFC"}), "normalizer is not a BertNormalizer"),
    (bert_json(normalizer={"type": "BertNormalizer", "lowercase": "yes"}), "lowercase is not true/false"),
    (bert_json(pre_tokenizer={"type": "Whitespace"}), "pre_tokenizer is not a BertPreTokenizer"),
    (bert_json(added_tokens=[{"id": 5, "content": "dog"}]), r"adds tokens besides BERT's special ones: \['dog'\]"),
])
def test_bad_tokenizer_json(tmp_path: Path, content: str, message: str) -> None:
    path = write(tmp_path / "tokenizer.json", content)
    with pytest.raises(DataError, match=message) as caught:
        WordPieceTokenizer.from_file(path, 16)
    assert str(path) in str(caught.value)


def test_another_model_type_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    BackendTokenizer(backend_models.BPE(unk_token="[UNK]")).save(str(path))
    with pytest.raises(DataError, match="not a BERT WordPiece tokenizer"):
        WordPieceTokenizer.from_file(path, 16)


@pytest.mark.parametrize(("change", "message"), [
    ({"vocab": None}, "vocab must be a list of strings"),
    ({"vocab": GOOD.split()[1:]}, r"lacks the special token\(s\) \[PAD\]"),
    ({"vocab": [*GOOD.split(), "dog"]}, r"vocab entry 7: 'dog' is already .*vocab entry 5"),
    ({"context_length": "16"}, "context_length must be an integer"),
    ({"context_length": 1}, "context_length must be at least 2"),
    ({"lowercase": 1}, "lowercase must be true or false"),
    ({"strip_accents": "no"}, "strip_accents must be true, false or null"),
])
def test_bad_spec(change: dict, message: str) -> None:
    spec = {"kind": "wordpiece", "vocab": GOOD.split(), "context_length": 16, "lowercase": True,
            "strip_accents": None} | change
    with pytest.raises(DataError, match=message):
        build_tokenizer(spec)
    with pytest.raises(DataError, match="lacks lowercase"):
        build_tokenizer({key: value for key, value in spec.items() if key != "lowercase"})
