"""Image-text matching (ITM) with hard negatives, and masked language modelling (MLM) cross entropy.

Hard negatives, as X2-VLM samples them (models/xvlm.py, `XVLMBase.get_hard_negatives`, read for facts only):
    sim_i2t = image @ text.T / temp,  sim_t2i = text @ image.T / temp    (no gradient: torch.no_grad)
    weights = softmax(sim, dim=1) + 1e-5     the softmax runs over the whole row, positives included
    weights[idx_row == idx_col] = 0          same group (same image / same person); the diagonal when idx is None
    one torch.multinomial(weights[b], 1) per row, which normalises the row's weights
A text row picks the negative image, an image row the negative text. ALBEF (models/model_retrieval.py,
`ALBEF.forward`) writes softmax(sim + 1e-4): a constant inside a softmax cancels, so `epsilon=0` is its
arithmetic; its pre-training (models/model_pretrain.py) zeroes only the diagonal, i.e. each pair its own group.
Both originals sample within each GPU's local batch; here a row samples over the gathered global batch, and the
randomness of global row r is `fold_in(split(key)[direction], r)`, so the picks do not depend on the device count.
The default epsilon is X2-VLM's (`X2VLM_EPSILON`; CFACK is built on X2-VLM).

A row whose every column is a positive has no negative: torch.multinomial raises there (all weights zero). We
return the row's own global index with `valid` False; `matching_batch` gives such pairs weight 0, so `itm_loss`
leaves them out of its mean, and the cross-encoder still sees a real (finite) pair.

ITM batch (X2-VLM `get_matching_loss`, ALBEF `forward`): the b positive pairs, then (negative image, text) for
each text, then (image, negative text) for each image; labels [1]*b + [0]*2b; mean cross entropy over the 3b.
MLM: cross entropy over the positions whose label is not -100 (X2-VLM models/xbert.py `BertForMaskedLM.forward`,
nn.CrossEntropyLoss(); masked_ids are padded with -100, dataset/pretrain_dataset.py), averaged over the global
count of such positions. With no such position torch returns NaN; we return 0 (and zero gradients).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from jaxretrieval.sharding import BATCH_AXES

AxisName = str | tuple[str, ...]
X2VLM_EPSILON = 1e-5
IGNORE_INDEX = -100


class HardNegatives(NamedTuple):
    """Global indices of one negative per row, and whether the row had any negative to pick."""

    text_for_image: jax.Array  # (rows,) int32: the negative text of each image row
    image_for_text: jax.Array  # (rows,) int32: the negative image of each text row
    text_valid: jax.Array  # (rows,) bool; False: no negative text, text_for_image is the row's own index
    image_valid: jax.Array  # (rows,) bool


class MatchingBatch(NamedTuple):
    """The 3b cross-encoder inputs: positives, (negative image, text), (image, negative text)."""

    images: Any  # pytree of (3b, ...) arrays
    texts: Any
    labels: jax.Array  # (3b,) int32: 1 for the b positive pairs, 0 for the 2b negatives
    weights: jax.Array  # (3b,) float32: 0 for a negative pair whose row had no negative


def _float(x: jax.Array) -> jax.Array:
    """At least float32 (bfloat16 is computed in float32, float64 stays float64)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _similarity(rows: jax.Array, cols: jax.Array, scale: jax.Array | float) -> jax.Array:
    rows, cols = _float(jax.lax.stop_gradient(rows)), _float(jax.lax.stop_gradient(cols))
    # full precision: accelerators' default bf16 / tf32 products would make the picks depend on the layout
    return jax.lax.stop_gradient(scale) * jnp.matmul(rows, cols.T, precision=jax.lax.Precision.HIGHEST)


