"""Grain pipelines: random-access source -> decode/augment -> tokenize -> batch, split over processes.

Training reads an endless shuffled stream, the same global batches on any number of processes (see
jaxretrieval.data.order), whose position is a checkpointable iterator state; evaluation reads the gallery images
and the captions once, in order.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import grain
import jax
import numpy as np
from PIL import Image

from jaxretrieval.config import Config
from jaxretrieval.data.albef import AlbefCaptionSource
from jaxretrieval.data.clip_bpe import ClipTokenizer
from jaxretrieval.data.csv_source import CsvCaptionSource
from jaxretrieval.data.demo import generate_demo
from jaxretrieval.data.karpathy import KarpathyCaptionSource
from jaxretrieval.data.order import GlobalBatchSampler, shuffled_epochs
from jaxretrieval.data.pedes import PEDES_KINDS, PedesCaptionSource
from jaxretrieval.data.pedes_demo import write_pedes_demo
from jaxretrieval.data.precomp import PRECOMP_KINDS, PrecompSource, write_precomp_demo
from jaxretrieval.data.sources import CaptionRecord, CaptionSource, DataError
from jaxretrieval.data.spm import SentencePieceTokenizer
from jaxretrieval.data.tfds_source import TfdsCaptionSource
from jaxretrieval.data.tokenizers import Tokenizer, WordTokenizer, build_tokenizer
from jaxretrieval.data.transforms import DropSkipped, EncodePair, HybridView, Preprocess
from jaxretrieval.data.webdataset import WebDatasetSource
from jaxretrieval.data.wordpiece import WordPieceTokenizer

log = logging.getLogger(__name__)


def data_root(config: Config) -> Path:
    """The dataset folder; a demo dataset is generated there on first use (deterministic, no download)."""
    data = config.data
    if not data.root and data.kind not in ("demo", "pedes_demo", "precomp_demo"):
        raise DataError(f"data.root must name the dataset folder for data.kind={data.kind}")
    root = Path(data.root or f"data/{data.kind}").expanduser()
    if data.kind == "demo":
        generate_demo(root, seed=data.demo_seed, num_train=data.demo_num_train, num_test=data.demo_num_test)
    elif data.kind == "pedes_demo":
        write_pedes_demo(root, seed=data.demo_seed)
    elif data.kind == "precomp_demo" and not (root / "test_ims.npy").is_file():
        write_precomp_demo(root, seed=data.demo_seed)
    elif not root.is_dir():
        raise DataError(f"data.root {root} is not a folder")
    return root


def make_tokenizer(config: Config, root: Path, saved: dict | None = None) -> Tokenizer:
    """The tokenizer `data.tokenizer` names; `saved` is the spec stored with the init checkpoint."""
    name = config.data.tokenizer
    try:
        if name == "checkpoint":
            if saved is None:
                raise DataError("data.tokenizer=checkpoint needs train.init_from (a checkpoint with a tokenizer)")
            tokenizer = build_tokenizer(saved)
        elif config.data.tokenizer_kind == "wordpiece":
            tokenizer = WordPieceTokenizer.from_file(root / name, config.model.text.context_length)
        elif name.endswith(".gz"):
            tokenizer = ClipTokenizer.from_file(root / name, config.model.text.context_length)
        elif name.endswith((".spm", ".model")):
            tokenizer = SentencePieceTokenizer.from_file(root / name, config.model.text.context_length)
        else:
            tokenizer = WordTokenizer.from_file(root / name, config.model.text.context_length)
    except (OSError, ValueError) as e:
        raise DataError(str(e)) from None
    if tokenizer.vocab_size > config.model.text.vocab_size:
        raise DataError(f"tokenizer '{name}' has {tokenizer.vocab_size} ids but model.text.vocab_size is "
                        f"{config.model.text.vocab_size}")
    if config.model.family == "beit3" and tokenizer.pad_id != config.model.multiway.pad_id:
        raise DataError(f"tokenizer '{name}' pads with id {tokenizer.pad_id} but model.multiway.pad_id is "
                        f"{config.model.multiway.pad_id} (the model masks that id out of attention)")
    return tokenizer


def make_preprocess(config: Config, train: bool = False) -> Preprocess:
    """The deterministic image transform; for training batches uint8 out with data.normalise_on_device."""
    data = config.data
    return Preprocess(config.model.image.image_size, data.mean, data.std, resize=data.resize, draft=data.jpeg_draft,
                      uint8=train and data.normalise_on_device)


def annotation_files(root: Path, pattern: str) -> Path | list[Path]:
    """The file `pattern` names under root, or, for a glob pattern, every file it matches in sorted order."""
    if not any(c in pattern for c in "*?["):
        return root / pattern
    files = sorted(path for path in root.glob(pattern) if path.is_file())
    if not files:
        raise DataError(f"no annotation file under {root} matches {pattern}")
    return files


def caption_source(config: Config, root: Path, split: str) -> CaptionSource:
    """The records of a split. data.kind albef: ALBEF / CUSA JSON arrays, captions cleaned as ALBEF does (up to
    data.max_words words); evaluation splits list their images in sorted image_id order, as the originals do."""
    if config.data.kind in PEDES_KINDS:
        dataset = "cuhk-pedes" if config.data.kind == "pedes_demo" else config.data.kind
        # CFACK tokenizes a training caption as written and an evaluation caption cleaned (pre_caption).
        return PedesCaptionSource(root, dataset, split, max_words=config.data.max_words,
                                  clean_captions=split != "train")
    name = {"train": config.data.train_file, "test": config.data.test_file}.get(split)
    if name is None:
        raise DataError(f"unknown split '{split}' (train or test)")
    data = config.data
    if data.kind in PRECOMP_KINDS:  # name: the split ("train", "test", "testall")
        return PrecompSource(root, name, skip_bad=data.skip_bad_records)
    if data.kind == "webdataset":  # name: a shard pattern (braces, ::, globs) under root
        return WebDatasetSource(name, root, skip_bad=data.skip_bad_records)
    if data.kind == "tfds":
        return TfdsCaptionSource(data.tfds_name, root, data.tfds_train_split if split == "train" else
                                 data.tfds_test_split, image_key=data.tfds_image_key,
                                 caption_key=data.tfds_caption_key, id_key=data.tfds_id_key,
                                 skip_bad=data.skip_bad_records)
    files = annotation_files(root, name)
    if data.kind == "csv":
        return CsvCaptionSource(files, root, img_key=data.csv_img_key, caption_key=data.csv_caption_key,
                                group_key=data.csv_group_key or None, separator=data.csv_separator,
                                skip_bad=data.skip_bad_records)
    if data.kind == "karpathy":
        return KarpathyCaptionSource(files, root / data.karpathy_image_dir,
                                     split="train" if split == "train" else data.karpathy_eval_split,
                                     restval=data.karpathy_restval, captions=data.karpathy_captions,
                                     skip_bad=data.skip_bad_records)
    if config.data.kind == "albef":
        return AlbefCaptionSource(files, root, skip_bad=config.data.skip_bad_records, max_words=config.data.max_words,
                                  sort_by_image_id=split != "train")
    return CaptionSource(files, root, skip_bad=config.data.skip_bad_records)


class StackedInOrder:
    """Batches of `batch_size` elements of a grain DataLoader, stacked in this process. With worker processes grain
    runs its Batch operation inside each worker, on every W-th element of the stream; stacking after grain's in-order
    merge keeps each batch the consecutive stream rows the one global data order assigns it. Checkpointable like
    grain's iterator (its state is the loader's element position, saved at batch boundaries)."""

    def __init__(self, loader: grain.DataLoader, batch_size: int):
        self.loader = loader
        self.batch_size = batch_size
        self._elements = None

    def __iter__(self) -> StackedInOrder:
        self._elements = iter(self.loader)
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = [next(self._elements) for _ in range(self.batch_size)]
        return {key: np.stack([row[key] for row in rows]) for key in rows[0]}

    def get_state(self) -> bytes:
        return self._elements.get_state()

    def set_state(self, state: bytes) -> None:
        self._elements.set_state(state)

    def start_prefetch(self) -> None:
        self._elements.start_prefetch()


def ordered_loader(source: Any, sampler: GlobalBatchSampler, operations: list,
                   workers: int) -> grain.DataLoader | StackedInOrder:
    """This process's batches in the global order: grain batches in-process without workers, and with workers the
    elements come back in order and are stacked here (see StackedInOrder)."""
    if not workers:
        batch = grain.transforms.Batch(sampler.local_batch, drop_remainder=True)
        return grain.DataLoader(data_source=source, sampler=sampler, shard_options=sampler.shard_options(),
                                operations=[*operations, batch])
    allow_grain_workers()
    loader = grain.DataLoader(data_source=source, sampler=sampler, shard_options=sampler.shard_options(),
                              operations=operations, worker_count=workers)
    return StackedInOrder(loader, sampler.local_batch)


def allow_grain_workers() -> None:
    """Grain's worker processes read absl flags (with jax loaded, its worker-profiling flag); without absl's app
    parsing the command line that read is an error, so the flags are marked parsed and keep their defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def train_loader(config: Config, source: CaptionSource, tokenizer: Tokenizer, start_step: int = 0,
                 fields: Callable[[CaptionRecord], dict[str, np.ndarray]] | None = None
                 ) -> grain.DataLoader | StackedInOrder:
    """Endless batches of this process's rows of the global batches of one shuffled stream (see
    jaxretrieval.data.order), from global batch `start_step` on; `fields` adds a system's per-record arrays."""
    data = config.data
    view = HybridView(config.model.image.image_size, data.mean, data.std, scale=data.local_scale,
                      draft=data.jpeg_draft, uint8=data.normalise_on_device) if data.hybrid_views else None
    encode = EncodePair(make_preprocess(config, train=True), tokenizer, flip=data.flip, skip_bad=data.skip_bad_records,
                        view=view, files=source.paths, fields=fields,
                        where=source.where)
    return stream_loader(config, source, encode, start_step)


