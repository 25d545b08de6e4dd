"""Cross-device InfoNCE and sigmoid (SigLIP) losses for a batch split over mesh axes.

`gathered_*` and `ring_*` run inside `jax.shard_map` over the batch axes: they take this device's rows
(b of the global N = n * b) and return the loss of the whole global batch, the same scalar on every device,
whose gradient is that of the single-device full-batch loss (`contrastive_loss`, `sigmoid_loss`).

gathered: all_gather the features and ids (open_clip's "local loss + gather with grad"); each device computes
    only its own rows against all N columns (b x N logits), the row sums are psum-ed and divided by N.
ring: the text blocks (with their ids) travel around the ring with ppermute; each step scores one b x b block.
    InfoNCE keeps a streaming log-sum-exp per image row and per text column; the column statistics travel
    with their text block and come home after a full circle, so one matmul per step serves both directions.
    Steps are rematerialised in the backward pass: no device holds more than a b x b logits block (the scan
    keeps each step's visiting b x d text block, n b d in all, for the backward pass).

Gradients: all_gather transposes to psum_scatter (each column's gradient is summed back to the device that
owns it) and ppermute to the inverse ppermute. Taken outside the shard_map (as `sharded_loss` is used), the
gradients are the full-batch ones whatever check_vma is (shard_map divides the replicated output's cotangent
by n before psum's transpose). Taken inside a shard_map, they are right only with check_vma=True (the
default: the psum of the loss transposes to a broadcast, replicated scalars' gradients are psum-ed); under
check_vma=False psum transposes to psum and the rows' gradients come out n times too large.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from jaxretrieval.losses.contrastive import contrastive_loss, pair_logits, positive_mask, soft_cross_entropy
from jaxretrieval.sharding import BATCH_AXES

AxisName = str | tuple[str, ...]


def sigmoid_loss(image_embeddings: jax.Array, text_embeddings: jax.Array, logit_scale: jax.Array,
                 logit_bias: jax.Array, image_ids: jax.Array | None = None,
                 text_ids: jax.Array | None = None) -> jax.Array:
    """SigLIP loss: mean over image rows of the sum over text columns of -log sigmoid(z * (scale x.y + bias)).

    z is +1 where the ids match and -1 elsewhere (normalised by the batch size, as big_vision does).
    Ids default as in `contrastive_loss`: each pair its own group, text_ids = image_ids.
    """
    logits, positives = pair_logits(image_embeddings, text_embeddings, logit_scale, image_ids, text_ids)
    return _sigmoid_terms(logits + logit_bias, positives).sum() / image_embeddings.shape[0]


def _sigmoid_terms(logits: jax.Array, positives: jax.Array) -> jax.Array:
    return -jax.nn.log_sigmoid((2.0 * positives - 1.0) * logits)


def _local_ids(batch: int, image_ids: jax.Array | None, text_ids: jax.Array | None,
               axis_name: AxisName) -> tuple[jax.Array, jax.Array]:
    """This device's ids; the defaults are the rows' global indices (each pair its own group)."""
    if image_ids is None:
        image_ids = jax.lax.axis_index(axis_name) * batch + jnp.arange(batch)
    return image_ids, image_ids if text_ids is None else text_ids


def _prepare(image, text, image_ids, text_ids, axis_name):
    image_ids, text_ids = _local_ids(image.shape[0], image_ids, text_ids, axis_name)
    return image_ids, text_ids, image.shape[0] * jax.lax.axis_size(axis_name)


def gathered_contrastive_loss(local_image: jax.Array, local_text: jax.Array, logit_scale: jax.Array,
                              local_image_ids: jax.Array | None = None, local_text_ids: jax.Array | None = None,
                              axis_name: AxisName = BATCH_AXES) -> jax.Array:
    """Global symmetric InfoNCE from this device's rows and all_gather-ed columns (b x N logits per direction)."""
    image_ids, text_ids, total = _prepare(local_image, local_text, local_image_ids, local_text_ids, axis_name)
    gather = lambda a: jax.lax.all_gather(a, axis_name, tiled=True)
    image, text = local_image.astype(jnp.float32), local_text.astype(jnp.float32)
    all_image, all_text = gather(local_image).astype(jnp.float32), gather(local_text).astype(jnp.float32)
    image_to_text = soft_cross_entropy(logit_scale * image @ all_text.T, positive_mask(image_ids, gather(text_ids)))
    text_to_image = soft_cross_entropy(logit_scale * text @ all_image.T, positive_mask(text_ids, gather(image_ids)))
    return 0.5 * jax.lax.psum(image_to_text.sum() + text_to_image.sum(), axis_name) / total


