"""Text tokenizers that turn captions into fixed-length int32 id arrays.

Every tokenizer follows the :class:`Tokenizer` protocol and can be saved as a JSON-serialisable spec
(``to_spec``) and rebuilt from it with :func:`build_tokenizer`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Protocol

import numpy as np

from jaxretrieval.data.clip_bpe import ClipTokenizer
from jaxretrieval.data.spm import SentencePieceTokenizer
from jaxretrieval.data.token_rows import check_context_length, check_spec, pack_rows, read_file, spec_int, spec_strings
from jaxretrieval.data.wordpiece import WordPieceTokenizer
from jaxretrieval.errors import DataError

_WORD = re.compile(r"[^\W_]+")


def split_words(text: str) -> list[str]:
    """Lower-case ``text`` and split it into runs of letters and digits."""
    return _WORD.findall(text.lower())


class Tokenizer(Protocol):
    """What the training and evaluation code needs from a tokenizer."""

    @property
    def context_length(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    @property
    def sot_id(self) -> int: ...

    @property
    def eot_id(self) -> int: ...

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray: ...

    def to_spec(self) -> dict[str, Any]: ...


class WordTokenizer:
    """Maps whole words to ids from a fixed vocabulary.

    Id layout: ``0`` is ``<pad>``, ``1`` is ``<unk>``, then the vocabulary words in order, then ``<sot>``
    and finally ``<eot>``. ``<eot>`` has the largest id, so a text tower can find the end of each
    sequence with an argmax over the token ids, as OpenAI CLIP does.
    """

    kind: ClassVar[str] = "words"
    PAD: ClassVar[str] = "<pad>"
    UNK: ClassVar[str] = "<unk>"
    SOT: ClassVar[str] = "<sot>"
    EOT: ClassVar[str] = "<eot>"

    def __init__(self, vocab: Sequence[str], context_length: int) -> None:
        if isinstance(vocab, str):
            raise TypeError("vocab must be a sequence of words, not a single string")
        check_context_length(context_length, "<sot>", "<eot>")
        words = list(vocab)
        seen: set[str] = set()
        for word in words:
            if split_words(word) != [word]:
                raise DataError(
                    f"vocabulary word {word!r} is not a single lower-case run of letters and digits, "
                    "so no text would ever produce it"
                )
            if word in seen:
                raise DataError(f"vocabulary word {word!r} appears more than once")
            seen.add(word)
        self._words = words
        self._context_length = int(context_length)
        self._ids = {word: index + 2 for index, word in enumerate(words)}
        self._sot_id = len(words) + 2
        self._eot_id = len(words) + 3

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], context_length: int) -> WordTokenizer:
        """Read a UTF-8 vocabulary with one word per line; blank lines are ignored. Errors name the file (and
        the line of a bad word)."""
        name = os.fspath(path)
        raw = read_file(path, "vocabulary file")
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise DataError(f"vocabulary file {name!r} line {line} is not valid UTF-8 text") from None
        lines = [(number, line.strip()) for number, line in enumerate(text.split("\n"), start=1) if line.strip()]
        if not lines:
            raise DataError(f"vocabulary file {name!r} holds no words")
        first: dict[str, int] = {}
        for number, word in lines:
            if split_words(word) != [word]:
                raise DataError(f"vocabulary file {name!r} line {number}: {word!r} is not a single lower-case run "
                                f"of letters and digits, so no text would ever produce it")
            if word in first:
                raise DataError(f"vocabulary file {name!r} line {number}: {word!r} is already on line {first[word]}")
            first[word] = number
        return cls(list(first), context_length)

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> WordTokenizer:
        check_spec(cls.kind, spec, ("vocab", "context_length"))
        return cls(spec_strings(cls.kind, spec, "vocab"), spec_int(cls.kind, spec, "context_length"))

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def vocab_size(self) -> int:
        return self._eot_id + 1

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def unk_id(self) -> int:
        return 1

    @property
    def sot_id(self) -> int:
        return self._sot_id

    @property
    def eot_id(self) -> int:
        return self._eot_id

    @property
    def words(self) -> list[str]:
        return list(self._words)

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        """Tokenize to an int32 array of shape ``(len(texts), context_length)``.

        Each row is ``<sot> words... <eot>`` followed by padding; words that do not fit are dropped so that
        ``<eot>`` always survives.
        """
        if isinstance(texts, str):
            texts = [texts]
        rows = ([self._ids.get(word, self.unk_id) for word in split_words(text)] for text in texts)
        return pack_rows(rows, self._sot_id, self._eot_id, self._context_length)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Turn one row of ids back into text, stopping at ``<eot>``; unknown words come back as ``<unk>``."""
        words = []
        for token in np.asarray(ids).reshape(-1).tolist():
            if token == self._eot_id:
                break
            if token in (self.pad_id, self._sot_id):
                continue
            words.append(self.UNK if token == self.unk_id else self._words[token - 2])
        return " ".join(words)

    def to_spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "vocab": list(self._words), "context_length": self._context_length}

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab_size={self.vocab_size}, context_length={self._context_length})"


_BUILDERS: dict[str, Callable[[Mapping[str, Any]], Tokenizer]] = {
    WordTokenizer.kind: WordTokenizer.from_spec,
    ClipTokenizer.kind: ClipTokenizer.from_spec,
    SentencePieceTokenizer.kind: SentencePieceTokenizer.from_spec,
    WordPieceTokenizer.kind: WordPieceTokenizer.from_spec,
}


def build_tokenizer(spec: Mapping[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from the dict its ``to_spec`` returned; a spec that does not describe one is a
    DataError."""
    if not isinstance(spec, Mapping):
        raise DataError(f"a tokenizer spec must be a mapping, got {type(spec).__name__}")
    kind = spec.get("kind")
    builder = _BUILDERS.get(kind) if isinstance(kind, str) else None
    if builder is None:
        known = ", ".join(repr(name) for name in sorted(_BUILDERS))
        raise DataError(f"unknown tokenizer kind {kind!r}; known kinds: {known}")
    return builder(spec)