def negative_log_weights(similarity: jax.Array, row_ids: jax.Array, col_ids: jax.Array,
                         epsilon: float = X2VLM_EPSILON) -> jax.Array:
    """(rows, cols) log of X2-VLM's sampling weights, log(softmax(similarity, axis=1) + epsilon), and -inf where
    row_ids[i] == col_ids[j] (positives, which are never drawn). The softmax includes the positives' columns."""
    log_p = jax.nn.log_softmax(_float(jax.lax.stop_gradient(similarity)), axis=-1)
    if epsilon > 0:
        log_p = jnp.logaddexp(log_p, jnp.log(jnp.asarray(epsilon, log_p.dtype)))
    return jnp.where(row_ids[:, None] == col_ids[None, :], -jnp.inf, log_p)


def sample_negatives(key: jax.Array, similarity: jax.Array, row_ids: jax.Array, col_ids: jax.Array,
                     first_row: jax.Array | int = 0,
                     epsilon: float = X2VLM_EPSILON) -> tuple[jax.Array, jax.Array]:
    """One column per row drawn with probability proportional to `negative_log_weights`' exp.

    similarity: (rows, cols) scaled scores (X2-VLM: sim / temp), e.g. a block of rows of the global matrix whose
    first row is global row `first_row`; row r draws with fold_in(key, r). Returns (columns int32, valid bool):
    a row without a negative column gets `first_row + i` (its own global index) and valid False.
    """
    log_weights = negative_log_weights(similarity, row_ids, col_ids, epsilon)
    rows = first_row + jnp.arange(similarity.shape[0])
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, rows)
    picks = jax.vmap(jax.random.categorical)(keys, log_weights)
    valid = (row_ids[:, None] != col_ids[None, :]).any(axis=-1)
    return jnp.where(valid, picks, rows).astype(jnp.int32), valid


def _default_ids(rows: int, image_ids: jax.Array | None, text_ids: jax.Array | None,
                 first_row: jax.Array | int) -> tuple[jax.Array, jax.Array]:
    """Ids default to the global row indices (each pair its own group) and text_ids to image_ids."""
    if image_ids is None:
        image_ids = first_row + jnp.arange(rows)
    return image_ids, image_ids if text_ids is None else text_ids


def _hard_negatives_block(key: jax.Array, image: jax.Array, text: jax.Array, all_image: jax.Array,
                          all_text: jax.Array, scale: jax.Array | float, image_ids: jax.Array, text_ids: jax.Array,
                          all_image_ids: jax.Array, all_text_ids: jax.Array, first_row: jax.Array | int,
                          epsilon: float) -> HardNegatives:
    image_key, text_key = jax.random.split(key)
    text_for_image, text_valid = sample_negatives(image_key, _similarity(image, all_text, scale), image_ids,
                                                  all_text_ids, first_row, epsilon)
    image_for_text, image_valid = sample_negatives(text_key, _similarity(text, all_image, scale), text_ids,
                                                   all_image_ids, first_row, epsilon)
    return HardNegatives(text_for_image, image_for_text, text_valid, image_valid)


def hard_negatives(key: jax.Array, image_features: jax.Array, text_features: jax.Array,
                   scale: jax.Array | float = 1.0, image_ids: jax.Array | None = None,
                   text_ids: jax.Array | None = None, epsilon: float = X2VLM_EPSILON) -> HardNegatives:
    """One negative text per image and one negative image per text over the whole batch (single device).

    image_features, text_features: (N, d) (L2-normalised, as the ITC features); scale: 1 / temperature.
    image_ids / text_ids: (N,) group ids (same image / same person); None: each pair its own group, and
    text_ids defaults to image_ids. No gradient flows through the sampling.
    """
    image_ids, text_ids = _default_ids(image_features.shape[0], image_ids, text_ids, 0)
    return _hard_negatives_block(key, image_features, text_features, image_features, text_features, scale,
                                 image_ids, text_ids, image_ids, text_ids, 0, epsilon)


def _gather(x: jax.Array, axis_name: AxisName) -> jax.Array:
    return jax.lax.all_gather(x, axis_name, tiled=True)


