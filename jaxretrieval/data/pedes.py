"""Text-to-person retrieval annotations: CUHK-PEDES, ICFG-PEDES and RSTPReid, read the way CFACK reads them.

Each dataset is one JSON array with one object per image, every caption of the image in a list:

    CUHK-PEDES `reid_raw.json`:      {"split": "train", "captions": [...], "file_path": "CUHK01/0363004.png",
                                      "id": 1, "processed_tokens": [...]}     splits train / val / test
    ICFG-PEDES `ICFG-PEDES.json`:    the same keys                            splits train / test
    RSTPReid `data_captions.json`:   "img_path" in place of "file_path"       splits train / val / test

Image paths are relative to the image root, by default the `imgs` folder beside the file. Other keys
(`processed_tokens`) are ignored. Captions are cleaned by X2-VLM's `pre_caption` (CFACK keeps X2-VLM's
dataset/utils.py) to `max_words` words; CFACK passes its config's `max_tokens`, 40, there.

- Training (`read_pedes_train`): one (image, caption, pid) pair per caption, in file order; pids are the `id`s
  renumbered densely 0..N-1 in order of first appearance (CFACK's ps_train_dataset). IRRA uses id - 1 (CUHK) or
  id (ICFG, RSTPReid) and asserts those are 0..N-1; the two agree when a file lists its train ids in increasing order.
- Evaluation (`read_pedes_eval`): the gallery is every image of the split in file order with its raw `id`; every
  caption is its own query with the `id` of its image. A query's relevant images are all images of its id.

Errors are DataErrors naming `FILE record N` (N counts array items from 1) and the key.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import NamedTuple

import numpy as np

from jaxretrieval.data.albef import pre_caption, read_json_array
from jaxretrieval.data.sources import CaptionRecord, CaptionSource, json_field
from jaxretrieval.errors import ConfigError, DataError

MAX_WORDS = 40  # CFACK's max_tokens, which its create_dataset passes to pre_caption as max_words
IMAGE_FOLDER = "imgs"
# data.kind values: the three datasets (data.root: the folder of the annotation file and imgs/) and the generated demo
PEDES_KINDS = ("cuhk-pedes", "icfg-pedes", "rstpreid", "pedes_demo")


@dataclasses.dataclass(frozen=True)
class PedesFormat:
    name: str
    annotation_file: str
    image_key: str
    splits: tuple[str, ...]


FORMATS: dict[str, PedesFormat] = {
    "cuhk-pedes": PedesFormat("CUHK-PEDES", "reid_raw.json", "file_path", ("train", "val", "test")),
    "icfg-pedes": PedesFormat("ICFG-PEDES", "ICFG-PEDES.json", "file_path", ("train", "test")),
    "rstpreid": PedesFormat("RSTPReid", "data_captions.json", "img_path", ("train", "val", "test")),
}


class PedesRecord(NamedTuple):
    """One checked annotation object: the image path as written in the file and its raw captions."""

    split: str
    image: str
    captions: tuple[str, ...]
    person_id: int
    record: int  # 1-based index in the file's array


class PedesPair(NamedTuple):
    image: str  # root / file_path
    caption: str
    pid: int  # dense 0..N-1
    image_index: int  # index of the record's image among the split's images (IRRA's image_id)
    record: int  # 1-based record of the annotation file


@dataclasses.dataclass(frozen=True, eq=False)
class PedesTrain:
    """The training pairs of one split; usable as a grain RandomAccessDataSource."""

    path: Path
    split: str
    pairs: list[PedesPair]
    person_ids: list[int]  # the raw `id` of each dense pid
    num_images: int

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> PedesPair:
        return self.pairs[index]

    @property
    def pids(self) -> np.ndarray:
        return np.array([pair.pid for pair in self.pairs], dtype=np.int64)

    @property
    def num_ids(self) -> int:
        return len(self.person_ids)

    def where(self, index: int) -> str:
        """`FILE record N` of the annotation pair `index` came from."""
        return f"{self.path} record {self.pairs[index].record}"

    def __repr__(self) -> str:
        return (f"PedesTrain({self.path} {self.split}, {len(self)} captions, {self.num_images} images, "
                f"{self.num_ids} ids)")


@dataclasses.dataclass(frozen=True, eq=False)
class PedesEval:
    """A text-to-person test set: the gallery images and the caption queries, each with its raw person id."""

    path: Path
    split: str
    image_paths: list[str]
    image_pids: np.ndarray  # int64, one per image
    image_records: np.ndarray  # int64, the 1-based record of each image
    captions: list[str]
    caption_pids: np.ndarray  # int64, one per caption
    caption_images: np.ndarray  # int64, the index in image_paths of the image each caption describes

    @property
    def num_ids(self) -> int:
        return len(np.unique(self.image_pids))

    def where(self, image_index: int) -> str:
        """`FILE record N` of a gallery image."""
        return f"{self.path} record {int(self.image_records[image_index])}"

    def __repr__(self) -> str:
        return (f"PedesEval({self.path} {self.split}, {len(self.image_paths)} images, {len(self.captions)} captions, "
                f"{self.num_ids} ids)")


def pedes_format(dataset: str) -> PedesFormat:
    """The format of a dataset named 'CUHK-PEDES', 'ICFG-PEDES' or 'RSTPReid' (any case)."""
    found = FORMATS.get(dataset.lower())
    if found is None:
        names = ", ".join(f.name for f in FORMATS.values())
        raise ConfigError(f"unknown text-person dataset '{dataset}'; choose one of {names}")
    return found


def pedes_paths(dataset_dir: str | Path, dataset: str) -> tuple[Path, Path]:
    """(annotation file, image root) of a dataset folder laid out as the originals expect: the JSON and `imgs/`."""
    folder = Path(dataset_dir)
    return folder / pedes_format(dataset).annotation_file, folder / IMAGE_FOLDER


def _load_array(path: Path, spec: PedesFormat) -> list:
    if not path.is_file():
        raise DataError(f"{spec.name} annotation file {path} does not exist")
    return read_json_array(path, f"{spec.name} records")


def _image_path(value: str, key: str, where: str) -> str:
    """A path relative to the image root that stays inside it (checked on the text, not by resolving links)."""
    if not value.strip():
        raise DataError(f"{where}: key '{key}' is blank")
    if PurePosixPath(value).is_absolute() or PureWindowsPath(value).is_absolute() or PureWindowsPath(value).drive:
        raise DataError(f"{where}: key '{key}' is an absolute path ({value!r}); it must be relative to the image root")
    if os.path.normpath(value.replace("\\", "/")).split(os.sep)[0] == "..":
        raise DataError(f"{where}: key '{key}' points outside the image root ({value!r})")
    return value


def _check_record(item: object, spec: PedesFormat, where: str, number: int) -> PedesRecord:
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(item).__name__}")
    split = json_field(item, "split", (str,), where)
    if split not in spec.splits:
        raise DataError(f"{where}: key 'split' is '{split}'; {spec.name} splits are {', '.join(spec.splits)}")
    image = _image_path(json_field(item, spec.image_key, (str,), where), spec.image_key, where)
    person_id = json_field(item, "id", (int,), where)
    if person_id < 0:
        raise DataError(f"{where}: key 'id' is negative ({person_id})")
    captions = json_field(item, "captions", (list,), where)
    if not captions:
        raise DataError(f"{where}: key 'captions' is an empty list")
    for index, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise DataError(f"{where}: key 'captions' item {index} has the wrong type ({type(caption).__name__})")
    return PedesRecord(split, image, tuple(captions), person_id, number)


def read_pedes_annotations(path: str | Path, dataset: str) -> list[PedesRecord]:
    """Every record of an annotation file, checked, in file order."""
    spec, path = pedes_format(dataset), Path(path)
    items = _load_array(path, spec)
    return [_check_record(item, spec, f"{path} record {number}", number)
            for number, item in enumerate(items, start=1)]


def _select(path: str | Path, dataset: str, split: str, root: str | Path | None, max_words: int,
            check_images: bool) -> tuple[Path, Path, list[PedesRecord]]:
    spec, path = pedes_format(dataset), Path(path)
    if split not in spec.splits:
        raise DataError(f"{spec.name} has no '{split}' split; choose one of {', '.join(spec.splits)}")
    if max_words < 1:
        raise ConfigError(f"max_words must be at least 1, got {max_words}")
    records = [record for record in read_pedes_annotations(path, dataset) if record.split == split]
    if not records:
        raise DataError(f"{path}: no records of split '{split}'")
    root = Path(root) if root is not None else path.parent / IMAGE_FOLDER
    if check_images:
        for record in records:
            if not (root / record.image).is_file():
                raise DataError(f"{path} record {record.record}: key '{spec.image_key}': image file "
                                f"{root / record.image} does not exist")
    return path, root, records


def _captions(path: Path, record: PedesRecord, max_words: int, clean: bool) -> list[str]:
    cleaned = []
    for index, caption in enumerate(record.captions):
        where = f"{path} record {record.record}: key 'captions' item {index}"
        if not caption.strip():
            raise DataError(f"{where} is blank (empty or only whitespace)")
        cleaned.append(pre_caption(caption, max_words, where) if clean else caption)
    return cleaned


def read_pedes_train(path: str | Path, dataset: str, *, split: str = "train", root: str | Path | None = None,
                     max_words: int = MAX_WORDS, clean_captions: bool = True, check_images: bool = True) -> PedesTrain:
    """The (image, caption, pid) pairs of `split`, one per caption in file order, pids dense by first appearance.

    CFACK feeds the original caption of a pair to its tokenizer uncleaned and cleans only its augmented copy;
    `clean_captions=False` keeps the captions as written (a blank one is still an error).
    """
    path, root, records = _select(path, dataset, split, root, max_words, check_images)
    dense: dict[int, int] = {}
    pairs = []
    for image_index, record in enumerate(records):
        pid = dense.setdefault(record.person_id, len(dense))
        image = str(root / record.image)
        pairs.extend(PedesPair(image, caption, pid, image_index, record.record)
                     for caption in _captions(path, record, max_words, clean_captions))
    return PedesTrain(path, split, pairs, list(dense), len(records))


def read_pedes_eval(path: str | Path, dataset: str, split: str = "test", *, root: str | Path | None = None,
                    max_words: int = MAX_WORDS, clean_captions: bool = True, check_images: bool = True) -> PedesEval:
    """The gallery (every image of `split` in file order) and the queries (every caption, in file order), each
    with the raw `id` as its person id, as CFACK's ps_eval_dataset and IRRA's test set build them."""
    path, root, records = _select(path, dataset, split, root, max_words, check_images)
    captions: list[str] = []
    caption_pids: list[int] = []
    caption_images: list[int] = []
    for image_index, record in enumerate(records):
        texts = _captions(path, record, max_words, clean_captions)
        captions.extend(texts)
        caption_pids.extend([record.person_id] * len(texts))
        caption_images.extend([image_index] * len(texts))
    return PedesEval(
        path, split, [str(root / r.image) for r in records], np.array([r.person_id for r in records], np.int64),
        np.array([r.record for r in records], np.int64), captions, np.array(caption_pids, np.int64),
        np.array(caption_images, np.int64))


def cuhk_pedes(dataset_dir: str | Path, split: str, **kwargs) -> PedesTrain | PedesEval:
    """CUHK-PEDES `split` of a folder holding `reid_raw.json` and `imgs/`: the training pairs for 'train', the test
    set for 'val' or 'test'."""
    return _read_folder(dataset_dir, "cuhk-pedes", split, kwargs)


def icfg_pedes(dataset_dir: str | Path, split: str, **kwargs) -> PedesTrain | PedesEval:
    """ICFG-PEDES `split` ('train' or 'test') of a folder holding `ICFG-PEDES.json` and `imgs/`."""
    return _read_folder(dataset_dir, "icfg-pedes", split, kwargs)


def rstpreid(dataset_dir: str | Path, split: str, **kwargs) -> PedesTrain | PedesEval:
    """RSTPReid `split` of a folder holding `data_captions.json` and `imgs/`."""
    return _read_folder(dataset_dir, "rstpreid", split, kwargs)


def _read_folder(dataset_dir: str | Path, dataset: str, split: str, kwargs: dict) -> PedesTrain | PedesEval:
    path, root = pedes_paths(dataset_dir, dataset)
    kwargs.setdefault("root", root)
    if split == "train":
        return read_pedes_train(path, dataset, **kwargs)
    return read_pedes_eval(path, dataset, split, **kwargs)


def relevant_images(test: PedesEval) -> list[np.ndarray]:
    """For every query, the indices of its relevant gallery images: every image of its person id."""
    by_pid: dict[int, list[int]] = {}
    for index, pid in enumerate(test.image_pids.tolist()):
        by_pid.setdefault(pid, []).append(index)
    return [np.array(by_pid[pid], np.int64) for pid in test.caption_pids.tolist()]



class PedesCaptionSource(CaptionSource):
    """One split of a text-person dataset as caption records (the interface of CaptionSource): one record per
    caption in file order, its group the person (dense, by first appearance), its line the annotation record. Under
    eval.protocol text_to_image the gallery is every image of the split and every image of the caption's person is
    relevant, CFACK's and IRRA's test protocol."""

    def __init__(self, dataset_dir: str | Path, dataset: str, split: str, *, max_words: int = MAX_WORDS,
                 clean_captions: bool = True):
        path, root = pedes_paths(dataset_dir, dataset)
        self.dataset, self.split = dataset, split
        self.max_words, self.clean_captions = max_words, clean_captions
        super().__init__(path, root)

    def _read(self, file: int, path: Path) -> None:
        _, root, records = _select(path, self.dataset, self.split, self.root, self.max_words, self.check_images)
        for record in records:
            group = self._groups.setdefault(record.person_id, len(self._groups))
            self.records.extend(CaptionRecord(str(root / record.image), caption, group, file, record.record)
                                for caption in _captions(path, record, self.max_words, self.clean_captions))

    def where(self, record: CaptionRecord) -> str:
        return f"{self.paths[record.file]} record {record.line}"

    def __repr__(self) -> str:
        return f"PedesCaptionSource({self.path} {self.split}, {len(self)} captions, {len(self._groups)} ids)"
