"""Whole-word MLM masking: X2-VLM's count, whole words only, never [CLS] / [SEP] / padding unless asked, 80/10/10,
and masks fixed by (seed, step, record) alone."""

from __future__ import annotations

import numpy as np
import pytest

from jaxretrieval.data.masking import IGNORE_LABEL, WholeWordMasking, masked_positions, masks_to_draw
from jaxretrieval.data.wordpiece import WordPieceTokenizer

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
VOCAB = 60
FIRST_CONTINUATION = 40  # ids 5..39 start a word, 40..59 are ## pieces
CONTINUES = np.arange(VOCAB) >= FIRST_CONTINUATION


def masking(mask_prob: float = 0.5, max_masks: int = 12, **options) -> WholeWordMasking:
    return WholeWordMasking(CONTINUES, cls_id=CLS, sep_id=SEP, pad_id=PAD, mask_id=MASK, mask_prob=mask_prob,
                            max_masks=max_masks, **options)


def random_rows(count: int, width: int, seed: int, max_pieces: int = 4) -> np.ndarray:
    """[CLS] words [SEP] padding; each word is a start id and 0..max_pieces-1 ## ids, cut so [SEP] fits."""
    rng = np.random.default_rng(seed)
    rows = np.full((count, width), PAD, dtype=np.int32)
    for row in range(count):
        pieces: list[int] = []
        for _ in range(rng.integers(0, width)):
            pieces.append(int(rng.integers(5, FIRST_CONTINUATION)))
            pieces += rng.integers(FIRST_CONTINUATION, VOCAB, size=rng.integers(0, max_pieces)).tolist()
        pieces = pieces[: int(rng.integers(0, width - 1))]
        rows[row, : len(pieces) + 2] = [CLS, *pieces, SEP]
    return rows


def text_length(row: np.ndarray) -> int:
    return int(np.flatnonzero(row != PAD)[-1]) + 1


def words(row: np.ndarray, last: int) -> list[tuple[int, int]]:
    """(start, end) of each word among positions 1..last; a ## piece joins the word before it."""
    starts = [pos for pos in range(1, last + 1) if pos == 1 or not CONTINUES[row[pos]]]
    return list(zip(starts, [*starts[1:], last + 1], strict=False))


def call(rule: WholeWordMasking, rows: np.ndarray, seed: int = 0, step: int = 0, **kwargs):
    return rule(rows, seed=seed, step=step, records=kwargs.pop("records", np.arange(len(rows))), **kwargs)


@pytest.mark.parametrize(("length", "mask_prob", "max_masks", "expected"), [
    (2, 0.5, 12, 1), (3, 0.5, 12, 2), (5, 0.5, 12, 2), (7, 0.5, 12, 4), (9, 0.5, 12, 4), (24, 0.5, 12, 12),
    (40, 0.5, 12, 12), (2, 0.25, 10, 1), (3, 0.25, 10, 1), (6, 0.25, 10, 2), (10, 0.25, 10, 2), (14, 0.25, 10, 4),
    (56, 0.25, 10, 10), (10, 0.0, 10, 1),
])
def test_count_rule(length: int, mask_prob: float, max_masks: int, expected: int) -> None:
    """X2-VLM's min(max_masks, max(1, round(L * p))), halves rounded to even as Python's round does."""
    assert masks_to_draw(length, mask_prob, max_masks) == expected


@pytest.mark.parametrize("mask_sep", [False, True])
def test_single_piece_words_give_the_count_exactly(mask_sep: bool) -> None:
    rows = random_rows(400, 30, seed=1, max_pieces=1)
    for mask_prob, max_masks in [(0.5, 12), (0.25, 10)]:
        _, labels = call(masking(mask_prob, max_masks, mask_sep=mask_sep), rows)
        for row, label in zip(rows, labels, strict=True):
            length = text_length(row)
            candidates = length - 1 if mask_sep else length - 2
            want = min(masks_to_draw(length, mask_prob, max_masks), candidates)
            assert (label != IGNORE_LABEL).sum() == want, row


@pytest.mark.parametrize("skipgram_prob", [0.0, 0.2, 1.0])
def test_whole_words_fill_the_count_greedily(skipgram_prob: float) -> None:
    rows = random_rows(1500, 32, seed=2)
    rule = masking(skipgram_prob=skipgram_prob)
    inputs, labels = call(rule, rows)
    short = 0
    for row, masked, label in zip(rows, inputs, labels, strict=True):
        chosen = label != IGNORE_LABEL
        np.testing.assert_array_equal(label[chosen], row[chosen])
        np.testing.assert_array_equal(masked[~chosen], row[~chosen])
        length = text_length(row)
        assert not chosen[0] and not chosen[length - 1:].any(), row  # never [CLS], [SEP] or padding
        spans = words(row, length - 2)
        for start, end in spans:
            assert chosen[start:end].all() or not chosen[start:end].any(), (row, start, end)
        target, count = masks_to_draw(length, 0.5, 12), int(chosen.sum())
        assert count <= target
        if count < target:  # every word left is longer than what remains of the count
            short += 1
            assert all(end - start > target - count for start, end in spans if not chosen[start]), row
    assert 0 < short < len(rows) // 2  # multi-piece words do leave some rows short


