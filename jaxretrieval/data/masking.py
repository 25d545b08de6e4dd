"""Whole-word masking for masked language modelling (MLM) on host token rows, as X2-VLM (CFACK) and UIT mask.

Facts matched, read from X2-VLM's ``TextMaskingGenerator`` (github zengyan-97/X2-VLM, dataset/pretrain_dataset.py;
UIT's CMP code, uit/cmp/dataset/search_dataset.py of the PAB repository, holds the same class) and ALBEF's
``mask`` (salesforce/ALBEF, models/model_pretrain.py):

- How many: ``n = min(max_masks, max(1, round(L * mask_prob)))``, Python's round (half to even), where ``L`` is
  the length of the sequence handed over, ``[CLS]`` and ``[SEP]`` included (X2-VLM's pretraining data hands over
  ``[CLS] pieces [SEP]`` without padding). CFACK / X2-VLM: p 0.5, at most 12; UIT: p 0.25, at most 10.
- Where: every position after ``[CLS]``; the candidates are shuffled and taken in turn, each one (with probability
  ``skipgram_prob`` = 0.2) opening an n-gram of 2..``max_skipgram`` (= 3) positions instead of one, widened to whole
  words (a ``##`` piece belongs to the word before it). A span stops at the first position that is no candidate, and
  a candidate already masked is passed over. Selection stops once ``n`` positions are masked.
- How: each masked position becomes ``[MASK]`` with probability 0.8, else a random id with probability 0.5, else
  stays; the random id is uniform over the whole vocabulary ``[0, vocab_size)``, special tokens included, and may
  equal the original. The label of a masked position is its original id (``[MASK]``-replaced, random or kept alike);
  every other label is -100, which the loss ignores (ALBEF's targets; X2-VLM pads its ``masked_ids`` with -100).

Where we differ, on purpose:

- Whole words stay whole: the originals overshoot ``n`` when a word (or n-gram) is widened, then keep a random ``n``
  of the masked positions, which can split a word. Here a word is masked only while it fits in what is left of
  ``n``, and the span's later words are dropped once one does not fit, so the count is ``n`` unless every word left
  is longer than what remains (then fewer).
- ``[SEP]`` is not a candidate by default. Both originals let it be masked (X2-VLM's candidates run to the last
  position); ``mask_sep=True`` restores that. ALBEF, too, spares only ``[CLS]`` and padding.
- UIT's training loop hands the generator the whole padded row (``max_length`` 56), so its ``n`` is always
  ``min(10, 14) = 10`` and padding positions are candidates, labelled ``[PAD]``. ``whole_row=True`` reproduces
  that; by default ``L`` counts ``[CLS]`` up to the last non-padding id and padding is never masked.
- Randomness: each row draws from ``np.random.default_rng([seed, stream, step, record])``, so its masks depend only
  on the run's seed, the step and the record (never on batch order, batch size or process count) and a resumed run
  masks exactly as the uninterrupted one. The originals draw from Python's global ``random``; their streams are not
  reproduced, only their distributions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

IGNORE_LABEL = -100
MASK_FRACTION = 0.8  # of the chosen positions become [MASK]
RANDOM_FRACTION = 0.1  # become a random id; the remaining 0.1 keep their id


def masks_to_draw(length: int, mask_prob: float, max_masks: int) -> int:
    """X2-VLM's count: ``min(max_masks, max(1, round(length * mask_prob)))``, rounding half to even."""
    return min(max_masks, max(1, round(length * mask_prob)))


