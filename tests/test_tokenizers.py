import json

import numpy as np
import pytest

from jaxretrieval.data.tokenizers import WordTokenizer, build_tokenizer, split_words
from jaxretrieval.errors import DataError

VOCAB = ["a", "red", "circle", "on", "the", "left"]


def make(context_length: int = 10) -> WordTokenizer:
    return WordTokenizer(VOCAB, context_length)


def test_id_layout() -> None:
    tok = make()
    assert tok.pad_id == 0
    assert tok.unk_id == 1
    assert tok.sot_id == len(VOCAB) + 2
    assert tok.eot_id == len(VOCAB) + 3
    assert tok.vocab_size == len(VOCAB) + 4
    assert tok.context_length == 10
    ids = tok("a red circle")
    assert ids.dtype == np.int32
    assert ids.tolist() == [[tok.sot_id, 2, 3, 4, tok.eot_id, 0, 0, 0, 0, 0]]


def test_eot_is_the_largest_id_of_every_row() -> None:
    tok = make()
    ids = tok(["a red circle on the left", "circle", "", "unknown words only"])
    assert ids.shape == (4, 10)
    assert ids.max() == tok.eot_id == tok.vocab_size - 1
    for row in ids:
        eot_position = int(np.argmax(row))
        assert row[eot_position] == tok.eot_id
        assert (row[eot_position + 1 :] == tok.pad_id).all()
        assert (row[1:eot_position] != tok.pad_id).all()


def test_lower_cases_and_splits_on_non_alphanumerics() -> None:
    tok = make()
    expected = tok("a red circle on the left")
    assert (tok("A  RED-circle, on_the\tLeft!") == expected).all()
    assert split_words("Top-left: 2 big_Circles.") == ["top", "left", "2", "big", "circles"]


def test_unknown_words_map_to_unk() -> None:
    tok = make()
    ids = tok("a blue circle")[0]
    assert ids[:5].tolist() == [tok.sot_id, 2, tok.unk_id, 4, tok.eot_id]
    assert tok.decode(ids) == "a <unk> circle"


def test_truncation_keeps_eot_in_the_last_position() -> None:
    tok = make(context_length=5)
    ids = tok("a red circle on the left")[0]
    assert ids.tolist() == [tok.sot_id, 2, 3, 4, tok.eot_id]
    exact_fit = tok("a red circle")[0]
    assert exact_fit.tolist() == [tok.sot_id, 2, 3, 4, tok.eot_id]
    assert make(context_length=2)("a red circle").tolist() == [[tok.sot_id, tok.eot_id]]


def test_single_string_and_empty_batch() -> None:
    tok = make()
    assert tok("red").shape == (1, 10)
    assert tok([]).shape == (0, 10)
    assert tok("")[0, :3].tolist() == [tok.sot_id, tok.eot_id, tok.pad_id]


def test_decode_round_trip() -> None:
    tok = make()
    assert tok.decode(tok("A red circle, on the LEFT")[0]) == "a red circle on the left"


def test_spec_round_trip_through_json() -> None:
    tok = make(context_length=7)
    spec = json.loads(json.dumps(tok.to_spec()))
    assert spec == {"kind": "words", "vocab": VOCAB, "context_length": 7}
    rebuilt = build_tokenizer(spec)
    assert isinstance(rebuilt, WordTokenizer)
    assert rebuilt.to_spec() == spec
    texts = ["a red circle on the left", "something else entirely here"]
    assert (rebuilt(texts) == tok(texts)).all()


def test_build_tokenizer_rejects_unknown_kinds() -> None:
    with pytest.raises(ValueError, match="'bpe'"):
        build_tokenizer({"kind": "bpe", "vocab": VOCAB, "context_length": 8})
    with pytest.raises(ValueError, match="None"):
        build_tokenizer({"vocab": VOCAB, "context_length": 8})
    with pytest.raises(ValueError, match="context_length"):
        build_tokenizer({"kind": "words", "vocab": VOCAB})


def test_from_file(tmp_path) -> None:
    path = tmp_path / "vocab.txt"
    path.write_text("a\nred\n\ncircle  \non\nthe\nleft\n", encoding="utf-8")
    tok = WordTokenizer.from_file(path, context_length=10)
    assert tok.words == VOCAB
    assert (tok("a red circle") == make()("a red circle")).all()


def test_from_file_errors_name_the_file(tmp_path) -> None:
    missing = tmp_path / "missing_vocab.txt"
    with pytest.raises(DataError, match="missing_vocab.txt.*does not exist"):
        WordTokenizer.from_file(missing, context_length=8)
    empty = tmp_path / "empty_vocab.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty_vocab.txt"):
        WordTokenizer.from_file(empty, context_length=8)


@pytest.mark.parametrize("vocab", [["red", "red"], ["Red"], ["two words"], ["<eot>"], [""]])
def test_rejects_words_the_tokenizer_could_never_produce(vocab) -> None:
    with pytest.raises(ValueError):
        WordTokenizer(vocab, context_length=8)


def test_rejects_too_short_context() -> None:
    with pytest.raises(ValueError, match="context_length"):
        WordTokenizer(VOCAB, context_length=1)
