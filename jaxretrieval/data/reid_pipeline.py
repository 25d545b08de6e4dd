"""Re-id pipelines: the dataset `data.kind` names, identity-balanced training batches in one global order, and
the query / gallery splits for evaluation."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import jax
import numpy as np

from jaxretrieval.config import Config
from jaxretrieval.data.order import GlobalBatchSampler, RecordStream
from jaxretrieval.data.pipeline import GalleryImages, ordered_loader
from jaxretrieval.data.reid import (
    EncodeReid,
    ReidEvalTransform,
    ReidSource,
    ReidTrainTransform,
    coco_split_json,
    dukemtmc,
    market1501,
    pk_epoch_order,
    pk_num_batches,
    street2shop,
)
from jaxretrieval.data.reid_demo import write_reid_demo
from jaxretrieval.data.sources import DataError

DEMO_SIZE = (64, 32)  # the generated demo's image size


def reid_source(config: Config, split: str) -> ReidSource:
    """The `split` (train, query or gallery) of the dataset under data.root; reid_demo is generated there first."""
    data = config.data
    if not data.root and data.kind != "reid_demo":
        raise DataError(f"data.root must name the dataset folder for data.kind={data.kind}")
    root = Path(data.root or "data/reid_demo").expanduser()
    if data.kind == "reid_demo":
        write_reid_demo(root, num_train_ids=data.demo_num_train, num_test_ids=data.demo_num_test,
                        height=DEMO_SIZE[0], width=DEMO_SIZE[1], seed=data.demo_seed)
    elif not root.is_dir():
        raise DataError(f"data.root {root} is not a folder")
    if data.kind == "street2shop":  # train_file: the train JSON; the query / gallery ones are named after it
        return street2shop(root, coco_split_json(root / data.train_file, split), split)
    return (dukemtmc if data.kind == "dukemtmc" else market1501)(root, split)


def identities_per_batch(config: Config) -> int:
    return config.train.batch_size // config.data.num_instances


def pk_stream(config: Config, source: ReidSource) -> RecordStream:
    """Epochs of identity-balanced batches: P identities x K consecutive images each (Centroids-ReID's
    RandomIdentitySampler; identities with fewer than K images left are topped up from their own images)."""
    pids, seed = source.pids, config.train.seed
    p, k = identities_per_batch(config), config.data.num_instances
    if len(np.unique(pids)) < p:
        raise DataError(f"{source}: {len(np.unique(pids))} identities, fewer than the {p} a batch needs "
                        f"(train.batch_size / data.num_instances)")
    return RecordStream(lambda epoch: pk_epoch_order(pids, p, k, seed, epoch))


def batches_per_epoch(config: Config, source: ReidSource) -> int:
    """Batches in the first epoch (later ones differ by a few: the sampler's draw decides), for train.epochs."""
    return pk_num_batches(source.pids, identities_per_batch(config), config.data.num_instances, config.train.seed, 0)


def reid_train_loader(config: Config, source: ReidSource, start_step: int = 0) -> Iterable[dict]:
    """This process's rows of every global identity-balanced batch, augmented as Centroids-ReID trains."""
    data = config.data
    sampler = GlobalBatchSampler(pk_stream(config, source), config.train.batch_size, jax.process_index(),
                                 jax.process_count(), config.train.seed, start_step)
    transform = ReidTrainTransform(size=tuple(data.input_size), mean=data.mean, std=data.std,
                                   flip_prob=0.5 if data.flip else 0.0, padding=data.padding,
                                   erase_prob=data.random_erasing)
    return ordered_loader(source, sampler, [EncodeReid(transform)], data.workers)


class ReidSplit:
    """One evaluation split: images decoded lazily batch by batch, with their identities and cameras.

    An image that fails to decode is a DataError naming it; with eval.skip_bad_records it is logged and left out
    of the split (`without_skipped`), so a query loses its row and a gallery image stops being a match or a
    centroid member.
    """

    def __init__(self, config: Config, source: ReidSource):
        data = config.data
        transform = ReidEvalTransform(size=tuple(data.input_size), mean=data.mean, std=data.std)
        self.images = GalleryImages([record.path for record in source], transform, threads=data.workers,
                                    skip_bad=config.eval.skip_bad_records)
        self.pids = source.pids
        self.camids = source.camids
        self.name = source.name

    def without_skipped(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(embeddings, pids, camids) of the images not skipped while embedding."""
        if not self.images.skipped:
            return embeddings, self.pids, self.camids
        keep = self.images.kept()
        if not keep.any():
            raise DataError(f"every one of the {len(keep)} images of {self.name} was skipped: nothing to evaluate")
        return embeddings[keep], self.pids[keep], self.camids[keep]


def reid_eval_splits(config: Config) -> tuple[ReidSplit, ReidSplit]:
    """(query, gallery)."""
    return ReidSplit(config, reid_source(config, "query")), ReidSplit(config, reid_source(config, "gallery"))
