"""BEiT-3's XLM-R sentencepiece tokenizer, giving the same ids as unilm's ``XLMRobertaTokenizer(spm_path)``.

The reference is transformers' sentencepiece-backed ("slow") ``XLMRobertaTokenizer`` followed by
``tokenize`` + ``convert_tokens_to_ids``: literal ``<s>``, ``<pad>``, ``</s>``, ``<unk>`` and ``<mask>`` in a text
are special tokens (whitespace before ``<mask>`` is dropped), every other stretch of text is encoded by
sentencepiece (which does the normalisation), and the pieces get fairseq's ids: ``<s>`` 0, ``<pad>`` 1, ``</s>`` 2,
``<unk>`` 3, sentencepiece piece ``i`` becomes ``i + 1`` and ``<mask>`` is ``len(spm) + 1``.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import sentencepiece

from jaxretrieval.data.token_rows import (
    check_context_length,
    check_spec,
    pack_rows,
    read_file,
    spec_int,
    without_surrogates,
)
from jaxretrieval.errors import DataError

_FAIRSEQ = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
_MASK = "<mask>"
_SPECIAL = re.compile("(<s>|<pad>|</s>|<unk>|<mask>)")


def _load(model: bytes) -> sentencepiece.SentencePieceProcessor:
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(model)
    except RuntimeError as err:
        raise DataError(f"not a sentencepiece model: {err}") from None
    return processor


def _pieces(processor: sentencepiece.SentencePieceProcessor) -> list[str]:
    """Every piece's text; a piece that is not UTF-8 (a damaged model the parser still accepts) is a DataError."""
    try:
        return [processor.id_to_piece(index) for index in range(processor.get_piece_size())]
    except UnicodeDecodeError:
        raise DataError("not a sentencepiece model: a piece is not valid UTF-8") from None


class SentencePieceTokenizer:
    """XLM-R / BEiT-3 sentencepiece tokenizer with fairseq's id layout.

    Rows are ``<s> ids... </s>`` padded with ``<pad>`` (id 1); long texts are cut so ``</s>`` stays last. An empty
    text gives ``<s> </s>`` (unilm's BEiT-3 data code would refuse it).
    """

    kind: ClassVar[str] = "sentencepiece"

    def __init__(self, model: bytes, context_length: int = 64) -> None:
        check_context_length(context_length, "<s>", "</s>")
        self._model = bytes(model)
        self._context_length = int(context_length)
        self._sp = _load(self._model)
        pieces = _pieces(self._sp)
        # transformers: fairseq names first, then PieceToId + 1, except that sentencepiece's unknown id 0 gives <unk>.
        self._mask_id = len(pieces) + 1
        self._ids = {piece: index + 1 for index, piece in enumerate(pieces) if index} | _FAIRSEQ
        self._ids[_MASK] = self._mask_id

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], context_length: int = 64) -> SentencePieceTokenizer:
        """Read a serialized sentencepiece model: BEiT-3's ``beit3.spm``, XLM-R's ``sentencepiece.bpe.model``..."""
        name = os.fspath(path)
        model = read_file(path, "sentencepiece model file")
        try:
            return cls(model, context_length)
        except DataError as err:
            raise DataError(f"sentencepiece model file {name!r} is corrupt: {err}") from None

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> SentencePieceTokenizer:
        check_spec(cls.kind, spec, ("model", "context_length"))
        if not isinstance(spec["model"], str):
            raise DataError(f"{cls.kind!r} tokenizer spec: model must be a base64 string, got "
                            f"{type(spec['model']).__name__}")
        try:
            model = base64.b64decode(spec["model"], validate=True)
        except ValueError as err:  # binascii.Error, or characters outside ASCII
            raise DataError(f"{cls.kind!r} tokenizer spec holds a model that is not base64: {err}") from None
        return cls(model, spec_int(cls.kind, spec, "context_length"))

    def to_spec(self) -> dict[str, Any]:
        """JSON-serialisable; embeds the whole sentencepiece model (base64), so a checkpoint needs no other file."""
        model = base64.b64encode(self._model).decode("ascii")
        return {"kind": self.kind, "model": model, "context_length": self._context_length}

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def vocab_size(self) -> int:
        """``len(tokenizer)`` in transformers: the sentencepiece pieces, ``<pad>`` and ``<mask>``."""
        return self._mask_id + 1

    @property
    def pad_id(self) -> int:
        return _FAIRSEQ["<pad>"]

    @property
    def sot_id(self) -> int:
        return _FAIRSEQ["<s>"]

    @property
    def eot_id(self) -> int:
        return _FAIRSEQ["</s>"]

    @property
    def unk_id(self) -> int:
        return _FAIRSEQ["<unk>"]

    @property
    def mask_id(self) -> int:
        return self._mask_id

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without ``<s>``/``</s>``, as ``convert_tokens_to_ids(tokenize(text))`` gives them."""
        return self._encode_many([text])[0]

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        """Tokenize to an int32 array of shape ``(len(texts), context_length)``."""
        if isinstance(texts, str):
            texts = [texts]
        return pack_rows(self._encode_many(texts), self.sot_id, self.eot_id, self._context_length, pad=self.pad_id)

    def padding_mask(self, tokens: np.ndarray) -> np.ndarray:
        """True on the padding after each row's final ``</s>`` (unilm's ``padding_mask``), shaped like ``tokens``.

        Found by position, not by id: a text holding a literal ``<pad>`` keeps that id unmasked, as in unilm.
        """
        tokens = np.asarray(tokens)
        real = tokens != self.pad_id
        length = tokens.shape[-1] - np.argmax(real[..., ::-1], axis=-1)
        return np.arange(tokens.shape[-1]) >= np.where(real.any(axis=-1), length, 0)[..., None]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Turn one row of ids back into text, stopping at the first ``</s>``; ``<mask>`` is dropped."""
        pieces = []
        for token in np.asarray(ids).reshape(-1).tolist():
            if token == self.eot_id:
                break
            if token == self.unk_id:
                pieces.append(self._sp.unk_id())
            elif 4 <= token < self._mask_id:
                pieces.append(token - 1)
        return self._sp.decode(pieces)

    def _encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        chunks: list[str] = []
        layout: list[list[str | int]] = []  # per text: special-token strings and indices into chunks
        for text in map(without_surrogates, texts):
            parts = _SPECIAL.split(text) if "<" in text else [text]
            for index in range(1, len(parts), 2):
                if parts[index] == _MASK:  # transformers' AddedToken(lstrip=True) for <mask>
                    parts[index - 1] = parts[index - 1].rstrip()
            row: list[str | int] = []
            for index, part in enumerate(parts):
                if index % 2:
                    row.append(part)
                elif part:
                    row.append(len(chunks))
                    chunks.append(part)
            layout.append(row)
        encoded = self._sp.encode(chunks, out_type=str) if chunks else []
        ids, unk = self._ids, self.unk_id
        out = []
        for row in layout:
            row_ids: list[int] = []
            for item in row:
                if isinstance(item, int):
                    row_ids.extend(ids.get(piece, unk) for piece in encoded[item])
                else:
                    row_ids.append(ids[item])
            out.append(row_ids)
        return out

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer(vocab_size={self.vocab_size}, context_length={self._context_length})"