def test_sep_and_padding_only_when_asked() -> None:
    rows = random_rows(800, 24, seed=3)
    lengths = np.array([text_length(row) for row in rows])
    sep_positions = (np.arange(len(rows)), lengths - 1)

    _, labels = call(masking(), rows)
    assert (labels[:, 0] == IGNORE_LABEL).all() and (labels[sep_positions] == IGNORE_LABEL).all()
    assert (labels[rows == PAD] == IGNORE_LABEL).all()

    _, labels = call(masking(mask_sep=True), rows)
    assert (labels[sep_positions] == SEP).mean() > 0.2  # X2-VLM's candidates include [SEP]
    assert (labels[:, 0] == IGNORE_LABEL).all() and (labels[rows == PAD] == IGNORE_LABEL).all()
    assert (labels[(rows == PAD) | (np.arange(24) == 0)] == IGNORE_LABEL).all()

    _, labels = call(masking(0.25, 10, whole_row=True), rows)  # UIT's CMP loop: the whole padded row
    chosen = labels != IGNORE_LABEL
    assert (chosen.sum(1) <= masks_to_draw(24, 0.25, 10)).all()
    assert (chosen.sum(1) == masks_to_draw(24, 0.25, 10)).mean() > 0.95  # 0.25 x 24 = 6, not 0.25 x the text
    assert (labels[rows == PAD][chosen[rows == PAD]] == PAD).all() and chosen[rows == PAD].mean() > 0.1
    assert not chosen[:, 0].any()


def test_eighty_ten_ten() -> None:
    rows = random_rows(6000, 40, seed=4)
    inputs, labels = call(masking(), rows)
    chosen = labels != IGNORE_LABEL
    original, replaced = rows[chosen], inputs[chosen]
    total = original.size
    assert total > 40000
    as_mask = (replaced == MASK).mean()
    kept = (replaced == original).mean()
    # A random id lands on [MASK] or on the original 1/VOCAB of the time each.
    assert as_mask == pytest.approx(0.8 + 0.1 / VOCAB, abs=0.01)
    assert kept == pytest.approx(0.1 + 0.1 / VOCAB, abs=0.006)
    others = replaced[(replaced != MASK) & (replaced != original)]
    assert others.size / total == pytest.approx(0.1 * (1 - 2 / VOCAB), abs=0.006)
    counts = np.bincount(others, minlength=VOCAB)
    assert counts[MASK] == 0 and (np.delete(counts, MASK) > 0).all()  # the whole vocabulary, specials included
    expected = others.size / (VOCAB - 1)
    assert np.abs(np.delete(counts, MASK) - expected).max() < 6 * np.sqrt(expected)


def test_skipgrams_mask_runs() -> None:
    rows = np.full((400, 42), PAD, dtype=np.int32)
    rows[:, 0], rows[:, 1:40], rows[:, 40] = CLS, 7, SEP  # 39 one-piece words; 0.2 x 41 -> 8 masks

    def mean_run(skipgram_prob: float) -> float:
        _, labels = call(masking(0.2, 12, skipgram_prob=skipgram_prob), rows)
        chosen = (labels != IGNORE_LABEL).astype(int)
        assert (chosen.sum(1) == 8).all()
        starts = (np.diff(chosen, axis=1, prepend=0) == 1).sum()
        return chosen.sum() / starts

    assert mean_run(0.0) < 1.4 and mean_run(1.0) > 2.0


def test_masks_depend_on_seed_step_and_record_only() -> None:
    rows = random_rows(64, 32, seed=5)
    records = np.arange(1000, 1064)
    rule = masking()
    inputs, labels = call(rule, rows, seed=3, step=9, records=records)
    again = call(rule, rows, seed=3, step=9, records=records)
    np.testing.assert_array_equal(again[0], inputs)
    np.testing.assert_array_equal(again[1], labels)
    order = np.random.default_rng(0).permutation(64)
    shuffled = call(rule, rows[order], seed=3, step=9, records=records[order])
    np.testing.assert_array_equal(shuffled[0], inputs[order])
    np.testing.assert_array_equal(shuffled[1], labels[order])
    halves = [call(rule, rows[part], seed=3, step=9, records=records[part]) for part in (slice(0, 20), slice(20, 64))]
    np.testing.assert_array_equal(np.concatenate([half[1] for half in halves]), labels)
    for change in ({"step": 10}, {"seed": 4}, {"stream": 1}):
        other = call(rule, rows, **({"seed": 3, "step": 9, "records": records} | change))
        assert (other[1] != labels).any(axis=1).mean() > 0.5, change


