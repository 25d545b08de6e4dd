"""The hinge-based triplet ranking loss of VSE++ / VSE-infinity (woodfrog/vse_infty, lib/loss.py ContrastiveLoss).

Image i and caption i form the positive pair of a batch of N; every other caption of the batch is a negative for
image i and every other image a negative for caption i. With s = image_emb @ text_emb.T:

    caption retrieval:  cost_s[i, j]  = max(0, margin + s[i, j] - s[i, i])   (image i the query, caption j != i)
    image retrieval:    cost_im[i, j] = max(0, margin + s[i, j] - s[j, j])   (caption j the query, image i != j)

The diagonals are zeroed. The sum form ("VSE0") adds every entry of both matrices; the hardest-negative form
("VSE++", max_violation) keeps, per query, only its largest cost: the row maximum of cost_s per image and the
column maximum of cost_im per caption, then sums those 2N values. Neither form divides by anything: the loss is a
sum over the batch, so its size grows with N.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["vse_hinge_loss"]


def _hinge(x: jax.Array) -> jax.Array:
    """clamp(x, min=0) with torch's gradient: passed where x >= 0 (zero included), zero below."""
    return jnp.where(x >= 0, x, 0.0)


def _max_along(costs: jax.Array, axis: int) -> jax.Array:
    """torch.max(costs, dim)[0]: the maximum read at one index (argmax), so the gradient reaches that entry only."""
    index = jnp.expand_dims(jnp.argmax(costs, axis=axis), axis)
    return jnp.squeeze(jnp.take_along_axis(costs, index, axis=axis), axis)


def vse_hinge_loss(image_emb: jax.Array, text_emb: jax.Array, margin: float = 0.2,
                   max_violation: bool = False) -> jax.Array:
    """VSE-infinity's ContrastiveLoss(margin, max_violation)(image_emb, text_emb): a scalar, the sum of both
    directions' hinge costs (see the module docstring). Row i of each (N, D) input is a positive pair; the
    embeddings are expected L2-normalised already (the encoders' l2norm; the loss takes plain dot products). Computed
    in float32 (float64 inputs stay float64), the similarity product at full precision.

    Training schedule in VSE-infinity: the criterion is built with opt.max_violation (off by default) and train.py
    turns it on for good (`set_max_violation(True)`) at the start of every epoch >= opt.vse_mean_warmup_epochs.
    The released scripts pass --vse_mean_warmup_epochs 1, so the first epoch trains with the sum over all
    negatives and every later epoch with the hardest negative only (with the default 0 it is the hardest negative
    from the start). Pass max_violation=epoch >= warmup_epochs to reproduce that."""
    dtype = jnp.promote_types(image_emb.dtype, jnp.float32)
    scores = jnp.matmul(image_emb.astype(dtype), text_emb.astype(dtype).T, precision=jax.lax.Precision.HIGHEST)
    positive = jnp.diagonal(scores)
    off_diagonal = ~jnp.eye(scores.shape[0], scores.shape[1], dtype=bool)
    cost_s = jnp.where(off_diagonal, _hinge(margin + scores - positive[:, None]), 0.0)
    cost_im = jnp.where(off_diagonal, _hinge(margin + scores - positive[None, :]), 0.0)
    if max_violation:
        cost_s = _max_along(cost_s, axis=1)
        cost_im = _max_along(cost_im, axis=0)
    return cost_s.sum() + cost_im.sum()
