"""Grain pipelines: random-access source -> decode/augment -> tokenize -> batch, split over processes.

Training reads an endless shuffled stream, the same global batches on any number of processes (see
jaxretrieval.data.order), whose position is a checkpointable iterator state; evaluation reads the gallery images
and the captions once, in order.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import grain
import jax
import numpy as np

from jaxretrieval.config import Config
from jaxretrieval.data.clip_bpe import ClipTokenizer
from jaxretrieval.data.demo import generate_demo
from jaxretrieval.data.order import GlobalBatchSampler, shuffled_epochs
from jaxretrieval.data.sources import CaptionSource, DataError
from jaxretrieval.data.spm import SentencePieceTokenizer
from jaxretrieval.data.tokenizers import Tokenizer, WordTokenizer, build_tokenizer
from jaxretrieval.data.transforms import DropSkipped, EncodePair, HybridView, Preprocess

log = logging.getLogger(__name__)


def data_root(config: Config) -> Path:
    """The dataset folder; a demo dataset is generated there on first use (deterministic, no download)."""
    data = config.data
    if not data.root and data.kind != "demo":
        raise DataError(f"data.root must name the dataset folder for data.kind={data.kind}")
    root = Path(data.root or "data/demo").expanduser()
    if data.kind == "demo":
        generate_demo(root, seed=data.demo_seed, num_train=data.demo_num_train, num_test=data.demo_num_test)
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


def make_preprocess(config: Config) -> Preprocess:
    return Preprocess(config.model.image.image_size, config.data.mean, config.data.std, resize=config.data.resize)


def annotation_files(root: Path, pattern: str) -> Path | list[Path]:
    """The file `pattern` names under root, or, for a glob pattern, every file it matches in sorted order."""
    if not any(c in pattern for c in "*?["):
        return root / pattern
    files = sorted(path for path in root.glob(pattern) if path.is_file())
    if not files:
        raise DataError(f"no annotation file under {root} matches {pattern}")
    return files


def caption_source(config: Config, root: Path, split: str) -> CaptionSource:
    name = {"train": config.data.train_file, "test": config.data.test_file}.get(split)
    if name is None:
        raise DataError(f"unknown split '{split}' (train or test)")
    return CaptionSource(annotation_files(root, name), root, skip_bad=config.data.skip_bad_records)


def train_loader(config: Config, source: CaptionSource, tokenizer: Tokenizer, start_step: int = 0) -> grain.DataLoader:
    """Endless batches of this process's rows of the global batches of one shuffled stream (see
    jaxretrieval.data.order), from global batch `start_step` on."""
    sampler = GlobalBatchSampler(shuffled_epochs(len(source), config.train.seed), config.train.batch_size,
                                 jax.process_index(), jax.process_count(), config.train.seed, start_step)
    data = config.data
    view = HybridView(config.model.image.image_size, data.mean, data.std, scale=data.local_scale) \
        if data.hybrid_views else None
    encode = EncodePair(make_preprocess(config), tokenizer, flip=data.flip, skip_bad=data.skip_bad_records,
                        view=view)
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        shard_options=sampler.shard_options(),
        operations=[encode, DropSkipped(), grain.transforms.Batch(sampler.local_batch, drop_remainder=True)],
        worker_count=config.data.workers,
    )


class GalleryImages:
    """The gallery images of a source, decoded lazily batch by batch (a split never sits in memory whole)."""

    def __init__(self, paths: list[str], preprocess: Preprocess, threads: int = 0):
        self.paths = paths
        self.preprocess = preprocess
        self.threads = threads

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: slice) -> np.ndarray:
        paths = self.paths[index]
        if self.threads > 1:
            with ThreadPoolExecutor(self.threads) as pool:
                return np.stack(list(pool.map(self.preprocess, paths)))
        return np.stack([self.preprocess(path) for path in paths])


class EvalInputs(NamedTuple):
    images: GalleryImages  # the gallery
    tokens: np.ndarray  # (captions, context length)
    text_groups: np.ndarray  # (captions,) group (image_id) of each caption
    image_groups: np.ndarray  # (images,) group of each gallery image


def eval_inputs(config: Config, source: CaptionSource, tokenizer: Tokenizer) -> EvalInputs:
    """The gallery and captions of an evaluation split. For eval.protocol image_text the gallery holds one image
    per group (so image i is group i); for text_to_image every distinct image, all of its group relevant."""
    text_groups = np.asarray(source.text_to_image(), np.int32)
    if config.eval.protocol == "image_text":
        paths = source.images()
        image_groups = np.arange(len(paths), dtype=np.int32)
    else:
        first: dict[str, int] = {}
        for record in source.records:
            first.setdefault(record.image, record.group)
        paths, image_groups = list(first), np.asarray(list(first.values()), np.int32)
    images = GalleryImages(paths, make_preprocess(config), threads=config.data.workers)
    tokens = tokenizer([record.caption for record in source.records])
    return EvalInputs(images, tokens, text_groups, image_groups)
