"""A prepared TFDS dataset (ArrayRecord files) as a random-access caption source.

Training reads records by index in one global shuffled order (jaxretrieval.data.order), so the dataset is opened
with `as_data_source` (random access, no TensorFlow), never as a tf.data stream. Construction reads every example of
the split once, its image left encoded (`SkipDecoding`), and keeps one CaptionRecord per caption: a caption feature
holding a list of texts (COCO's `captions/text`) gives one record per text, all in the example's group. A record's
`image` is `tfds://<dataset dir>#<split>#<image key>#<example index>`; `sources.image_file` reads those bytes again
when the pipeline decodes the image (`read_ref`), with one data source per process.

Feature keys name a top-level feature (`image`, `image/id`) or a path into nested ones (`captions/text`). The group of
an example is its `id_key` value (int or string), or the example index without one. Bad examples (no such key, a blank
caption, an image that is not encoded bytes) are DataErrors naming dataset, split, index and key, or with `skip_bad`
dropped and counted. Needs the `[tfds]` extra (tensorflow-datasets, array_record).
"""

from __future__ import annotations

import functools
import io
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxretrieval.data.sources import CaptionRecord, CaptionSource, SkipCounts
from jaxretrieval.errors import DataError

log = logging.getLogger(__name__)

TFDS_PREFIX = "tfds://"
SCAN_CHUNK = 512  # examples per batched read while indexing


def _tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError("data.kind=tfds needs tensorflow-datasets and array_record: pip install "
                        "'jaxretrieval[tfds]'") from None
    return tfds


def open_builder(name: str, data_dir: str | os.PathLike):
    """The TFDS builder of a prepared dataset: `name` (`coco_captions`, `coco_captions:1.0.0`, `coco_captions/2017`)
    under `data_dir`, or with an empty name `data_dir` itself, the folder holding `dataset_info.json`."""
    tfds = _tfds()
    data_dir = Path(data_dir).expanduser()
    try:
        if not name:
            if not (data_dir / "dataset_info.json").is_file():
                raise DataError(f"{data_dir} holds no dataset_info.json: name the dataset (data.tfds_name) or point "
                                f"data.root at a prepared dataset's version folder")
            return tfds.builder_from_directory(str(data_dir))
        builder = tfds.builder(name, data_dir=str(data_dir))
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 -- TFDS raises its own types (DatasetNotFoundError, ...), not one base
        there = sorted(p.name for p in data_dir.iterdir() if p.is_dir()) if data_dir.is_dir() else []
        raise DataError(f"cannot open TFDS dataset '{name}' under {data_dir} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0]}); the datasets there: {', '.join(there) or 'none'}") from None
    if not builder.is_prepared():
        raise DataError(f"TFDS dataset '{name}' is not prepared under {data_dir}: run its download_and_prepare "
                        f"(`tfds build {name.split(':')[0]} --data_dir {data_dir} --file_format array_record`) first")
    return builder


def data_source(builder, split: str, image_key: str):
    """The split as a random-access source with `image_key` left encoded; an unknown split or a dataset prepared
    without ArrayRecord files is a DataError."""
    tfds = _tfds()
    decoders = {image_key: tfds.decode.SkipDecoding()} if image_key in builder.info.features else None
    try:
        return builder.as_data_source(split, decoders=decoders)
    except Exception as e:  # noqa: BLE001 -- a bad split name is a ValueError or TFDS's own error
        raise DataError(f"TFDS dataset {builder.info.full_name} at {builder.data_dir}: cannot read split '{split}' "
                        f"({type(e).__name__}: {e}); its splits: {', '.join(builder.info.splits)}; random access "
                        f"needs file_format=array_record") from None


def feature(example: Mapping[str, Any], key: str, where: str) -> Any:
    """example[key], where key is a top-level feature name or a `/` path into nested features."""
    if key in example:
        return example[key]
    value: Any = example
    for part in key.split("/"):
        if not isinstance(value, Mapping) or part not in value:
            raise DataError(f"{where}: no feature '{key}' (it has {', '.join(sorted(example))})")
        value = value[part]
    return value


