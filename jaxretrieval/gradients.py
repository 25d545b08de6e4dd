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


def make_grad_fn(graphdef: nnx.GraphDef, micro_batches: int = 1, mode: str = "cache",
                 loss_fn: LossFn | None = None) -> GradFn:
    """loss_fn(image, text, scalars, ids) (see `training_loss`; default the local InfoNCE) over the batch."""
    loss_fn = loss_fn or training_loss()

    def embed(params: Any, batch: dict[str, jax.Array], key: jax.Array) -> tuple[jax.Array, jax.Array, tuple]:
        model = nnx.merge(graphdef, params)
        image, text, _ = model(batch["image"], batch["text"], rngs=nnx.Rngs(dropout=key))
        return image, text, model.loss_scalars()

    def batch_loss(params: Any, batch: dict[str, jax.Array], key: jax.Array) -> tuple[jax.Array, tuple]:
        image, text, scalars = embed(params, batch, key)
        return loss_fn(image, text, scalars, batch["group"]), scalars

    def whole(params: Any, batch: dict[str, jax.Array], key: jax.Array) -> tuple[jax.Array, tuple, Any]:
        (loss, scalars), grads = jax.value_and_grad(batch_loss, has_aux=True)(params, batch, key)
        return loss, scalars, grads

    def mean(params: Any, batch: dict[str, jax.Array], key: jax.Array) -> tuple[jax.Array, tuple, Any]:
        def accumulate(total: tuple[jax.Array, Any], chunk: tuple[dict, jax.Array]) -> tuple[tuple, tuple]:
            (loss, scalars), grads = jax.value_and_grad(batch_loss, has_aux=True)(params, *chunk)
            return (total[0] + loss, jax.tree.map(jnp.add, total[1], grads)), scalars

        chunks = (split_micro_batches(batch, micro_batches), jax.random.split(key, micro_batches))
        zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        (loss, grads), scalars = jax.lax.scan(accumulate, zero, chunks)
        last = tuple(s[-1] for s in scalars)
        return loss / micro_batches, last, jax.tree.map(lambda g: g / micro_batches, grads)

    def cache(params: Any, batch: dict[str, jax.Array], key: jax.Array) -> tuple[jax.Array, tuple, Any]:
        chunks = split_micro_batches(batch, micro_batches)
        keys = jax.random.split(key, micro_batches)

        def embed_pair(p: Any, chunk: dict, k: jax.Array) -> tuple[jax.Array, jax.Array]:
            image, text, _ = embed(p, chunk, k)
            return image, text

        images, texts = jax.lax.map(lambda c: embed_pair(params, *c), (chunks, keys))
        flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
        scalars, scalars_vjp = jax.vjp(lambda p: nnx.merge(graphdef, p).loss_scalars(), params)
        loss, (d_image, d_text, d_scalars) = jax.value_and_grad(loss_fn, argnums=(0, 1, 2))(
            flat(images), flat(texts), scalars, chunks["group"].reshape(-1))

        def backward(grads: Any, chunk: tuple) -> tuple[Any, None]:
            inputs, k, g_image, g_text = chunk
            _, vjp = jax.vjp(lambda p: embed_pair(p, inputs, k), params)
            return jax.tree.map(jnp.add, grads, vjp((g_image, g_text))[0]), None

        cotangents = (d_image.reshape(images.shape), d_text.reshape(texts.shape))
        grads, _ = jax.lax.scan(backward, scalars_vjp(d_scalars)[0], (chunks, keys, *cotangents))
        return loss, scalars, grads

    if micro_batches == 1:
        return whole
    return {"cache": cache, "mean": mean}[mode]


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
