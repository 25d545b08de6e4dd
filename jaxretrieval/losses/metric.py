"""Metric-learning losses of Centroids-ReID (CTL): label-smoothed cross entropy, batch-hard triplet, center loss,
the query-to-centroid triplet, their weighted sum, and the center loss's own optimiser.

Batch layout (the original's RandomIdentitySampler feeding a per-identity dataset): P distinct identities, each
filling K = num_instances consecutive rows, so N = P * K. An identity with fewer than K images (CTL trains with
DATALOADER.USE_RESAMPLING False) is padded at the end of its block with mock rows (a zero image, the identity's
label, is_real False); every identity has at least two real rows. `is_real` marks the real rows; None means all.

Every distance is euclidean as the original computes it, sqrt(clamp(|x|^2 + |y|^2 - 2 x.y, min=1e-12)), on the
raw backbone features in float32. Clamps, maxima and minima pass gradients the way torch's do: clamp where the
value lies inside its bounds (edges included), max / min to the single index they pick.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax


def _clamp(x: jax.Array, low: float, high: float | None = None) -> jax.Array:
    """torch.clamp: the clipped value, with the gradient passed where low <= x <= high and zero elsewhere."""
    inside = x >= low if high is None else (x >= low) & (x <= high)
    return jnp.where(inside, x, jnp.clip(x, low, high))


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over the entries where mask is set; 0 when none is (where the original has nothing to average)."""
    return jnp.where(mask, values, 0.0).sum() / jnp.maximum(mask.sum(), 1)


def _normalize(x: jax.Array) -> jax.Array:
    return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-12)


def euclidean_distances(x: jax.Array, y: jax.Array) -> jax.Array:
    """(m, n) distances sqrt(clamp(|x|^2 + |y|^2 - 2 x.y, min=1e-12)) in float32; the product is taken at full
    float32 precision (the expansion cancels badly if an accelerator rounds it to bf16 / tf32)."""
    x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    cross = jnp.matmul(x, y.T, precision=jax.lax.Precision.HIGHEST)
    squared = jnp.sum(x * x, axis=1)[:, None] + jnp.sum(y * y, axis=1)[None, :] - 2.0 * cross
    return jnp.sqrt(_clamp(squared, 1e-12))


