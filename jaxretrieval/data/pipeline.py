"""Grain pipelines: random-access source -> decode/augment -> tokenize -> batch, split over processes.

Training reads an endless shuffled stream whose position is a checkpointable iterator state; evaluation
reads the gallery images and the captions once, in order.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grain
import jax
import numpy as np

from jaxretrieval.config import Config
from jaxretrieval.data.clip_bpe import ClipTokenizer
from jaxretrieval.data.demo import generate_demo
from jaxretrieval.data.sources import CaptionSource, DataError
from jaxretrieval.data.tokenizers import Tokenizer, WordTokenizer, build_tokenizer
from jaxretrieval.data.transforms import DropSkipped, EncodePair, Preprocess

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
        else:
            tokenizer = WordTokenizer.from_file(root / name, config.model.text.context_length)
    except (OSError, ValueError) as e:
        raise DataError(str(e)) from None
    if tokenizer.vocab_size > config.model.text.vocab_size:
        raise DataError(f"tokenizer '{name}' has {tokenizer.vocab_size} ids but model.text.vocab_size is "
                        f"{config.model.text.vocab_size}")
    return tokenizer


def make_preprocess(config: Config) -> Preprocess:
    return Preprocess(config.model.image.image_size, config.data.mean, config.data.std)


def caption_source(config: Config, root: Path, split: str) -> CaptionSource:
    name = {"train": config.data.train_file, "test": config.data.test_file}.get(split)
    if name is None:
        raise DataError(f"unknown split '{split}' (train or test)")
    return CaptionSource(root / name, root, skip_bad=config.data.skip_bad_records)


def train_loader(config: Config, source: CaptionSource, tokenizer: Tokenizer) -> grain.DataLoader:
    """Endless shuffled batches of this process's share of the global batch."""
    processes = jax.process_count()
    if config.train.batch_size % processes:
        raise ValueError(f"train.batch_size {config.train.batch_size} does not divide over {processes} processes")
    sampler = grain.samplers.IndexSampler(
        num_records=len(source),
        shard_options=grain.sharding.ShardByJaxProcess(drop_remainder=True),
        shuffle=True,
        num_epochs=None,
        seed=config.train.seed,
    )
    encode = EncodePair(make_preprocess(config), tokenizer, flip=config.data.flip,
                        skip_bad=config.data.skip_bad_records)
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[encode, DropSkipped(), grain.transforms.Batch(config.train.batch_size // processes,
                                                                   drop_remainder=True)],
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


def eval_inputs(config: Config, source: CaptionSource, tokenizer: Tokenizer):
    """(gallery images, caption tokens, text_to_image) of an evaluation split."""
    images = GalleryImages(source.images(), make_preprocess(config), threads=config.data.workers)
    tokens = tokenizer([record.caption for record in source.records])
    return images, tokens, np.asarray(source.text_to_image(), np.int32)