def gathered_sigmoid_loss(local_image: jax.Array, local_text: jax.Array, logit_scale: jax.Array,
                          logit_bias: jax.Array, local_image_ids: jax.Array | None = None,
                          local_text_ids: jax.Array | None = None, axis_name: AxisName = BATCH_AXES) -> jax.Array:
    """Global SigLIP loss from this device's image rows against all_gather-ed texts (b x N logits)."""
    image_ids, text_ids, total = _prepare(local_image, local_text, local_image_ids, local_text_ids, axis_name)
    all_text = jax.lax.all_gather(local_text, axis_name, tiled=True).astype(jnp.float32)
    logits = logit_scale * local_image.astype(jnp.float32) @ all_text.T + logit_bias
    positives = positive_mask(image_ids, jax.lax.all_gather(text_ids, axis_name, tiled=True))
    return jax.lax.psum(_sigmoid_terms(logits, positives).sum(), axis_name) / total


class _Stats(NamedTuple):
    """Streaming soft cross entropy of a set of rows: running max and sum of exp, positives' logits and count."""

    max: jax.Array
    sumexp: jax.Array
    positive_logits: jax.Array
    positive_count: jax.Array


def _block_stats(logits: jax.Array, positives: jax.Array) -> _Stats:
    top = jax.lax.stop_gradient(logits.max(axis=1))  # any shift gives the same lse; no gradient through it
    return _Stats(top, jnp.exp(logits - top[:, None]).sum(axis=1), (positives * logits).sum(axis=1),
                  positives.sum(axis=1))


def _merge(a: _Stats, b: _Stats) -> _Stats:
    top = jnp.maximum(a.max, b.max)
    sumexp = a.sumexp * jnp.exp(a.max - top) + b.sumexp * jnp.exp(b.max - top)
    return _Stats(top, sumexp, a.positive_logits + b.positive_logits, a.positive_count + b.positive_count)


def _cross_entropy(stats: _Stats) -> jax.Array:
    """Per-row -sum(target * log_softmax), targets uniform over the row's positives (0 for rows without)."""
    lse = stats.max + jnp.log(stats.sumexp)
    mean_positive = stats.positive_logits / jnp.maximum(stats.positive_count, 1.0)
    return jnp.where(stats.positive_count > 0, lse - mean_positive, 0.0)


def _shift(axis_name: AxisName) -> Callable:
    """Sends a pytree of blocks to the next device on the ring (so each receives from the previous one)."""
    n = jax.lax.axis_size(axis_name)
    perm = [(i, (i + 1) % n) for i in range(n)]
    return lambda tree: jax.tree.map(lambda a: jax.lax.ppermute(a, axis_name, perm), tree)


def ring_contrastive_loss(local_image: jax.Array, local_text: jax.Array, logit_scale: jax.Array,
                          local_image_ids: jax.Array | None = None, local_text_ids: jax.Array | None = None,
                          axis_name: AxisName = BATCH_AXES) -> jax.Array:
    """Global symmetric InfoNCE with text blocks passed around the ring; at most b x b logits at a time."""
    image_ids, text_ids, total = _prepare(local_image, local_text, local_image_ids, local_text_ids, axis_name)
    image = local_image.astype(jnp.float32)
    shift = _shift(axis_name)

    @jax.checkpoint
    def block(text: jax.Array, ids: jax.Array) -> tuple[_Stats, _Stats]:
        logits = logit_scale * image @ text.astype(jnp.float32).T
        positives = positive_mask(image_ids, ids)
        return _block_stats(logits, positives), _block_stats(logits.T, positives.T)

    def step(carry, _):
        rows, (text, ids, columns) = carry[0], shift(carry[1:])  # column statistics travel with their block
        block_rows, block_columns = block(text, ids)
        return (_merge(rows, block_rows), text, ids, _merge(columns, block_columns)), None

    rows, columns = block(local_text, text_ids)
    carry = (rows, local_text, text_ids, columns)
    rows, _, _, columns = jax.lax.scan(step, carry, length=jax.lax.axis_size(axis_name) - 1)[0]
    columns = shift(columns)  # the last visit was on the previous device: bring this block's statistics home
    per_device = _cross_entropy(rows).sum() + _cross_entropy(columns).sum()
    return 0.5 * jax.lax.psum(per_device, axis_name) / total


def ring_sigmoid_loss(local_image: jax.Array, local_text: jax.Array, logit_scale: jax.Array, logit_bias: jax.Array,
                      local_image_ids: jax.Array | None = None, local_text_ids: jax.Array | None = None,
                      axis_name: AxisName = BATCH_AXES) -> jax.Array:
    """Global SigLIP loss with text blocks passed around the ring (big_vision's chunked form), b x b at a time."""
    image_ids, text_ids, total = _prepare(local_image, local_text, local_image_ids, local_text_ids, axis_name)
    image = local_image.astype(jnp.float32)
    shift = _shift(axis_name)

    @jax.checkpoint
    def block(text: jax.Array, ids: jax.Array) -> jax.Array:
        logits = logit_scale * image @ text.astype(jnp.float32).T + logit_bias
        return _sigmoid_terms(logits, positive_mask(image_ids, ids)).sum()

    def step(carry, _):
        loss, text, ids = carry
        text, ids = shift((text, ids))
        return (loss + block(text, ids), text, ids), None

    carry = (block(local_text, text_ids), local_text, text_ids)
    loss = jax.lax.scan(step, carry, length=jax.lax.axis_size(axis_name) - 1)[0][0]
    return jax.lax.psum(loss, axis_name) / total