def stream_loader(config: Config, source: Any, encode: grain.transforms.RandomMap | grain.transforms.Map,
                  start_step: int = 0) -> grain.DataLoader | StackedInOrder:
    """This process's rows of the global batches of one shuffled stream over `source` from global batch
    `start_step` on, each record through `encode` (None: a skipped record, dropped)."""
    sampler = GlobalBatchSampler(shuffled_epochs(len(source), config.train.seed), config.train.batch_size,
                                 jax.process_index(), jax.process_count(), config.train.seed, start_step)
    return ordered_loader(source, sampler, [encode, DropSkipped()], config.data.workers)


class GalleryImages:
    """The gallery images of a source, decoded lazily batch by batch (a split never sits in memory whole).

    An image that fails to decode is a DataError naming it, prefixed by `origins[i]` (where the image was listed,
    e.g. `file:line`) when given. With `skip_bad` it is logged, stands in the batch as zeros and its index joins
    `skipped`; the evaluation then leaves it out (see `EvalInputs.without_skipped`).
    """

    def __init__(self, paths: list[str], preprocess: Callable[[Image.Image | str], np.ndarray], threads: int = 0, *,
                 origins: Sequence[str] | None = None, skip_bad: bool = False):
        if origins is not None and len(origins) != len(paths):
            raise ValueError(f"{len(origins)} origins for {len(paths)} gallery images")
        self.paths = paths
        self.preprocess = preprocess
        self.threads = threads
        self.origins = origins
        self.skip_bad = skip_bad
        self.skipped: set[int] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def _decode(self, index: int) -> np.ndarray:
        try:
            return self.preprocess(self.paths[index])
        except DataError as e:
            message = f"{self.origins[index]}: {e}" if self.origins is not None else str(e)
            if not self.skip_bad:
                raise DataError(message) from None
            if index not in self.skipped:
                log.warning("evaluation skips %s", message)
            self.skipped.add(index)
            return np.zeros_like(self._placeholder)

    @functools.cached_property
    def _placeholder(self) -> np.ndarray:
        """What preprocess makes of a blank image: the shape and dtype a skipped image stands in with."""
        return self.preprocess(Image.new("RGB", (8, 8)))

    def __getitem__(self, index: slice) -> np.ndarray:
        indices = range(len(self.paths))[index]
        if self.threads > 1:
            with ThreadPoolExecutor(self.threads) as pool:
                return np.stack(list(pool.map(self._decode, indices)))
        return np.stack([self._decode(i) for i in indices])

    def kept(self) -> np.ndarray:
        """(images,) bool: False for the images skipped so far."""
        keep = np.ones(len(self.paths), bool)
        keep[sorted(self.skipped)] = False
        return keep


