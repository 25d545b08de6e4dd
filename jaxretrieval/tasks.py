"""What the one train loop needs from a kind of data: batches from a given step, an evaluation, and what checkpoints
carry besides the config. The builders for captioned images and for re-id identities, which systems choose from."""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxretrieval.config import Config, ConfigError
from jaxretrieval.data import reid_pipeline
from jaxretrieval.data.pipeline import (
    caption_source,
    data_root,
    eval_inputs,
    make_tokenizer,
    stream_loader,
    train_loader,
)
from jaxretrieval.evaluate import evaluate_reid_splits, evaluate_retrieval
from jaxretrieval.retrieval.rerank import RerankSpec
from jaxretrieval.systems import get_system
from jaxretrieval.systems.base import Evaluator, System

log = logging.getLogger(__name__)


class Task(NamedTuple):
    config: Config  # with what the data decides: train.steps from train.epochs, model.num_classes
    loader: Callable[[int], Any]  # start step -> iterable of this process's share of each global batch
    evaluate: Callable[[nnx.GraphDef, Any, Mesh], dict[str, Any]]  # (graphdef, params, mesh) -> metrics
    meta: dict[str, Any]  # saved in every checkpoint beside the config (the tokenizer)
    describe: Callable[[np.ndarray], list[str]]  # a batch's "origin" rows -> where each record came from


def with_epoch_steps(config: Config, batches_per_epoch: int, what: str) -> Config:
    """train.epochs > 0 sets train.steps to epochs x batches per epoch (the count unilm and Centroids-ReID
    schedule over)."""
    if not config.train.epochs:
        return config
    if batches_per_epoch == 0:
        raise ConfigError(f"train.batch_size {config.train.batch_size} exceeds the training data ({what})")
    steps = max(1, round(config.train.epochs * batches_per_epoch))
    log.info("train.epochs=%g: %d steps (%d per epoch)", config.train.epochs, steps, batches_per_epoch)
    return dataclasses.replace(config, train=dataclasses.replace(config.train, steps=steps))


def image_text_evaluator(config: Config, tokenizer: Any, source: Any = None) -> Evaluator:
    """eval.protocol (image_text or text_to_image) on `source` (default eval.split) with the model's normalised
    `encode_image` / `encode_text`."""
    source = source or caption_source(config, data_root(config), config.eval.split)
    eval_data = eval_inputs(config, source, tokenizer)

    system = get_system(config.system)

    def evaluate(graphdef: nnx.GraphDef, params: Any, mesh: Mesh) -> dict[str, Any]:
        e = config.eval
        rerank = None if not e.rerank_k else RerankSpec(system.cross_encoder(config, graphdef, mesh), e.rerank_k,
                                                         e.rerank_fill, e.rerank_combine, e.rerank_batch)
        return evaluate_retrieval(graphdef, params, eval_data, mesh, e.batch_size, e.protocol, e.folds, rerank)

    return evaluate


def image_text_task(config: Config, init_meta: dict, system: System) -> Task:
    """Captioned images: the system's record fields join each batch; its evaluator scores eval.split."""
    root = data_root(config)
    tokenizer = make_tokenizer(config, root, init_meta.get("tokenizer"))
    source = caption_source(config, root, "train")
    config = with_epoch_steps(config, len(source) // config.train.batch_size, f"{len(source)} records")
    evaluate = system.evaluator(config, tokenizer)
    fields = system.record_fields(config, source)

    def describe(origin: np.ndarray) -> list[str]:
        return [f"{source.paths[file]}:{line}" for file, line in origin.tolist()]

    return Task(config, lambda start: train_loader(config, source, tokenizer, start_step=start, fields=fields),
                evaluate, {"tokenizer": tokenizer.to_spec()}, describe)


def caption_stream_task(config: Config, init_meta: dict, system: System,
                        make_encode: Callable[[Config, Any, Any, Any], Any]) -> Task:
    """Captioned images through a system's own per-record encoder (CFACK's views, UIT's augmentations):
    `make_encode(config, root, tokenizer, source)` gives the grain RandomMap; its evaluator scores eval.split."""
    root = data_root(config)
    tokenizer = make_tokenizer(config, root, init_meta.get("tokenizer"))
    source = caption_source(config, root, "train")
    config = with_epoch_steps(config, len(source) // config.train.batch_size, repr(source))
    encode = make_encode(config, root, tokenizer, source)

    def describe(origin: np.ndarray) -> list[str]:
        return [f"{source.paths[file]} record {line}" for file, line in origin.tolist()]

    return Task(config, functools.partial(stream_loader, config, source, encode), system.evaluator(config, tokenizer),
                {"tokenizer": tokenizer.to_spec()}, describe)


def reid_evaluator(config: Config) -> Evaluator:
    """The query split against the gallery (images and identity centroids), from BN-neck features."""
    splits = reid_pipeline.reid_eval_splits(config)
    per_camera = config.section.per_camera_centroids

    def evaluate(graphdef: nnx.GraphDef, params: Any, mesh: Mesh) -> dict[str, Any]:
        return evaluate_reid_splits(graphdef, params, splits, mesh, config.eval.batch_size, per_camera)

    return evaluate


def reid_task(config: Config, system: System) -> Task:
    """Identity-balanced batches of re-id folders; model.num_classes defaults to the training identities."""
    source = reid_pipeline.reid_source(config, "train")
    if config.model.num_classes == 0:
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, num_classes=source.num_ids))
    elif config.model.num_classes < source.num_ids:
        raise ConfigError(f"model.num_classes={config.model.num_classes} but {source} has {source.num_ids} "
                          f"identities")
    config = with_epoch_steps(config, reid_pipeline.batches_per_epoch(config, source), repr(source))

    def describe(origin: np.ndarray) -> list[str]:
        return [f"identity {pid} camera {camera + 1}" for pid, camera in origin.tolist()]

    return Task(config, lambda start: reid_pipeline.reid_train_loader(config, source, start_step=start),
                system.evaluator(config, None), {}, describe)


def make_task(config: Config, init_meta: dict) -> Task:
    """The task of config.system; `init_meta` is train.init_from's checkpoint metadata (its tokenizer)."""
    return get_system(config.system).task(config, init_meta)