def test_edge_rows_and_bad_arguments() -> None:
    rule = masking()
    rows = np.array([[PAD] * 6, [CLS, SEP, PAD, PAD, PAD, PAD], [CLS, 9, SEP, PAD, PAD, PAD]], dtype=np.int32)
    inputs, labels = call(rule, rows)
    np.testing.assert_array_equal(inputs[:2], rows[:2])
    assert (labels[:2] == IGNORE_LABEL).all() and labels[2].tolist() == [IGNORE_LABEL, 9] + [IGNORE_LABEL] * 4
    assert inputs.dtype == labels.dtype == np.int32
    _, labels = call(masking(mask_sep=True), rows[1:2])
    assert labels[0].tolist() == [IGNORE_LABEL, SEP] + [IGNORE_LABEL] * 4
    with pytest.raises(ValueError, match="must start with"):
        call(rule, np.array([[9, 9, SEP]]))
    with pytest.raises(ValueError, match="records holds 1 entries for 3 rows"):
        call(rule, rows, records=[0])
    with pytest.raises(ValueError, match="records must be non-negative"):
        call(rule, rows, records=[0, -1, 2])
    with pytest.raises(ValueError, match="step must be non-negative"):
        call(rule, rows, step=-1)
    with pytest.raises(ValueError, match=r"tokens must be \(batch, length\)"):
        call(rule, rows[0])
    for bad in ({"mask_prob": 1.5}, {"max_masks": 0}, {"skipgram_prob": -0.1}, {"max_skipgram": 0}):
        with pytest.raises(ValueError):
            masking(**bad)
    with pytest.raises(ValueError, match="mask_id 60 is outside the vocabulary"):
        WholeWordMasking(CONTINUES, cls_id=CLS, sep_id=SEP, pad_id=PAD, mask_id=VOCAB, mask_prob=0.5, max_masks=3)


def test_masked_positions() -> None:
    labels = np.full((3, 8), IGNORE_LABEL, dtype=np.int32)
    labels[0, [2, 5, 6]] = [11, 12, 13]
    labels[2, 1] = 7
    positions, ids = masked_positions(labels, 4)
    assert positions.tolist() == [[2, 5, 6, 0], [0, 0, 0, 0], [1, 0, 0, 0]]
    assert ids.tolist() == [[11, 12, 13, -100], [-100] * 4, [7, -100, -100, -100]]
    with pytest.raises(ValueError, match="more than max_masks 2"):
        masked_positions(labels, 2)


@pytest.mark.parametrize(("mask_prob", "max_masks"), [(0.5, 12), (0.25, 10)])  # CFACK / X2-VLM and UIT
def test_wordpiece_rows(tmp_path, mask_prob: float, max_masks: int) -> None:
    tokens = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "man", "walk", "##ing", "un", "##be",
              "##liev", "##ably", "long", "##er", "dog", ",", "."]
    (tmp_path / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    tok = WordPieceTokenizer.from_file(tmp_path / "vocab.txt", 24)
    rule = WholeWordMasking.for_tokenizer(tok, mask_prob, max_masks)
    assert (rule.cls_id, rule.sep_id, rule.pad_id, rule.mask_id, rule.vocab_size) == (3, 4, 0, 5, len(tokens))
    rows = tok(["A man walking, unbelievably longer dog.", "Unbelievably, a dog walking longer"] * 200)
    inputs, labels = rule(rows, seed=1, step=2, records=np.arange(len(rows)))
    chosen = labels != IGNORE_LABEL
    for row, mask in zip(rows, chosen, strict=True):
        length = int((row != tok.pad_id).sum())
        pieces = [tokens[i] for i in row[1 : length - 1]]
        word_of = np.cumsum([not piece.startswith("##") for piece in pieces])
        for word in set(word_of.tolist()):
            picked = mask[1 : length - 1][word_of == word]
            assert picked.all() or not picked.any(), pieces
        assert mask.sum() <= masks_to_draw(length, mask_prob, max_masks)
    assert chosen[:, 1:].any(axis=0)[:10].all()  # every position of the text gets its turn
    assert (inputs[chosen] == tok.mask_id).mean() == pytest.approx(0.8, abs=0.05)