class EvalInputs(NamedTuple):
    images: GalleryImages  # the gallery
    tokens: np.ndarray  # (captions, context length)
    text_groups: np.ndarray  # (captions,) group (image_id) of each caption
    image_groups: np.ndarray  # (images,) group of each gallery image

    def without_skipped(self, image_emb: np.ndarray, text_emb: np.ndarray,
                        protocol: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(image_emb, text_emb, text_groups, image_groups) without the gallery images skipped while embedding.

        A skipped image leaves the gallery. For image_text (gallery image i is group i) its captions leave the
        queries too and the groups are renumbered, so image i stays group i; for text_to_image captions stay as
        long as an image of their group remains (a caption with no relevant image left is dropped).
        """
        if not self.images.skipped:
            return image_emb, text_emb, self.text_groups, self.image_groups
        keep, texts = self.kept_rows()
        if not keep.any():
            raise DataError(f"every one of the {len(keep)} gallery images was skipped: nothing to evaluate")
        image_groups = self.image_groups[keep]
        text_groups = self.text_groups[texts]
        if protocol == "image_text":
            text_groups = np.searchsorted(image_groups, text_groups).astype(np.int32)
            image_groups = np.arange(len(image_groups), dtype=np.int32)
        return image_emb[keep], text_emb[texts], text_groups, image_groups

    def kept_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(images, captions) bool masks of the rows `without_skipped` keeps."""
        keep = self.images.kept()
        return keep, np.isin(self.text_groups, self.image_groups[keep])


def eval_inputs(config: Config, source: CaptionSource, tokenizer: Tokenizer) -> EvalInputs:
    """The gallery and captions of an evaluation split. For eval.protocol image_text the gallery holds one image
    per group (so image i is group i); for text_to_image every distinct image, all of its group relevant. Each
    gallery image is named by the file:line of its first record; eval.skip_bad_records skips those that fail to
    decode."""
    text_groups = np.asarray(source.text_to_image(), np.int32)
    first: dict = {}
    for record in source.records:
        first.setdefault(record.group if config.eval.protocol == "image_text" else record.image, record)
    records = list(first.values())
    paths = [record.image for record in records]
    image_groups = np.asarray([record.group for record in records], np.int32)
    images = GalleryImages(paths, make_preprocess(config), threads=config.data.workers,
                           origins=[source.where(record) for record in records],
                           skip_bad=config.eval.skip_bad_records)
    tokens = tokenizer([record.caption for record in source.records])
    return EvalInputs(images, tokens, text_groups, image_groups)