def gathered_hard_negatives(key: jax.Array, local_image: jax.Array, local_text: jax.Array,
                            scale: jax.Array | float = 1.0, local_image_ids: jax.Array | None = None,
                            local_text_ids: jax.Array | None = None, epsilon: float = X2VLM_EPSILON,
                            axis_name: AxisName = BATCH_AXES) -> HardNegatives:
    """`hard_negatives` from inside a shard_map: this device's b rows draw over all N all_gather-ed columns.

    key must be the same on every device. Returns global column indices for this device's rows, equal to rows
    [i*b, (i+1)*b) of `hard_negatives` on the whole batch with the same key.
    """
    batch = local_image.shape[0]
    first_row = jax.lax.axis_index(axis_name) * batch
    image_ids, text_ids = _default_ids(batch, local_image_ids, local_text_ids, first_row)
    return _hard_negatives_block(key, local_image, local_text, _gather(local_image, axis_name),
                                 _gather(local_text, axis_name), scale, image_ids, text_ids,
                                 _gather(image_ids, axis_name), _gather(text_ids, axis_name), first_row, epsilon)


def gather_rows(tree: Any, indices: jax.Array, axis_name: AxisName | None = None) -> Any:
    """The rows `indices` (global) of every leaf of `tree` (leading axis: rows). With axis_name (inside a
    shard_map) the leaves are this device's rows, all_gather-ed first; gradients go back to the owning device."""
    gather = (lambda x: x) if axis_name is None else (lambda x: _gather(x, axis_name))
    return jax.tree.map(lambda x: jnp.take(gather(x), indices, axis=0), tree)


def matching_batch(images: Any, texts: Any, negatives: HardNegatives,
                   axis_name: AxisName | None = None) -> MatchingBatch:
    """X2-VLM's 3b ITM arrangement from the b pairs (row i of `images` goes with row i of `texts`, pytrees such
    as (embeddings, attention mask)): [pairs; (negative image, text); (image, negative text)]."""
    negative_images = gather_rows(images, negatives.image_for_text, axis_name)
    negative_texts = gather_rows(texts, negatives.text_for_image, axis_name)
    concat = lambda *parts: jnp.concatenate(parts, axis=0)
    batch = negatives.text_for_image.shape[0]
    labels = jnp.concatenate([jnp.ones(batch, jnp.int32), jnp.zeros(2 * batch, jnp.int32)])
    weights = jnp.concatenate([jnp.ones(batch, jnp.float32), negatives.image_valid.astype(jnp.float32),
                               negatives.text_valid.astype(jnp.float32)])
    return MatchingBatch(jax.tree.map(concat, images, negative_images, images),
                         jax.tree.map(concat, texts, texts, negative_texts), labels, weights)


def _cross_entropy_sums(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of weight * -log softmax(logits)[label], sum of weights); labels where weight is 0 may be anything."""
    log_p = jax.nn.log_softmax(_float(logits), axis=-1)
    safe = jnp.where(weights > 0, labels, 0)
    nll = -jnp.take_along_axis(log_p, safe[..., None], axis=-1)[..., 0]
    weights = weights.astype(log_p.dtype)
    return jnp.sum(jnp.where(weights > 0, weights * nll, 0.0)), jnp.sum(weights)


def _mean(total: jax.Array, count: jax.Array) -> jax.Array:
    """total / count, and 0 (with zero gradients, no NaN) when count is 0."""
    return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)


def _itm_weights(labels: jax.Array, weights: jax.Array | None) -> jax.Array:
    return jnp.ones(labels.shape, jnp.float32) if weights is None else weights


def itm_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Mean cross entropy of (n, 2) ITM logits against labels (1 match, 0 not): F.cross_entropy's mean. With
    weights (n,) (`MatchingBatch.weights`), sum(w * ce) / sum(w), 0 when every weight is 0."""
    return _mean(*_cross_entropy_sums(logits, labels, _itm_weights(labels, weights)))