@dataclasses.dataclass(frozen=True, eq=False)
class WholeWordMasking:
    """MLM masking settings; call it on a batch of token rows. Build it with :meth:`for_tokenizer`.

    ``continues_word`` is the tokenizer's per-id bool array (True for ``##`` pieces); its length is the vocabulary
    size the random replacement ids are drawn from.
    """

    continues_word: np.ndarray
    cls_id: int
    sep_id: int
    pad_id: int
    mask_id: int
    mask_prob: float
    max_masks: int
    skipgram_prob: float = 0.2
    max_skipgram: int = 3
    mask_sep: bool = False
    whole_row: bool = False

    def __post_init__(self) -> None:
        continues = np.asarray(self.continues_word, dtype=bool).reshape(-1)
        if continues.size == 0:
            raise ValueError("continues_word must hold one flag per vocabulary id")
        for name in ("cls_id", "sep_id", "pad_id", "mask_id"):
            value = getattr(self, name)
            if not 0 <= value < continues.size:
                raise ValueError(f"{name} {value} is outside the vocabulary (0..{continues.size - 1})")
        if not 0.0 <= self.mask_prob <= 1.0:
            raise ValueError(f"mask_prob must be in [0, 1], got {self.mask_prob}")
        if self.max_masks < 1:
            raise ValueError(f"max_masks must be at least 1, got {self.max_masks}")
        if not 0.0 <= self.skipgram_prob <= 1.0:
            raise ValueError(f"skipgram_prob must be in [0, 1], got {self.skipgram_prob}")
        if self.max_skipgram < 1:
            raise ValueError(f"max_skipgram must be at least 1, got {self.max_skipgram}")
        continues = continues.copy()
        continues.setflags(write=False)
        object.__setattr__(self, "continues_word", continues)

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, mask_prob: float, max_masks: int, **options: Any) -> WholeWordMasking:
        """Settings for a :class:`~jaxretrieval.data.wordpiece.WordPieceTokenizer` (or anything with
        ``continues_word``, ``sot_id``, ``eot_id``, ``pad_id`` and ``mask_id``)."""
        return cls(continues_word=tokenizer.continues_word, cls_id=tokenizer.sot_id, sep_id=tokenizer.eot_id,
                   pad_id=tokenizer.pad_id, mask_id=tokenizer.mask_id, mask_prob=mask_prob, max_masks=max_masks,
                   **options)

    @property
    def vocab_size(self) -> int:
        return int(self.continues_word.size)

    def __call__(self, tokens: np.ndarray, *, seed: int, step: int, records: Sequence[int] | np.ndarray,
                 stream: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Mask a batch ``(batch, length)`` of ``[CLS] ... [SEP] [PAD]...`` rows.

        ``records`` holds one non-negative integer per row naming its record (e.g. the dataset index); with ``seed``,
        ``step`` and ``stream`` (for a second, independent mask of the same record in one step) it fixes the row's
        masks. Returns ``(inputs, labels)`` shaped like ``tokens``: the masked ids, and the original id where a
        position was chosen, -100 elsewhere. An all-padding row is left alone.
        """
        tokens = np.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be (batch, length), got shape {tokens.shape}")
        keys = np.asarray(records).reshape(-1)
        if keys.size != tokens.shape[0]:
            raise ValueError(f"records holds {keys.size} entries for {tokens.shape[0]} rows")
        if not np.issubdtype(keys.dtype, np.integer) and keys.size:
            raise ValueError(f"records must be integers, got dtype {keys.dtype}")
        for name, value in (("seed", seed), ("step", step), ("stream", stream)):
            if int(value) < 0:
                raise ValueError(f"{name} must be non-negative, got {value}")
        if keys.size and keys.min() < 0:
            raise ValueError(f"records must be non-negative, got {int(keys.min())}")
        inputs = tokens.copy()
        labels = np.full_like(tokens, IGNORE_LABEL)
        for row, record in enumerate(keys.tolist()):
            rng = np.random.default_rng([int(seed), int(stream), int(step), record])
            chosen = self.choose_positions(tokens[row], rng)
            if chosen.size:
                labels[row, chosen] = tokens[row, chosen]
                inputs[row, chosen] = self._replacements(tokens[row, chosen], rng)
        return inputs, labels

    def choose_positions(self, row: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The sorted positions of one row to predict."""
        row = np.asarray(row).reshape(-1)
        real = np.flatnonzero(row != self.pad_id)
        if real.size == 0:
            return np.zeros(0, dtype=np.int64)
        if row[0] != self.cls_id:
            raise ValueError(f"a row must start with [CLS] (id {self.cls_id}), got id {int(row[0])}")
        length = row.size if self.whole_row else int(real[-1]) + 1
        # Candidates run from 1 to `last`; [SEP] is the final real position.
        last = length - 1 if (self.whole_row or self.mask_sep) else length - 2
        if last < 1:
            return np.zeros(0, dtype=np.int64)
        target = masks_to_draw(length, self.mask_prob, self.max_masks)
        continues = self.continues_word[row[1 : last + 1]]
        continues[0] = False
        word_of = np.cumsum(~continues) - 1  # word index of candidate position 1 + i
        word_start = np.flatnonzero(~continues) + 1
        word_end = np.append(word_start[1:], last + 1)  # exclusive
        taken = np.zeros(word_start.size, dtype=bool)
        count = 0
        for position in (rng.permutation(last) + 1).tolist():
            if count >= target:
                break
            word = int(word_of[position - 1])
            if taken[word]:
                continue
            span = 1
            if self.max_skipgram >= 2 and self.skipgram_prob > 0 and rng.random() < self.skipgram_prob:
                span = int(rng.integers(2, self.max_skipgram + 1))
            final_word = int(word_of[min(position + span - 1, last) - 1])
            for next_word in range(word, final_word + 1):
                if taken[next_word]:
                    continue
                size = int(word_end[next_word] - word_start[next_word])
                if count + size > target:
                    break
                taken[next_word] = True
                count += size
        if not count:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.arange(word_start[w], word_end[w]) for w in np.flatnonzero(taken)])

    def _replacements(self, originals: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        draw = rng.random(originals.size)
        random_ids = rng.integers(0, self.vocab_size, size=originals.size)
        out = originals.copy()
        out[draw < MASK_FRACTION] = self.mask_id
        use_random = (draw >= MASK_FRACTION) & (draw < MASK_FRACTION + RANDOM_FRACTION)
        out[use_random] = random_ids[use_random]
        return out


def masked_positions(labels: np.ndarray, max_masks: int) -> tuple[np.ndarray, np.ndarray]:
    """X2-VLM's ``(masked_pos, masked_ids)`` from ``labels``: per row the chosen positions in order, padded with 0,
    and their ids, padded with -100; both int32 ``(batch, max_masks)``."""
    labels = np.asarray(labels)
    chosen = labels != IGNORE_LABEL
    most = int(chosen.sum(axis=-1).max(initial=0))
    if most > max_masks:
        raise ValueError(f"a row has {most} masked positions, more than max_masks {max_masks}")
    positions = np.zeros((labels.shape[0], max_masks), dtype=np.int32)
    ids = np.full((labels.shape[0], max_masks), IGNORE_LABEL, dtype=np.int32)
    for row in range(labels.shape[0]):
        where = np.flatnonzero(chosen[row])
        positions[row, : where.size] = where
        ids[row, : where.size] = labels[row, where]
    return positions, ids
