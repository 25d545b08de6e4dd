"""Symmetric InfoNCE with positive groups.

Every caption of one image shares that image's id, so a row's positives are all columns with the same id
and the target is spread evenly over them (the ALBEF / X-VLM form; with unique ids it is the CLIP loss).
The loss is written from per-row pieces (`soft_cross_entropy` over a block of rows) so that the
cross-device variants can compute only their local rows against gathered columns and reuse it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def positive_mask(row_ids: jax.Array, col_ids: jax.Array) -> jax.Array:
    """(rows, cols) float mask, 1 where the ids match."""
    return (row_ids[:, None] == col_ids[None, :]).astype(jnp.float32)


def soft_cross_entropy(logits: jax.Array, positives: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-row cross entropy against targets spread evenly over each row's positives; with label smoothing e the
    targets are (1 - e) x those + e / columns (UIT's ITC)."""
    targets = positives / jnp.maximum(positives.sum(axis=-1, keepdims=True), 1.0)
    if label_smoothing:
        targets = (1.0 - label_smoothing) * targets + label_smoothing / logits.shape[-1]
    return -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), axis=-1)


def pair_logits(image_embeddings: jax.Array, text_embeddings: jax.Array, logit_scale: jax.Array,
                image_ids: jax.Array | None = None, text_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(scaled image x text logits in float32, positive mask). Ids default to each pair its own group, and
    text_ids to image_ids (one id per pair)."""
    if image_ids is None:
        image_ids = jnp.arange(image_embeddings.shape[0])
    if text_ids is None:
        text_ids = image_ids
    logits = logit_scale * (image_embeddings.astype(jnp.float32) @ text_embeddings.astype(jnp.float32).T)
    return logits, positive_mask(image_ids, text_ids)


def contrastive_loss(image_embeddings: jax.Array, text_embeddings: jax.Array, logit_scale: jax.Array,
                     image_ids: jax.Array | None = None, text_ids: jax.Array | None = None,
                     label_smoothing: float = 0.0) -> jax.Array:
    """Mean of the image-to-text and text-to-image InfoNCE losses.

    image_embeddings, text_embeddings: (batch, dim), L2-normalised; row i of each is one pair.
    logit_scale: the multiplier exp(t). image_ids / text_ids: (batch,) group ids; when None each pair is
    its own group. text_ids defaults to image_ids (one id per pair). label_smoothing: see soft_cross_entropy.
    """
    logits, positives = pair_logits(image_embeddings, text_embeddings, logit_scale, image_ids, text_ids)
    image_to_text = soft_cross_entropy(logits, positives, label_smoothing).mean()
    text_to_image = soft_cross_entropy(logits.T, positives.T, label_smoothing).mean()
    return 0.5 * (image_to_text + text_to_image)