def mlm_loss(logits: jax.Array, labels: jax.Array, ignore_index: int = IGNORE_INDEX) -> jax.Array:
    """Cross entropy of (..., V) logits over the positions whose label (...) is not ignore_index, averaged over
    their count: F.cross_entropy(logits.view(-1, V), labels.view(-1), ignore_index=-100). 0 when none is."""
    return _mean(*_cross_entropy_sums(logits, labels, (labels != ignore_index).astype(jnp.float32)))


def gathered_itm_loss(local_logits: jax.Array, local_labels: jax.Array, local_weights: jax.Array | None = None,
                      axis_name: AxisName = BATCH_AXES) -> jax.Array:
    """`itm_loss` of the global batch from inside a shard_map: sums and weight counts psum-ed over axis_name."""
    sums = _cross_entropy_sums(local_logits, local_labels, _itm_weights(local_labels, local_weights))
    return _mean(*jax.lax.psum(sums, axis_name))


def gathered_mlm_loss(local_logits: jax.Array, local_labels: jax.Array, ignore_index: int = IGNORE_INDEX,
                      axis_name: AxisName = BATCH_AXES) -> jax.Array:
    """`mlm_loss` of the global batch from inside a shard_map: the mean over the global count of masked
    positions (sums and counts psum-ed), the same scalar on every device."""
    sums = _cross_entropy_sums(local_logits, local_labels, (local_labels != ignore_index).astype(jnp.float32))
    return _mean(*jax.lax.psum(sums, axis_name))


def sharded_hard_negatives(mesh: Mesh, axis_name: AxisName = BATCH_AXES,
                           epsilon: float = X2VLM_EPSILON) -> Callable[..., HardNegatives]:
    """`hard_negatives` on global arrays split over `axis_name` of `mesh` (key and scale replicated); returns
    global index arrays split the same way, equal to `hard_negatives`' with the same key."""
    batch, replicated = PartitionSpec(axis_name), PartitionSpec()

    def body(key, image, text, scale, image_ids, text_ids):
        return gathered_hard_negatives(key, image, text, scale, image_ids, text_ids, epsilon, axis_name)

    mapped = jax.shard_map(body, mesh=mesh, in_specs=(replicated, batch, batch, replicated, batch, batch),
                           out_specs=batch)

    def negatives(key: jax.Array, image_features: jax.Array, text_features: jax.Array,
                  scale: jax.Array | float = 1.0, image_ids: jax.Array | None = None,
                  text_ids: jax.Array | None = None) -> HardNegatives:
        if image_ids is None:
            image_ids = jnp.arange(image_features.shape[0])
        text_ids = image_ids if text_ids is None else text_ids
        return mapped(key, image_features, text_features, jnp.asarray(scale, jnp.float32), image_ids, text_ids)

    return negatives


def sharded_itm_loss(mesh: Mesh, axis_name: AxisName = BATCH_AXES) -> Callable[..., jax.Array]:
    """`itm_loss(logits, labels, weights=None)` on global arrays split over `axis_name` of `mesh`: the same value
    and gradients (take them outside)."""
    batch = PartitionSpec(axis_name)
    mapped = jax.shard_map(lambda logits, labels, weights: gathered_itm_loss(logits, labels, weights, axis_name),
                           mesh=mesh, in_specs=(batch, batch, batch), out_specs=PartitionSpec())

    def loss(logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None) -> jax.Array:
        return mapped(logits, labels, _itm_weights(labels, weights))

    return loss


def sharded_mlm_loss(mesh: Mesh, axis_name: AxisName = BATCH_AXES,
                     ignore_index: int = IGNORE_INDEX) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """`mlm_loss(logits, labels)` on global arrays split over `axis_name` of `mesh` (by batch rows): the same
    value and gradients (take them outside)."""
    batch = PartitionSpec(axis_name)
    return jax.shard_map(lambda logits, labels: gathered_mlm_loss(logits, labels, ignore_index, axis_name),
                         mesh=mesh, in_specs=(batch, batch), out_specs=PartitionSpec())
