"""CLIP's byte-level BPE tokenizer, giving the same ids as open_clip's ``SimpleTokenizer`` / ``open_clip.tokenize``.

Text is cleaned (ftfy, HTML entities unescaped twice, whitespace collapsed, lower-cased), split into words by
CLIP's pre-tokenizer pattern, and each word's UTF-8 bytes are merged by the ranked BPE merges.
"""

from __future__ import annotations

import gzip
import html
import os
import zlib
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any, ClassVar

import ftfy
import numpy as np
import regex

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

_MERGE_LINES = 49152 - 256 - 2  # how many merges CLIP reads, starting after the header line
_END_OF_WORD = "</w>"
_CACHE_LIMIT = 1 << 20
_SOT = "<start_of_text>"
_EOT = "<end_of_text>"
# Special tokens are tried first. IGNORECASE matters even on lower-cased text: it lets "'ſ" (long s) match "'s"
# and U+0345 (a combining mark that case-folds to iota) count as a letter.
_WORDS = regex.compile(
    rf"{_SOT}|{_EOT}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+",
    regex.IGNORECASE,
)


def _byte_alphabet() -> dict[int, str]:
    """Map every byte to a printable character, in the order CLIP's vocabulary lists them.

    Printable Latin-1 bytes stand for themselves and come first; the other bytes follow in byte order as code
    points 256, 257, ...
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = sorted(set(range(256)) - set(printable))
    return {b: chr(b) for b in printable} | {b: chr(256 + index) for index, b in enumerate(others)}


_BYTE_CHARS = _byte_alphabet()
# Decoding UTF-8 bytes as Latin-1 gives one code point per byte, which this table then maps to CLIP's characters.
_BYTE_TRANSLATION = str.maketrans({chr(b): char for b, char in _BYTE_CHARS.items()})


def clean_text(text: str) -> str:
    """CLIP's text clean-up: fix mojibake, unescape HTML twice, collapse whitespace, lower-case (lone surrogates,
    which have no UTF-8 bytes to merge, become U+FFFD)."""
    return without_surrogates(" ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split()).lower())


class ClipTokenizer:
    """CLIP byte-level BPE tokenizer.

    Id layout (49408 ids with the standard merges): the 256 byte characters, the same followed by ``</w>``
    (end of word), one id per merge in rank order, then ``<start_of_text>`` and ``<end_of_text>``. Rows are
    ``<start_of_text> ids... <end_of_text>`` padded with ``0``; long texts are cut so ``<end_of_text>`` stays last.
    """

    kind: ClassVar[str] = "clip_bpe"
    SOT: ClassVar[str] = _SOT
    EOT: ClassVar[str] = _EOT

    def __init__(self, merges: Sequence[str], context_length: int = 77) -> None:
        if isinstance(merges, str):
            raise TypeError("merges must be a sequence of 'left right' lines, not a single string")
        check_context_length(context_length, "<start_of_text>", "<end_of_text>")
        alphabet = list(_BYTE_CHARS.values())
        known = {*alphabet, *(char + _END_OF_WORD for char in alphabet)}
        pairs: list[tuple[str, str]] = []
        for index, line in enumerate(merges):
            parts = line.split()
            if len(parts) != 2:
                raise DataError(f"merge {index} ({line!r}) is not two symbols separated by a space")
            left, right = parts
            if left not in known or right not in known:
                raise DataError(f"merge {index} ({line!r}) uses a symbol that no earlier merge or byte produces")
            known.add(left + right)
            pairs.append((left, right))
        self._merges = [f"{left} {right}" for left, right in pairs]
        self._context_length = int(context_length)
        self._tokens = [*alphabet, *(char + _END_OF_WORD for char in alphabet), *(a + b for a, b in pairs)]
        self._tokens += [self.SOT, self.EOT]
        self._ids = {token: index for index, token in enumerate(self._tokens)}
        self._ranks = {pair: rank for rank, pair in enumerate(pairs)}
        self._sot_id = len(self._tokens) - 2
        self._eot_id = len(self._tokens) - 1
        self._cache: dict[str, tuple[int, ...]] = self._fresh_cache()

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], context_length: int = 77) -> ClipTokenizer:
        """Read a merges file like open_clip's ``bpe_simple_vocab_16e6.txt.gz`` (gzipped or plain text).

        The first line is a header; the next 48894 lines are the merges, as open_clip reads them.
        """
        name = os.fspath(path)
        raw = read_file(path, "CLIP BPE merges file")
        try:
            if raw[:2] == b"\x1f\x8b":
                raw = gzip.decompress(raw)
            lines = raw.decode("utf-8").split("\n")
        except (OSError, EOFError, zlib.error, UnicodeDecodeError) as err:
            raise DataError(f"CLIP BPE merges file {name!r} is corrupt: {err}") from None
        merges = lines[1 : 1 + _MERGE_LINES]
        while merges and not merges[-1].strip():
            merges.pop()
        if not merges:
            raise DataError(f"CLIP BPE merges file {name!r} holds no merges after its header line")
        try:
            return cls(merges, context_length)
        except DataError as err:
            raise DataError(f"CLIP BPE merges file {name!r} is not a valid merges file: {err}") from None

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> ClipTokenizer:
        check_spec(cls.kind, spec, ("merges", "context_length"))
        return cls(spec_strings(cls.kind, spec, "merges"), spec_int(cls.kind, spec, "context_length"))

    def to_spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "merges": list(self._merges), "context_length": self._context_length}

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def sot_id(self) -> int:
        return self._sot_id

    @property
    def eot_id(self) -> int:
        return self._eot_id

    def encode(self, text: str, limit: int | None = None) -> list[int]:
        """Token ids of ``text`` without ``<start_of_text>``/``<end_of_text>``; at most ``limit`` of them if given."""
        ids: list[int] = []
        for word in _WORDS.findall(clean_text(text)):
            ids.extend(self._word_ids(word))
            if limit is not None and len(ids) >= limit:
                return ids[:limit]
        return ids

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        """Tokenize to an int32 array of shape ``(len(texts), context_length)``."""
        if isinstance(texts, str):
            texts = [texts]
        rows = (self.encode(text, limit=self._context_length - 2) for text in texts)
        return pack_rows(rows, self._sot_id, self._eot_id, self._context_length)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Turn one row of ids back into text, stopping at ``<end_of_text>`` (so the padding after it is ignored).

        Id ``0`` is not skipped: besides padding it is the token ``!`` inside a word.
        """
        out = bytearray()
        for token in np.asarray(ids).reshape(-1).tolist():
            if token == self._eot_id:
                break
            if token != self._sot_id:
                out += self._token_bytes[token]
        return out.decode("utf-8", errors="replace").strip()

    def _word_ids(self, word: str) -> tuple[int, ...]:
        ids = self._cache.get(word)
        if ids is None:
            chars = word.encode("utf-8").decode("latin-1").translate(_BYTE_TRANSLATION)
            symbols = self._merge([*chars[:-1], chars[-1] + _END_OF_WORD])
            ids = tuple(self._ids[symbol] for symbol in symbols)
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache = self._fresh_cache()
            self._cache[word] = ids
        return ids

    def _merge(self, symbols: list[str]) -> list[str]:
        """Apply the lowest-ranked merge present, at every non-overlapping place left to right, until none applies."""
        ranks = self._ranks
        never = len(ranks)
        while len(symbols) > 1:
            best = min(zip(symbols, symbols[1:], strict=False), key=lambda pair: ranks.get(pair, never))
            if best not in ranks:
                break
            left, right = best
            merged: list[str] = []
            index = 0
            while index < len(symbols):
                if index + 1 < len(symbols) and symbols[index] == left and symbols[index + 1] == right:
                    merged.append(left + right)
                    index += 2
                else:
                    merged.append(symbols[index])
                    index += 1
            symbols = merged
        return symbols

    def _fresh_cache(self) -> dict[str, tuple[int, ...]]:
        return {self.SOT: (self._sot_id,), self.EOT: (self._eot_id,)}

    @cached_property
    def _token_bytes(self) -> list[bytes]:
        byte_of = {char: b for b, char in _BYTE_CHARS.items()}
        out = []
        for token in self._tokens[: self._sot_id]:
            stem = token.removesuffix(_END_OF_WORD)
            out.append(bytes(byte_of[char] for char in stem) + (b" " if stem != token else b""))
        return out + [self.SOT.encode(), self.EOT.encode()]

    def __getstate__(self) -> dict[str, Any]:
        # Workers that receive a pickled tokenizer start with an empty word cache instead of a copy of ours.
        state = dict(self.__dict__)
        state["_cache"] = self._fresh_cache()
        state.pop("_token_bytes", None)
        return state

    def __repr__(self) -> str:
        return f"ClipTokenizer(vocab_size={self.vocab_size}, context_length={self._context_length})"
