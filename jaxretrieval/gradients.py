"""Gradients of the contrastive loss over a batch, whole or in micro-batches (large batches on small hardware).

- whole: one forward and backward over the batch.
- cache (gradient caching, Gao et al. 2021): embed every micro-batch without keeping activations, take the
  full-batch loss and its gradient with respect to the embeddings, then back-propagate micro-batch by
  micro-batch with those embedding gradients. The result is the full-batch gradient, with activation memory of
  one micro-batch (at the price of a second forward).
- mean: the mean of each micro-batch's own loss and gradient (every micro-batch its own set of negatives, as
  unilm's --update_freq accumulates).

Micro-batch m holds rows m, m + M, m + 2M, ... so that each one stays spread over every device of the batch axes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxretrieval.losses import training_loss
from jaxretrieval.losses.distributed import LossFn
from jaxretrieval.losses.metric import CTLLossConfig, ctl_total_loss

# (params, batch, key) -> (loss, the model's loss scalars, grads)
GradFn = Callable[[Any, dict[str, jax.Array], jax.Array], tuple[jax.Array, tuple[jax.Array, ...], Any]]


def split_micro_batches(batch: dict[str, jax.Array], micro_batches: int) -> dict[str, jax.Array]:
    """(B, ...) -> (M, B / M, ...), micro-batch m holding rows m, m + M, ..."""
    def split(x: jax.Array) -> jax.Array:
        rows = x.shape[0]
        if rows % micro_batches:
            raise ValueError(f"batch of {rows} does not split into {micro_batches} micro-batches")
        return jnp.swapaxes(x.reshape(rows // micro_batches, micro_batches, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


# (params, batch, key) -> (per-row features, e.g. (image, text) embeddings; the model's loss scalars)
Embed = Callable[[Any, dict[str, jax.Array], jax.Array], tuple[tuple[jax.Array | None, ...], Any]]
# (features over the rows, scalars, the rows' batch fields) -> (loss, terms to log)
BatchLoss = Callable[[tuple[jax.Array | None, ...], Any, dict[str, jax.Array]], tuple[jax.Array, dict]]


def micro_batched(embed: Embed, batch_loss: BatchLoss, scalars_of: Callable[[Any], Any], micro_batches: int = 1,
                  mode: str = "cache") -> Callable:
    """(params, batch, key) -> (loss, scalars, terms, grads) of a loss over per-row features, the batch whole or
    in micro-batches (see the module docstring). `scalars_of(params)`: the scalars `embed` returns (temperatures,
    logit scale), which gradient caching differentiates apart from the features. Features may be None (a head
    the model lacks)."""

    def whole(params: Any, batch: dict[str, jax.Array], key: jax.Array) -> tuple:
        def loss_of(p: Any) -> tuple[jax.Array, tuple]:
            features, scalars = embed(p, batch, key)
            loss, terms = batch_loss(features, scalars, batch)
            return loss, (scalars, terms)

        (loss, (scalars, terms)), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        return loss, scalars, terms, grads

    def mean(params: Any, batch: dict[str, jax.Array], key: jax.Array) -> tuple:
        def accumulate(total: tuple[jax.Array, Any], chunk: tuple[dict, jax.Array]) -> tuple[tuple, tuple]:
            loss, scalars, terms, grads = whole(params, *chunk)
            return (total[0] + loss, jax.tree.map(jnp.add, total[1], grads)), (scalars, terms)

        chunks = (split_micro_batches(batch, micro_batches), jax.random.split(key, micro_batches))
        zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        (loss, grads), (scalars, terms) = jax.lax.scan(accumulate, zero, chunks)
        last = jax.tree.map(lambda s: s[-1], scalars)
        terms = jax.tree.map(lambda t: t.mean(axis=0), terms)
        return loss / micro_batches, last, terms, jax.tree.map(lambda g: g / micro_batches, grads)

    def cache(params: Any, batch: dict[str, jax.Array], key: jax.Array) -> tuple:
        chunks = split_micro_batches(batch, micro_batches)
        keys = jax.random.split(key, micro_batches)

        def features_of(p: Any, chunk: dict, k: jax.Array) -> tuple:
            return embed(p, chunk, k)[0]

        per_chunk = jax.lax.map(lambda c: features_of(params, *c), (chunks, keys))
        flat = lambda x: None if x is None else x.reshape(-1, *x.shape[2:])  # noqa: E731
        features = tuple(flat(f) for f in per_chunk)
        rows = {name: flat(value) for name, value in chunks.items()}
        scalars, scalars_vjp = jax.vjp(scalars_of, params)
        (loss, terms), (d_features, d_scalars) = jax.value_and_grad(
            lambda f, s: batch_loss(f, s, rows), argnums=(0, 1), has_aux=True)(features, scalars)

        def backward(grads: Any, chunk: tuple) -> tuple[Any, None]:
            inputs, k, cotangents = chunk
            _, vjp = jax.vjp(lambda p: features_of(p, inputs, k), params)
            return jax.tree.map(jnp.add, grads, vjp(cotangents)[0]), None

        cotangents = tuple(None if d is None else d.reshape(f.shape) for d, f in zip(d_features, per_chunk,
                                                                                        strict=True))
        grads, _ = jax.lax.scan(backward, scalars_vjp(d_scalars)[0], (chunks, keys, cotangents))
        return loss, scalars, terms, grads

    if micro_batches == 1:
        return whole
    return {"cache": cache, "mean": mean}[mode]


def make_grad_fn(graphdef: nnx.GraphDef, micro_batches: int = 1, mode: str = "cache",
                 loss_fn: LossFn | None = None) -> GradFn:
    """A dual encoder's (loss, logit scalars, grads) under loss_fn(image, text, scalars, ids) (see `training_loss`;
    default the local InfoNCE) over the batch, whole or in micro-batches."""
    loss_fn = loss_fn or training_loss()

    def embed(params: Any, batch: dict[str, jax.Array], key: jax.Array) -> tuple[tuple, tuple]:
        model = nnx.merge(graphdef, params)
        image, text, _ = model(batch["image"], batch["text"], rngs=nnx.Rngs(dropout=key))
        return (image, text), model.loss_scalars()

    def batch_loss(features: tuple, scalars: tuple, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict]:
        return loss_fn(*features, scalars, batch["group"]), {}

    grad_fn = micro_batched(embed, batch_loss, lambda p: nnx.merge(graphdef, p).loss_scalars(), micro_batches, mode)

    def fn(params: Any, batch: dict[str, jax.Array], key: jax.Array) -> tuple[jax.Array, tuple, Any]:
        loss, scalars, _, grads = grad_fn(params, batch, key)
        return loss, scalars, grads

    return fn


def contrastive_grad_fn(graphdef: nnx.GraphDef, micro_batches: int = 1, accumulation: str = "cache",
                        loss_fn: LossFn | None = None) -> Callable:
    """make_grad_fn in the train step's form: (loss, metrics, grads, no state)."""
    grad_fn = make_grad_fn(graphdef, micro_batches, accumulation, loss_fn)

    def fn(params, batch, key):
        loss, scalars, grads = grad_fn(params, batch, key)
        names = ("logit_scale", "logit_bias")[:len(scalars)]
        return loss, dict(zip(names, scalars, strict=True)), grads, None

    return fn


def make_ctl_grad_fn(graphdef: nnx.GraphDef, loss_config: CTLLossConfig
                     ) -> Callable[[Any, dict[str, jax.Array], jax.Array], tuple[jax.Array, dict, Any, Any]]:
    """(params, batch, key) -> (loss, its weighted parts, grads, new batch-norm statistics) of Centroids-ReID's
    loss over an identity-balanced batch ({"image", "label"}): the forward runs in train mode, so every batch
    norm normalises by and updates statistics of the global batch (synchronised over the devices)."""
    def loss_fn(params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, tuple[dict, Any]]:
        model = nnx.merge(graphdef, params)
        outputs = model(batch["image"], train=True)
        total, parts = ctl_total_loss(outputs, batch["label"], model.center_loss.centers[...], loss_config)
        return total, (parts, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))

    def grad_fn(params: Any, batch: dict[str, jax.Array], key: jax.Array) -> tuple[jax.Array, dict, Any, Any]:
        del key  # no stochastic layers
        (loss, (parts, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        return loss, parts, grads, stats

    return grad_fn
