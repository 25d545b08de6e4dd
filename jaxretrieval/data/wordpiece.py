"""BERT's WordPiece tokenizer (bert-base-uncased and kin), giving the same ids as transformers' ``BertTokenizerFast``.

The text tower of CFACK (X2-VLM), UIT and BLIP-2 reads ``[CLS] pieces... [SEP]`` padded with ``[PAD]``, as
``tokenizer(texts, padding="max_length", truncation=True, max_length=N)`` makes it. Text is normalised as BERT does
(control characters dropped, whitespace made spaces, spaces put around CJK ideographs, optionally lower-cased and
accents stripped), split at whitespace and punctuation, and each word becomes the longest vocabulary pieces from the
left, later pieces spelt ``##piece``; a word with no such split, or over 100 characters, is ``[UNK]``. A special
token written literally in a text (``[MASK]``, cased exactly so) is that token, as in transformers.

The vocabulary is read from a ``vocab.txt`` (one token per line, the line number is its id) or a ``tokenizer.json``
holding a BERT WordPiece model; the encoding itself is done by the ``tokenizers`` library.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from jaxretrieval.data.token_rows import (
    check_context_length,
    check_spec,
    pack_rows,
    read_file,
    spec_int,
    spec_strings,
    without_surrogates,
)
from jaxretrieval.errors import DataError

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
CONTINUATION_PREFIX = "##"
MAX_WORD_CHARS = 100  # BERT's max_input_chars_per_word: a longer word is [UNK]
_BAD_CHARACTERS = {" ": "a space", "\t": "a tab", "\r": "a carriage return (Windows line ending?)"}


def _check_vocab(tokens: Sequence[str], where: Callable[[int], str], source: str) -> None:
    """One token per id: none empty, none holding whitespace, none twice, and all five special tokens present.
    `where(index)` names the place of token `index` (file and line, or spec entry)."""
    first: dict[str, int] = {}
    for index, token in enumerate(tokens):
        if not token:
            raise DataError(f"{where(index)} is empty; a WordPiece vocabulary holds one token per line")
        bad = next((name for char, name in _BAD_CHARACTERS.items() if char in token), None)
        if bad is not None:
            raise DataError(f"{where(index)}: {token!r} holds {bad}; a WordPiece vocabulary holds one token per line "
                            f"and nothing else")
        if token in first:
            raise DataError(f"{where(index)}: {token!r} is already {where(first[token])}")
        first[token] = index
    missing = [token for token in SPECIAL_TOKENS if token not in first]
    if missing:
        raise DataError(f"{source} lacks the special token(s) {', '.join(missing)} that BERT rows need")


def _read_vocab_txt(path: Path) -> list[str]:
    name = os.fspath(path)
    raw = read_file(path, "WordPiece vocabulary file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"WordPiece vocabulary file {name!r} line {line} is not valid UTF-8 text") from None
    tokens = text.split("\n")
    if tokens and tokens[-1] == "":
        tokens.pop()  # the newline that ends the last line
    _check_vocab(tokens, lambda index: f"WordPiece vocabulary file {name!r} line {index + 1}",
                 f"WordPiece vocabulary file {name!r}")
    return tokens


def _read_tokenizer_json(path: Path) -> tuple[list[str], dict[str, Any]]:
    """The vocabulary (by id) and the normaliser options of a BERT WordPiece ``tokenizer.json``."""
    name = os.fspath(path)
    raw = read_file(path, "tokenizer file")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"tokenizer file {name!r} is not valid JSON: {e}") from None

    def fail(problem: str) -> DataError:
        return DataError(f"tokenizer file {name!r} is not a BERT WordPiece tokenizer: {problem}")

    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "WordPiece":
        found = model.get("type") if isinstance(model, dict) else None
        raise fail(f"its model is {found!r}, not 'WordPiece'")
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not all(isinstance(token, str) and isinstance(index, int)
                                              for token, index in vocab.items()):
        raise fail("model.vocab is not a mapping of tokens to integer ids")
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise fail(f"model.vocab ids are not 0..{len(vocab) - 1}, each once")
    expected = {"unk_token": UNK, "continuing_subword_prefix": CONTINUATION_PREFIX,
                "max_input_chars_per_word": MAX_WORD_CHARS}
    for key, value in expected.items():
        if model.get(key, value) != value:
            raise fail(f"model.{key} is {model.get(key)!r}, not {value!r}")
    normalizer = data.get("normalizer")
    if not isinstance(normalizer, dict) or normalizer.get("type") != "BertNormalizer":
        raise fail("its normalizer is not a BertNormalizer")
    if normalizer.get("clean_text") is False or normalizer.get("handle_chinese_chars") is False:
        raise fail("its BertNormalizer turns off clean_text or handle_chinese_chars")
    pre_tokenizer = data.get("pre_tokenizer")
    if not isinstance(pre_tokenizer, dict) or pre_tokenizer.get("type") != "BertPreTokenizer":
        raise fail("its pre_tokenizer is not a BertPreTokenizer")
    added = {token.get("content") for token in data.get("added_tokens") or [] if isinstance(token, dict)}
    if not added <= set(SPECIAL_TOKENS):
        raise fail(f"it adds tokens besides BERT's special ones: {sorted(map(str, added - set(SPECIAL_TOKENS)))}")
    tokens = [""] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    _check_vocab(tokens, lambda index: f"tokenizer file {name!r} vocab id {index}", f"tokenizer file {name!r}")
    options = {"lowercase": normalizer.get("lowercase", True), "strip_accents": normalizer.get("strip_accents")}
    if not isinstance(options["lowercase"], bool) or options["strip_accents"] not in (None, True, False):
        raise fail("its BertNormalizer's lowercase is not true/false or its strip_accents not true/false/null")
    return tokens, options


class WordPieceTokenizer:
    """BERT WordPiece tokenizer with the vocabulary's own id layout (bert-base-uncased: 30522 ids, ``[PAD]`` 0,
    ``[UNK]`` 100, ``[CLS]`` 101, ``[SEP]`` 102, ``[MASK]`` 103).

    Rows are ``[CLS] ids... [SEP]`` padded with ``[PAD]``; long texts are cut so ``[SEP]`` stays last. ``lowercase``
    and ``strip_accents`` are transformers' ``do_lower_case`` and ``strip_accents``: ``strip_accents=None`` strips
    accents exactly when lower-casing (bert-base-uncased strips them, bert-base-cased keeps them).
    """

    kind: ClassVar[str] = "wordpiece"

    def __init__(self, vocab: Sequence[str], context_length: int, *, lowercase: bool = True,
                 strip_accents: bool | None = None) -> None:
        if isinstance(vocab, str):
            raise TypeError("vocab must be a sequence of tokens, not a single string")
        if not isinstance(lowercase, bool) or not (strip_accents is None or isinstance(strip_accents, bool)):
            raise TypeError("lowercase must be a bool and strip_accents a bool or None")
        check_context_length(context_length, CLS, SEP)
        tokens = list(vocab)
        _check_vocab(tokens, lambda index: f"vocabulary token {index}", "the vocabulary")
        self._vocab = tokens
        self._context_length = int(context_length)
        self._lowercase = lowercase
        self._strip_accents = strip_accents
        self._ids = {token: index for index, token in enumerate(tokens)}
        self._backend = self._build_backend()
        continues = np.array([token.startswith(CONTINUATION_PREFIX) for token in tokens], dtype=bool)
        continues.setflags(write=False)
        self._continues_word = continues

    def _build_backend(self) -> BackendTokenizer:
        backend = BackendTokenizer(models.WordPiece(self._ids, unk_token=UNK, max_input_chars_per_word=MAX_WORD_CHARS))
        backend.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                        strip_accents=self._strip_accents, lowercase=self._lowercase)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece(prefix=CONTINUATION_PREFIX)
        backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
        return backend

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], context_length: int, *, lowercase: bool | None = None,
                  strip_accents: bool | None = None) -> WordPieceTokenizer:
        """Read a ``vocab.txt``, a ``tokenizer.json`` (by its ``.json`` suffix) or a folder holding either (the
        ``tokenizer.json`` is preferred). A ``vocab.txt`` gets bert-base-uncased's options unless told otherwise; a
        ``tokenizer.json`` its own normaliser's, where an option given here overrides the file's (an explicit
        ``lowercase`` with ``strip_accents=None`` strips accents exactly when lower-casing). Errors name the file
        and, for a bad token, its line."""
        path = Path(path)
        if path.is_dir():
            found = next((path / name for name in ("tokenizer.json", "vocab.txt") if (path / name).is_file()), None)
            if found is None:
                raise DataError(f"WordPiece tokenizer folder {os.fspath(path)!r} holds neither tokenizer.json nor "
                                f"vocab.txt")
            path = found
        if path.suffix.lower() == ".json":
            vocab, options = _read_tokenizer_json(path)
            if lowercase is None and strip_accents is None:
                lowercase, strip_accents = options["lowercase"], options["strip_accents"]
            elif lowercase is None:
                lowercase = options["lowercase"]
        else:
            vocab = _read_vocab_txt(path)
        return cls(vocab, context_length, lowercase=True if lowercase is None else lowercase,
                   strip_accents=strip_accents)

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> WordPieceTokenizer:
        check_spec(cls.kind, spec, ("vocab", "context_length", "lowercase", "strip_accents"))
        lowercase, strip_accents = spec["lowercase"], spec["strip_accents"]
        if not isinstance(lowercase, bool):
            raise DataError(f"{cls.kind!r} tokenizer spec: lowercase must be true or false, got {lowercase!r}")
        if strip_accents is not None and not isinstance(strip_accents, bool):
            raise DataError(f"{cls.kind!r} tokenizer spec: strip_accents must be true, false or null, got "
                            f"{strip_accents!r}")
        vocab = spec_strings(cls.kind, spec, "vocab")
        _check_vocab(vocab, lambda index: f"{cls.kind!r} tokenizer spec vocab entry {index}",
                     f"{cls.kind!r} tokenizer spec")
        return cls(vocab, spec_int(cls.kind, spec, "context_length"), lowercase=lowercase,
                   strip_accents=strip_accents)

    def to_spec(self) -> dict[str, Any]:
        """JSON-serialisable; holds the whole vocabulary, so a checkpoint rebuilds the tokenizer with no file."""
        return {"kind": self.kind, "vocab": list(self._vocab), "context_length": self._context_length,
                "lowercase": self._lowercase, "strip_accents": self._strip_accents}

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    @property
    def pad_id(self) -> int:
        return self._ids[PAD]

    @property
    def unk_id(self) -> int:
        return self._ids[UNK]

    @property
    def sot_id(self) -> int:
        """``[CLS]``."""
        return self._ids[CLS]

    @property
    def eot_id(self) -> int:
        """``[SEP]``."""
        return self._ids[SEP]

    @property
    def mask_id(self) -> int:
        return self._ids[MASK]

    @property
    def lowercase(self) -> bool:
        return self._lowercase

    @property
    def strip_accents(self) -> bool | None:
        return self._strip_accents

    @property
    def continues_word(self) -> np.ndarray:
        """Read-only bool (vocab_size,): True for the ``##`` pieces, which continue the word before them."""
        return self._continues_word

    @property
    def vocab(self) -> list[str]:
        return list(self._vocab)

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without ``[CLS]``/``[SEP]``, as ``tokenizer(text, add_special_tokens=False)`` gives them."""
        return self._encode_many([text])[0]

    def word_pieces(self, text: str) -> list[list[int]]:
        """The ids of ``text`` grouped by word, as BERT's basic tokenizer splits words (punctuation apart) and
        WordPiece then splits each word: what VSE-infinity's caption augmentation draws on word by word."""
        encoding = self._backend.encode(without_surrogates(text), add_special_tokens=False)
        words: list[list[int]] = []
        last = None
        for token, word in zip(encoding.ids, encoding.word_ids, strict=True):
            if word != last or not words:
                words.append([])
                last = word
            words[-1].append(token)
        return words

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        """Tokenize to an int32 array of shape ``(len(texts), context_length)``."""
        if isinstance(texts, str):
            texts = [texts]
        return pack_rows(self._encode_many(texts), self.sot_id, self.eot_id, self._context_length, pad=self.pad_id)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Turn one row of ids back into text, stopping at the first ``[SEP]``; ``[CLS]`` and ``[PAD]`` are dropped,
        ``[UNK]`` and ``[MASK]`` kept, ``##`` pieces joined to their word."""
        kept = []
        for token in np.asarray(ids).reshape(-1).tolist():
            if token == self.eot_id:
                break
            if not 0 <= token < len(self._vocab):
                raise ValueError(f"id {token} is outside the vocabulary (0..{len(self._vocab) - 1})")
            if token not in (self.sot_id, self.pad_id):
                kept.append(token)
        return self._backend.decode(kept, skip_special_tokens=False)

    def _encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        texts = [without_surrogates(text) for text in texts]
        if not texts:
            return []
        encodings = self._backend.encode_batch_fast(texts, add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def __getstate__(self) -> dict[str, Any]:
        # The Rust tokenizer is rebuilt from the vocabulary rather than pickled.
        state = dict(self.__dict__)
        state.pop("_backend")
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._backend = self._build_backend()

    def __repr__(self) -> str:
        return (f"WordPieceTokenizer(vocab_size={self.vocab_size}, context_length={self._context_length}, "
                f"lowercase={self._lowercase}, strip_accents={self._strip_accents})")