def hardest_pairs(dist: jax.Array, positives: jax.Array, negatives: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per row: the largest distance among its positives and the smallest among its negatives, each read at one
    column (argmax / argmin, as torch.max / torch.min along a dim) so the gradient reaches that column only.
    A row without positives gets -inf, one without negatives +inf."""
    far = jnp.where(positives, dist, -jnp.inf)
    near = jnp.where(negatives, dist, jnp.inf)
    dist_ap = jnp.take_along_axis(far, jnp.argmax(far, axis=1)[:, None], axis=1)[:, 0]
    dist_an = jnp.take_along_axis(near, jnp.argmin(near, axis=1)[:, None], axis=1)[:, 0]
    return dist_ap, dist_an


def _ranking(dist_ap: jax.Array, dist_an: jax.Array, margin: float | None) -> jax.Array:
    """Per-anchor MarginRankingLoss(dist_an, dist_ap, y=1), or SoftMarginLoss(dist_an - dist_ap, 1) without a
    margin."""
    if margin is None:
        return jax.nn.softplus(dist_ap - dist_an)
    hinge = dist_ap - dist_an + margin
    return jnp.where(hinge >= 0, hinge, 0.0)


def label_smoothing_cross_entropy(logits: jax.Array, labels: jax.Array, epsilon: float = 0.1,
                                  mask: jax.Array | None = None) -> jax.Array:
    """CrossEntropyLabelSmooth: targets (1 - epsilon) * one_hot + epsilon / num_classes, the loss summed over
    classes and averaged over the rows (only the rows where mask is set, when given)."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    targets = (1.0 - epsilon) * jax.nn.one_hot(labels, logits.shape[-1]) + epsilon / logits.shape[-1]
    per_row = -jnp.sum(targets * log_probs, axis=-1)
    return per_row.mean() if mask is None else _masked_mean(per_row, mask)


def batch_hard_triplet_loss(features: jax.Array, labels: jax.Array, margin: float | None = 0.5,
                            normalize: bool = False,
                            anchor_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The original TripletLoss: (loss, dist_ap, dist_an).

    Every row is an anchor against all rows: its hardest positive (largest distance to a row with its label, itself
    included) and hardest negative (smallest distance to another label). The loss is the mean over anchors of
    max(0, dist_ap - dist_an + margin), or of softplus(dist_ap - dist_an) when margin is None. anchor_mask keeps
    only some anchors in that mean (all rows stay candidates), as the CTL query triplet does with is_real.
    normalize divides the rows by (norm + 1e-12) first; CTL does not. Unlike the original, label counts may differ.
    """
    features = features.astype(jnp.float32)
    if normalize:
        features = _normalize(features)
    dist = euclidean_distances(features, features)
    same = labels[:, None] == labels[None, :]
    dist_ap, dist_an = hardest_pairs(dist, same, ~same)
    per_anchor = _ranking(dist_ap, dist_an, margin)
    loss = per_anchor.mean() if anchor_mask is None else _masked_mean(per_anchor, anchor_mask)
    return loss, dist_ap, dist_an


def center_loss(features: jax.Array, labels: jax.Array, centers: jax.Array,
                mask: jax.Array | None = None) -> jax.Array:
    """The original CenterLoss: sum over rows of clamp(|x - center[label]|^2, 1e-12, 1e12) over the number of rows.

    The original clamps the whole (rows, classes) matrix after zeroing the other classes' entries, so each row also
    adds (classes - 1) * 1e-12 with no gradient; that constant is kept. The squared distance uses the same
    |x|^2 + |c|^2 - 2 x.c expansion. mask keeps only some rows (the real ones), as the original's indexing does.
    """
    features, centers = features.astype(jnp.float32), centers.astype(jnp.float32)
    own = centers[labels]
    squared = jnp.sum(features * features, axis=1) + jnp.sum(own * own, axis=1) - 2.0 * jnp.sum(features * own, axis=1)
    per_row = _clamp(squared, 1e-12, 1e12) + (centers.shape[0] - 1) * 1e-12
    return per_row.mean() if mask is None else _masked_mean(per_row, mask)


def centroid_triplet_loss(features: jax.Array, labels: jax.Array, num_instances: int, margin: float | None = 0.5,
                          is_real: jax.Array | None = None) -> jax.Array:
    """The CTL query-to-centroid triplet on a P x K batch (K = num_instances consecutive rows per identity).

    For each slot i < K, each identity's row i is a query and the mean of its other real rows its centroid (an
    identity whose row i is a mock sits that slot out). The batch-hard triplet runs over the queries and centroids
    together (2 Q points, one label per identity; the hardest positive of a query is in practice its own centroid),
    averaged over those 2 Q anchors. Slots where at most one identity takes part are skipped, and the loss is the
    mean over the remaining slots (0 if none remains; the original fails there). Gradients reach the gallery rows
    through the centroids. Labels must be constant within each block of K rows and distinct across blocks.
    """
    n, dim = features.shape
    blocks = n // num_instances
    grid = features.astype(jnp.float32).reshape(blocks, num_instances, dim)
    ids = labels.reshape(blocks, num_instances)[:, 0]
    real = (jnp.ones((blocks, num_instances), bool) if is_real is None
            else is_real.reshape(blocks, num_instances).astype(bool))
    point_ids = jnp.concatenate([ids, ids])
    same = point_ids[:, None] == point_ids[None, :]

    def one_slot(slot: jax.Array) -> tuple[jax.Array, jax.Array]:
        query_real = jnp.take(real, slot, axis=1)
        gallery = real & (jnp.arange(num_instances) != slot)[None, :] & query_real[:, None]
        count = gallery.sum(axis=1)
        centroids = (gallery[..., None] * grid).sum(axis=1) / jnp.maximum(count, 1)[:, None]
        present = count > 0
        points = jnp.concatenate([jnp.take(grid, slot, axis=1), centroids])
        valid = jnp.concatenate([present, present])
        pair = valid[:, None] & valid[None, :]
        dist_ap, dist_an = hardest_pairs(euclidean_distances(points, points), same & pair, ~same & pair)
        return _masked_mean(_ranking(dist_ap, dist_an, margin), valid), present.sum() > 1

    losses, used = jax.vmap(one_slot)(jnp.arange(num_instances))
    return _masked_mean(losses, used)


@dataclasses.dataclass(frozen=True)
class CTLLossConfig:
    """Loss settings of the original CTL recipe (config/defaults.py); hashable, so it can be a static jit argument."""

    num_instances: int = 4  # DATALOADER.NUM_INSTANCE (K)
    margin: float | None = 0.5  # SOLVER.MARGIN, both triplets; None -> soft margin
    label_smoothing: float = 0.1  # CrossEntropyLabelSmooth's default epsilon
    xent_weight: float = 1.0  # SOLVER.QUERY_XENT_WEIGHT
    triplet_weight: float = 1.0  # SOLVER.QUERY_CONTRASTIVE_WEIGHT
    center_weight: float = 5e-4  # SOLVER.CENTER_LOSS_WEIGHT
    centroid_weight: float = 1.0  # SOLVER.CENTROID_CONTRASTIVE_WEIGHT


def ctl_total_loss(outputs: dict[str, jax.Array], labels: jax.Array, centers: jax.Array,
                   config: CTLLossConfig = CTLLossConfig(),
                   is_real: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The CTL training loss: (total, weighted parts named as the original logs them).

    outputs: "features" (N, D), the pooled backbone features f; "logits" (N, classes), fc(bn(f)) without bias
    ("neck", bn(f), feeds only the logits; in the original bn's batch statistics cover the real rows only).
    labels: (N,) class indices; centers: (classes, D). The parts, each times its weight:
    query_xent on the real rows' logits, query_triplet on f (real anchors, all rows as candidates), query_center on
    the real rows' f, centroid_triplet on f. total is their sum.
    """
    features = outputs["features"]
    triplet, _, _ = batch_hard_triplet_loss(features, labels, config.margin, anchor_mask=is_real)
    parts = {
        "query_xent": config.xent_weight * label_smoothing_cross_entropy(
            outputs["logits"], labels, config.label_smoothing, is_real),
        "query_triplet": config.triplet_weight * triplet,
        "query_center": config.center_weight * center_loss(features, labels, centers, is_real),
        "centroid_triplet": config.centroid_weight * centroid_triplet_loss(
            features, labels, config.num_instances, config.margin, is_real),
    }
    return sum(parts.values()), parts


def center_optimizer(lr: float = 0.5, weight: float = 5e-4) -> optax.GradientTransformation:
    """The center loss's own optimiser: plain SGD (SOLVER.CENTER_LR, constant, no momentum or weight decay) on the
    centres, fed the gradient of the weighted total loss with respect to them, which it first multiplies by
    1 / weight (SOLVER.CENTER_LOSS_WEIGHT) so the centres move by lr times the unweighted center-loss gradient.
    The centres stay out of the model's optimiser (Adam) and its schedule."""
    return optax.chain(optax.scale(1.0 / weight), optax.sgd(lr))