_LOCAL_LOSSES = {
    ("contrastive", "gathered"): gathered_contrastive_loss,
    ("contrastive", "ring"): ring_contrastive_loss,
    ("sigmoid", "gathered"): gathered_sigmoid_loss,
    ("sigmoid", "ring"): ring_sigmoid_loss,
}


def sharded_loss(kind: str, variant: str, mesh: Mesh, axis_name: AxisName = BATCH_AXES) -> Callable[..., jax.Array]:
    """The loss on global arrays whose batch dimension is split over `axis_name` of `mesh`.

    kind: "contrastive" or "sigmoid"; variant: "gathered" or "ring". The returned function has the signature
    of the single-device loss (`contrastive_loss(image, text, scale, image_ids=None, text_ids=None)` or
    `sigmoid_loss(image, text, scale, bias, image_ids=None, text_ids=None)`) and returns the same value and
    gradients; batch arrays are taken as P(axis_name), scale and bias replicated.
    """
    if (kind, variant) not in _LOCAL_LOSSES:
        raise ValueError(f"unknown loss {kind!r}/{variant!r}; choose from {sorted(_LOCAL_LOSSES)}")
    local = _LOCAL_LOSSES[(kind, variant)]
    batch, replicated = PartitionSpec(axis_name), PartitionSpec()

    def body(image, text, scalars, image_ids, text_ids):
        return local(image, text, *scalars, image_ids, text_ids, axis_name=axis_name)

    mapped = jax.shard_map(body, mesh=mesh, in_specs=(batch, batch, replicated, batch, batch), out_specs=replicated)

    def call(image, text, scalars, image_ids, text_ids):
        scalars = tuple(jnp.asarray(s, jnp.float32) for s in scalars)
        return mapped(image, text, scalars, image_ids, text_ids)

    if kind == "contrastive":
        def loss(image: jax.Array, text: jax.Array, logit_scale: jax.Array, image_ids: jax.Array | None = None,
                 text_ids: jax.Array | None = None) -> jax.Array:
            return call(image, text, (logit_scale,), image_ids, text_ids)
    else:
        def loss(image: jax.Array, text: jax.Array, logit_scale: jax.Array, logit_bias: jax.Array,
                 image_ids: jax.Array | None = None, text_ids: jax.Array | None = None) -> jax.Array:
            return call(image, text, (logit_scale, logit_bias), image_ids, text_ids)
    loss.__doc__ = f"{kind} loss ({variant}) over the mesh's {axis_name} axes; see `sharded_loss`."
    return loss


LossFn = Callable[[jax.Array, jax.Array, tuple[jax.Array, ...], jax.Array], jax.Array]
LOSS_VARIANTS = ("local", "gathered", "ring")


def training_loss(kind: str = "contrastive", variant: str = "local", mesh: Mesh | None = None) -> LossFn:
    """(image, text, scalars, ids) -> loss: the train step's loss, scalars being the model's `loss_scalars()`
    ((scale,) for InfoNCE, (scale, bias) for sigmoid). local: the single-device formula on global arrays, which
    XLA partitions itself (the full N x N logits, split by rows); gathered / ring: `sharded_loss` over the
    mesh's batch axes."""
    if variant not in LOSS_VARIANTS:
        raise ValueError(f"unknown loss variant {variant!r}; choose from {', '.join(LOSS_VARIANTS)}")
    if variant == "local":
        losses = {"contrastive": contrastive_loss, "sigmoid": sigmoid_loss}
        if kind not in losses:
            raise ValueError(f"unknown loss {kind!r}; choose from {', '.join(losses)}")
        fn = losses[kind]
    else:
        if mesh is None:
            raise ValueError(f"loss variant {variant!r} needs the device mesh")
        fn = sharded_loss(kind, variant, mesh)
    expected = 1 if kind == "contrastive" else 2

    def loss(image: jax.Array, text: jax.Array, scalars: tuple[jax.Array, ...], ids: jax.Array) -> jax.Array:
        if len(scalars) != expected:
            raise ValueError(f"the {kind} loss takes {expected} logit scalars, the model gives {len(scalars)} "
                             f"(model.init_logit_bias adds the sigmoid loss's bias)")
        return fn(image, text, *scalars, ids)

    return loss
