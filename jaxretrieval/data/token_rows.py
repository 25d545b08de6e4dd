"""What every tokenizer shares: the fixed-width row layout ([sot] ids [eot], then padding), reading its file, the
checks of a saved spec and of the context length, and the clean-up of text no encoder accepts."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxretrieval.errors import DataError

_SURROGATE = re.compile("[\ud800-\udfff]")
# Far beyond any text tower's positions: a larger value is a damaged spec, whose rows would not fit in memory.
MAX_CONTEXT_LENGTH = 1 << 16


def pack_rows(id_rows: Iterable[Sequence[int]], sot: int, eot: int, context_length: int, pad: int = 0) -> np.ndarray:
    """int32 (rows, context_length); ids past context_length - 2 are dropped so that eot always survives."""
    rows = list(id_rows)
    keep = context_length - 2
    tokens = np.full((len(rows), context_length), pad, dtype=np.int32)
    for row, ids in enumerate(rows):
        ids = list(ids[:keep])
        tokens[row, : len(ids) + 2] = [sot, *ids, eot]
    return tokens


def check_context_length(context_length: int, sot: str, eot: str) -> None:
    if context_length < 2:
        raise DataError(f"context_length must be at least 2 (room for {sot} and {eot}), got {context_length}")
    if context_length > MAX_CONTEXT_LENGTH:
        raise DataError(f"context_length must be at most {MAX_CONTEXT_LENGTH}, got {context_length}")


def without_surrogates(text: str) -> str:
    """`text` with each lone surrogate code point (no UTF-8 encoding exists for one; a JSON escape such as
    "\\ud800" makes them) replaced by U+FFFD, as a UTF-8 decoder replaces bytes it cannot read."""
    return _SURROGATE.sub("\ufffd", text)


def check_spec(kind: str, spec: Mapping[str, Any], keys: Sequence[str]) -> None:
    """A saved tokenizer spec must be a mapping holding `keys`; the error names the tokenizer kind and what is
    missing."""
    if not isinstance(spec, Mapping):
        raise DataError(f"{kind!r} tokenizer spec must be a mapping, got {type(spec).__name__}")
    missing = sorted(set(keys) - spec.keys())
    if missing:
        raise DataError(f"{kind!r} tokenizer spec lacks {', '.join(missing)}")


def spec_int(kind: str, spec: Mapping[str, Any], key: str) -> int:
    value = spec[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise DataError(f"{kind!r} tokenizer spec: {key} must be an integer, got {type(value).__name__}")
    return value


def spec_strings(kind: str, spec: Mapping[str, Any], key: str) -> list[str]:
    value = spec[key]
    if not isinstance(value, list | tuple) or not all(isinstance(item, str) for item in value):
        raise DataError(f"{kind!r} tokenizer spec: {key} must be a list of strings")
    return list(value)


def read_file(path: str | os.PathLike[str], what: str) -> bytes:
    """The bytes of a tokenizer file; a missing or unreadable one is a DataError naming it."""
    name = os.fspath(path)
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{what} {name!r} does not exist") from None
    except OSError as e:
        raise DataError(f"{what} {name!r} cannot be read ({e.strerror or e})") from None
