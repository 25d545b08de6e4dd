"""What every tokenizer shares: the fixed-width row layout ([sot] ids [eot], then padding) and the spec check."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np


def pack_rows(id_rows: Iterable[Sequence[int]], sot: int, eot: int, context_length: int, pad: int = 0) -> np.ndarray:
    """int32 (rows, context_length); ids past context_length - 2 are dropped so that eot always survives."""
    rows = list(id_rows)
    keep = context_length - 2
    tokens = np.full((len(rows), context_length), pad, dtype=np.int32)
    for row, ids in enumerate(rows):
        ids = list(ids[:keep])
        tokens[row, : len(ids) + 2] = [sot, *ids, eot]
    return tokens


def check_spec(kind: str, spec: Mapping[str, Any], keys: Sequence[str]) -> None:
    """A saved tokenizer spec must hold `keys`; the error names the tokenizer kind and what is missing."""
    missing = sorted(set(keys) - spec.keys())
    if missing:
        raise ValueError(f"{kind!r} tokenizer spec lacks {', '.join(missing)}")