def _text(value: Any, where: str) -> str:
    if isinstance(value, bytes | np.bytes_):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where} is not valid UTF-8 text (byte {e.start + 1})") from None
    if isinstance(value, str):
        return value
    raise DataError(f"{where} is not text ({type(value).__name__})")


def _texts(value: Any, where: str) -> list[str]:
    """A Text feature, or a sequence of them, as a list of strings."""
    if isinstance(value, np.ndarray) and value.ndim == 1 or isinstance(value, list | tuple):
        if not len(value):
            raise DataError(f"{where} is an empty list")
        return [_text(item, f"{where} item {i}") for i, item in enumerate(value)]
    return [_text(value.item() if isinstance(value, np.ndarray) and value.ndim == 0 else value, where)]


def _group_key(value: Any, where: str) -> int | str:
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, bytes | np.bytes_ | str):
        return _text(value, where)
    raise DataError(f"{where} is not an int or a string ({type(value).__name__})")


def parse_example(example: Mapping[str, Any], image_key: str, caption_key: str, id_key: str,
                  where: str) -> tuple[list[str], int | str | None]:
    """(captions, group key) of one decoded example whose image feature is left encoded; the key is None without an
    `id_key`. A missing feature, an image that is not bytes, a caption that is not (a list of) text or an id that
    is not an int or a string is a DataError naming `where` and the feature."""
    image = feature(example, image_key, where)
    if not isinstance(image, bytes | np.bytes_):
        raise DataError(f"{where}: feature '{image_key}' is not an encoded image ({type(image).__name__}); use a "
                        f"tfds.features.Image feature")
    captions = _texts(feature(example, caption_key, where), f"{where}: feature '{caption_key}'")
    key = _group_key(feature(example, id_key, where), f"{where}: feature '{id_key}'") if id_key else None
    return captions, key


class TfdsCaptionSource(CaptionSource):
    """One split of a prepared TFDS dataset as caption records; the interface of CaptionSource (a grain
    RandomAccessDataSource). `name` and `data_dir` as `open_builder`; `split` may slice (`train[:10%]`)."""

    def __init__(self, name: str, data_dir: str | os.PathLike, split: str, *, image_key: str = "image",
                 caption_key: str = "caption", id_key: str = "", skip_bad: bool = False):
        builder = open_builder(name, data_dir)
        self.dataset = builder.info.full_name
        self.directory = str(Path(builder.data_dir).resolve())
        self.paths = [Path(self.directory)]
        self.path, self.root, self.check_images = self.paths[0], self.paths[0], False
        self.split, self.image_key, self.caption_key, self.id_key = split, image_key, caption_key, id_key
        self.skip_bad, self.skipped = skip_bad, SkipCounts()
        self._groups: dict[int | str, int] = {}
        self.records: list[CaptionRecord] = []
        self.indices: list[int] = []  # per group: the index of its example in the split
        source = data_source(builder, split, image_key)
        start = time.perf_counter()
        for first in range(0, len(source), SCAN_CHUNK):
            chunk = range(first, min(first + SCAN_CHUNK, len(source)))
            for index, example in zip(chunk, source.__getitems__(list(chunk)), strict=True):
                self._add(index, example)
        self.scan_seconds = time.perf_counter() - start
        if not self.records:
            raise DataError(f"{self}: no usable examples")
        if self.skipped.total:
            log.warning("%s: skipped %d examples (%s)", self, self.skipped.total, self.skipped)
        log.info("%s: %d examples indexed in %.2f s", self, len(source), self.scan_seconds)

    def _add(self, index: int, example: Mapping[str, Any]) -> None:
        where = f"{self.dataset} {self.split}[{index}]"
        try:
            captions, key = parse_example(example, self.image_key, self.caption_key, self.id_key, where)
        except DataError as e:
            self._bad("malformed_lines", e)
            return
        usable = self._usable_captions(captions, f"{where}: feature '{self.caption_key}'")
        if usable:
            group = self._groups.setdefault(index if key is None else key, len(self._groups))
            if group == len(self.indices):
                self.indices.append(index)
            ref = f"{TFDS_PREFIX}{self.directory}#{self.split}#{self.image_key}#{index}"
            self.records.extend(CaptionRecord(ref, caption.strip(), group, 0, index + 1) for caption in usable)

    def where(self, record: CaptionRecord) -> str:
        """`dataset split[index]` of the example a record came from."""
        return f"{self.dataset} {self.split}[{record.line - 1}]"

    def __repr__(self) -> str:
        return f"TfdsCaptionSource({self.dataset} at {self.directory}, split {self.split})"


class _Sources:
    """This process's open data sources by (dataset folder, split, image key); forgotten in a forked child."""

    def __init__(self):
        self.lock, self.open = threading.Lock(), {}

    def forget(self) -> None:
        self.__init__()

    def get(self, directory: str, split: str, image_key: str):
        with self.lock:
            if (source := self.open.get((directory, split, image_key))) is None:
                tfds = _tfds()
                try:
                    builder = tfds.builder_from_directory(directory)
                except Exception as e:  # noqa: BLE001 -- as open_builder
                    raise DataError(f"cannot open TFDS dataset at {directory} ({type(e).__name__}: {e})") from None
                source = self.open[(directory, split, image_key)] = data_source(builder, split, image_key)
        return source


_SOURCES = _Sources()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_SOURCES.forget)


def read_ref(ref: str) -> bytes:
    """The encoded image bytes a `tfds://` record reference points at."""
    parts = ref[len(TFDS_PREFIX):].rsplit("#", 3)
    if not ref.startswith(TFDS_PREFIX) or len(parts) != 4 or not parts[3].isdigit():
        raise DataError(f"'{ref}' is not a TFDS example reference (tfds://dir#split#key#index)")
    directory, split, key, index = parts
    source = _SOURCES.get(directory, split, key)
    if int(index) >= len(source):
        raise DataError(f"{ref}: the split has {len(source)} examples (changed since it was indexed?)")
    return bytes(feature(source[int(index)], key, f"{directory} {split}[{index}]"))


@functools.cache
def _caption_rows_builder():
    tfds = _tfds()

    class CaptionRows(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def __init__(self, splits: Mapping[str, Sequence[Mapping[str, Any]]], nested: bool, image_format: str,
                     **kwargs):
            self.rows, self.nested, self.image_format = splits, nested, image_format
            super().__init__(**kwargs)

        def _info(self):
            image = tfds.features.Image(encoding_format=self.image_format)
            features = {"image": image, "image/id": np.int64,
                        "captions": tfds.features.Sequence({"text": tfds.features.Text()})} if self.nested else \
                {"image": image, "caption": tfds.features.Text(), "image_id": np.int64}
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(rows) for split, rows in self.rows.items()}

        def _generate_examples(self, rows):
            for index, row in enumerate(rows):
                if self.nested:
                    yield index, {"image": io.BytesIO(row["image"]), "image/id": row["image_id"],
                                  "captions": {"text": list(row["caption"])}}
                else:
                    yield index, {"image": io.BytesIO(row["image"]), "caption": row["caption"],
                                  "image_id": row["image_id"]}

    # TFDS looks for a checksums file beside a builder defined in a package, through importlib_resources (not among
    # its dependencies); a builder of no package has no code path and downloads nothing to check.
    CaptionRows.__module__ = "caption_rows"
    return CaptionRows


def write_tfds(data_dir: str | os.PathLike, splits: Mapping[str, Sequence[Mapping[str, Any]]], *,
               nested: bool = False, image_format: str = "jpeg") -> Path:
    """Prepares rows as the TFDS dataset `caption_rows` (ArrayRecord files) under `data_dir`, for tests, benchmarks
    and moving JSON-lines data to TFDS. A row is {"image": encoded bytes in `image_format`, "caption": text,
    "image_id": int}; `nested` stores COCO's feature layout instead (`captions/text`: the row's list of captions,
    `image/id`). Read it back with data.kind=tfds data.tfds_name=caption_rows (nested: data.tfds_caption_key=
    captions/text data.tfds_id_key=image/id)."""
    builder = _caption_rows_builder()(splits, nested, image_format, data_dir=str(data_dir),
                                      file_format="array_record")
    builder.download_and_prepare()
    return Path(builder.data_dir)
