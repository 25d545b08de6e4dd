"""Centroids-ReID losses against float64 torch references written from the definitions: values and gradients on
P x K batches (with and without mock padding rows), hand-worked triplets, label smoothing edge cases, the centre
optimiser's step against torch SGD, and jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from jaxretrieval.losses.metric import (
    CTLLossConfig,
    batch_hard_triplet_loss,
    center_loss,
    center_optimizer,
    centroid_triplet_loss,
    ctl_total_loss,
    euclidean_distances,
    label_smoothing_cross_entropy,
)

TOL = dict(rtol=1e-5, atol=1e-5)
CLASSES = 12


def close(ours, reference) -> None:
    reference = reference.detach().numpy() if isinstance(reference, torch.Tensor) else reference
    np.testing.assert_allclose(np.asarray(ours), reference, **TOL)


def as_torch(x: np.ndarray, grad: bool = True) -> torch.Tensor:
    return torch.tensor(np.asarray(x), dtype=torch.float64, requires_grad=grad)


def pk_batch(seed: int, real_counts: list[int], k: int, dim: int = 16):
    """P identities (distinct labels out of CLASSES) x K consecutive rows; identity c's first real_counts[c] rows
    are real and the rest mock padding."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(CLASSES, size=len(real_counts), replace=False)
    labels = np.repeat(ids, k).astype(np.int32)
    is_real = np.array([slot < count for count in real_counts for slot in range(k)])
    features = rng.normal(size=(len(labels), dim)).astype(np.float32)
    return features, labels, is_real


# References (torch, float64) -------------------------------------------------------------------------------------

def ref_distances(x: torch.Tensor) -> torch.Tensor:
    return ((x[:, None] - x[None]) ** 2).sum(-1).clamp_min(1e-12).sqrt()


def ref_triplet(x, labels, margin, anchors=None, normalize=False):
    """Loop over anchors: farthest same-label row (itself included), nearest other-label row, then the hinge
    (or soft margin), averaged over the kept anchors."""
    if normalize:
        x = x / (x.norm(dim=1, keepdim=True) + 1e-12)
    dist = ref_distances(x)
    labels = list(labels)
    terms, aps, ans = [], [], []
    for a in range(len(labels)):
        same = [j for j, label in enumerate(labels) if label == labels[a]]
        other = [j for j, label in enumerate(labels) if label != labels[a]]
        ap, an = dist[a, same].max(), dist[a, other].min()
        aps.append(ap)
        ans.append(an)
        if anchors is None or anchors[a]:
            gap = ap - an
            terms.append(torch.nn.functional.softplus(gap) if margin is None else (gap + margin).clamp_min(0))
    return torch.stack(terms).mean(), torch.stack(aps), torch.stack(ans)


def ref_centroid_triplet(x, labels, k, margin, is_real):
    """For each slot: queries are the identities' real rows at that slot, centroids the means of their other real
    rows; triplet over queries and centroids; mean over slots with at least two identities."""
    blocks = len(labels) // k
    slot_losses = []
    for slot in range(k):
        queries, centroids, ids = [], [], []
        for c in range(blocks):
            others = [c * k + j for j in range(k) if j != slot and is_real[c * k + j]]
            if is_real[c * k + slot] and others:
                queries.append(x[c * k + slot])
                centroids.append(x[others].mean(0))
                ids.append(int(labels[c * k]))
        if len(ids) >= 2:
            slot_losses.append(ref_triplet(torch.stack(queries + centroids), ids + ids, margin)[0])
    return torch.stack(slot_losses).mean() if slot_losses else torch.zeros((), dtype=torch.float64)


def ref_center(x, labels, centers, is_real):
    rows = np.flatnonzero(is_real)
    one_hot = torch.nn.functional.one_hot(torch.as_tensor(labels[rows], dtype=torch.long), len(centers))
    squared = ((x[rows][:, None] - centers[None]) ** 2).sum(-1)
    return (squared * one_hot).clamp(1e-12, 1e12).sum() / len(rows)


def ref_xent(logits, labels, epsilon, is_real):
    rows = np.flatnonzero(is_real)
    log_p = torch.log_softmax(logits[rows], dim=1)
    one_hot = torch.nn.functional.one_hot(torch.as_tensor(labels[rows], dtype=torch.long), logits.shape[1])
    targets = (1 - epsilon) * one_hot + epsilon / logits.shape[1]
    return -(targets * log_p).sum(1).mean()


# Label smoothing ---------------------------------------------------------------------------------------------------

_xent = jax.jit(jax.value_and_grad(label_smoothing_cross_entropy), static_argnames="epsilon")


@pytest.mark.parametrize("epsilon", [0.1, 0.35])
@pytest.mark.parametrize("masked", [False, True])
def test_label_smoothing_matches_reference(epsilon, masked) -> None:
    _, labels, is_real = pk_batch(0, [4, 2, 3, 4], 4)
    logits = np.random.default_rng(1).normal(scale=3.0, size=(len(labels), CLASSES)).astype(np.float32)
    mask = is_real if masked else np.ones(len(labels), bool)
    value, grad = _xent(jnp.asarray(logits), jnp.asarray(labels), epsilon, jnp.asarray(mask) if masked else None)
    t_logits = as_torch(logits)
    reference = ref_xent(t_logits, labels, epsilon, mask)
    reference.backward()
    close(value, reference)
    close(grad, t_logits.grad)
    assert not np.asarray(grad)[~mask].any()


_smooth = jax.jit(label_smoothing_cross_entropy, static_argnames="epsilon")


def test_label_smoothing_edge_cases() -> None:
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(6, 5)).astype(np.float32)
    labels = rng.integers(0, 5, size=6)
    plain = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(labels))
    close(_smooth(jnp.asarray(logits), jnp.asarray(labels), 0.0), plain)
    # epsilon = 1: the target is uniform whatever the label
    uniform = -torch.log_softmax(torch.tensor(logits), 1).mean()
    close(_smooth(jnp.asarray(logits), jnp.asarray(labels), 1.0), uniform)
    close(_smooth(jnp.asarray(logits), jnp.asarray((labels + 1) % 5), 1.0), uniform)
    # equal logits: every row costs log(classes) for any epsilon (summed over classes, averaged over rows)
    close(_smooth(jnp.zeros((3, 7)), jnp.array([0, 3, 6]), 0.1), np.log(7.0))
    huge = _smooth(jnp.array([[1e4, -1e4, 0.0]]), jnp.array([1]), 0.1)
    close(huge, (0.9 + 0.1 / 3) * 2e4 + 0.1 / 3 * 1e4)


# Batch-hard triplet ------------------------------------------------------------------------------------------------

def _triplet_with_aux(features, labels, margin, normalize, anchor_mask):
    loss, dist_ap, dist_an = batch_hard_triplet_loss(features, labels, margin, normalize, anchor_mask)
    return loss, (dist_ap, dist_an)


_triplet = jax.jit(jax.value_and_grad(_triplet_with_aux, has_aux=True), static_argnames=("margin", "normalize"))


@pytest.mark.parametrize("labels, margin, normalize, masked", [
    (np.repeat([7, 2, 9, 4], 4), 0.5, False, False),  # P x K = 4 x 4
    (np.repeat([7, 2, 9, 4], 4), None, False, False),  # soft margin
    (np.repeat([7, 2, 9, 4], 4), 0.5, True, False),  # normalised rows
    (np.repeat([7, 2, 9, 4], 4), 0.5, False, True),  # only real anchors, as the CTL query triplet
    (np.array([3, 3, 3, 1, 1, 5, 5, 5, 5, 3, 8, 8, 1, 6, 6, 6]), 0.5, False, False),  # uneven, not contiguous
])
def test_triplet_matches_reference(labels, margin, normalize, masked) -> None:
    features = np.random.default_rng(3).normal(size=(len(labels), 16)).astype(np.float32)
    anchors = np.random.default_rng(4).random(len(labels)) < 0.7 if masked else None
    (value, (dist_ap, dist_an)), grad = _triplet(jnp.asarray(features), jnp.asarray(labels), margin, normalize,
                                                 None if anchors is None else jnp.asarray(anchors))
    t_features = as_torch(features)
    reference, ref_ap, ref_an = ref_triplet(t_features, labels, margin, anchors, normalize)
    reference.backward()
    close(value, reference)
    close(dist_ap, ref_ap)
    close(dist_an, ref_an)
    close(grad, t_features.grad)
    assert np.abs(t_features.grad.numpy()).max() > 1e-3


def test_triplet_hand_worked() -> None:
    # 1-D points: class 0 at 0 and 1, class 1 at 3 and 10
    features, labels = jnp.array([[0.0], [1.0], [3.0], [10.0]]), jnp.array([0, 0, 1, 1])
    (loss, (dist_ap, dist_an)), grad = _triplet(features, labels, 0.5, False, None)
    np.testing.assert_allclose(dist_ap, [1, 1, 7, 7])
    np.testing.assert_allclose(dist_an, [3, 2, 2, 9])
    np.testing.assert_allclose(loss, 5.5 / 4)  # only the anchor at 3 violates: 7 - 2 + 0.5
    # descent moves that anchor towards 10 and away from 1 (its hardest negative), 10 towards it, 1 away from it;
    # 0, hardest for no anchor that violates, gets nothing
    np.testing.assert_allclose(grad[:, 0], [0.0, 0.25, -0.5, 0.25])
    (soft, _), _ = _triplet(features, labels, None, False, None)
    np.testing.assert_allclose(soft, np.mean(np.log1p(np.exp([-2.0, -1.0, 5.0, -2.0]))), rtol=1e-6)


def test_hardest_pairs_are_the_extremes() -> None:
    features, labels, _ = pk_batch(5, [4, 4, 4], 4)
    (_, (dist_ap, dist_an)), _ = _triplet(jnp.asarray(features), jnp.asarray(labels), 0.5, False, None)
    dist = np.sqrt(((features[:, None] - features[None]) ** 2).sum(-1))
    same = labels[:, None] == labels[None, :]
    np.testing.assert_allclose(dist_ap, np.where(same, dist, -np.inf).max(1), rtol=1e-5)
    np.testing.assert_allclose(dist_an, np.where(same, np.inf, dist).min(1), rtol=1e-5)
    # the diagonal is clamped to sqrt(1e-12) unless rounding leaves it slightly above
    dist = jax.jit(euclidean_distances)(jnp.asarray(features), jnp.asarray(features))
    assert np.all(np.diag(np.asarray(dist)) < 1e-2)


# Center loss -------------------------------------------------------------------------------------------------------

_center = jax.jit(jax.value_and_grad(center_loss, argnums=(0, 2)))


@pytest.mark.parametrize("real_counts", [[4, 4, 4, 4], [4, 2, 3, 4]])
def test_center_loss_matches_reference(real_counts) -> None:
    features, labels, is_real = pk_batch(6, real_counts, 4)
    centers = np.random.default_rng(7).normal(size=(CLASSES, 16)).astype(np.float32)
    value, (g_features, g_centers) = _center(jnp.asarray(features), jnp.asarray(labels), jnp.asarray(centers),
                                             jnp.asarray(is_real))
    t_features, t_centers = as_torch(features), as_torch(centers)
    reference = ref_center(t_features, labels, t_centers, is_real)
    reference.backward()
    close(value, reference)
    close(g_features, t_features.grad)
    close(g_centers, t_centers.grad)
    untouched = np.setdiff1d(np.arange(CLASSES), labels)
    assert not np.asarray(g_centers)[untouched].any()


# Centroid triplet --------------------------------------------------------------------------------------------------

_centroid = jax.jit(jax.value_and_grad(centroid_triplet_loss), static_argnames=("num_instances", "margin"))


@pytest.mark.parametrize("real_counts, margin", [  # P = K = 4 throughout, so only the margin recompiles
    ([4, 4, 4, 4], 0.5),
    ([4, 2, 3, 4], 0.5),  # mock padding: slots 2 and 3 lose identities
    ([4, 2, 2, 2], 0.5),  # slots 2 and 3 hold one identity only and are skipped
    ([2, 3, 4, 4], None),
])
def test_centroid_triplet_matches_reference(real_counts, margin) -> None:
    features, labels, is_real = pk_batch(8, real_counts, 4)
    value, grad = _centroid(jnp.asarray(features), jnp.asarray(labels), 4, margin, jnp.asarray(is_real))
    t_features = as_torch(features)
    reference = ref_centroid_triplet(t_features, labels, 4, margin, is_real)
    reference.backward()
    close(value, reference)
    close(grad, t_features.grad)
    assert float(value) > 0
    assert not np.asarray(grad)[~is_real].any()  # mock rows are neither queries nor in centroids


def test_centroid_triplet_without_two_identities_is_zero() -> None:
    features, labels, is_real = pk_batch(9, [4, 4, 4, 4], 4)  # the shapes of the cases above: no new compile
    labels[:] = labels[0]
    value, grad = _centroid(jnp.asarray(features), jnp.asarray(labels), 4, 0.5, jnp.asarray(is_real))
    assert float(value) == 0.0 and not np.asarray(grad).any()


# Total loss and the centre optimiser -------------------------------------------------------------------------------

def reference_total(features, logits, centers, labels, is_real, config):
    parts = {
        "query_xent": config.xent_weight * ref_xent(logits, labels, config.label_smoothing, is_real),
        "query_triplet": config.triplet_weight * ref_triplet(features, labels, config.margin, is_real)[0],
        "query_center": config.center_weight * ref_center(features, labels, centers, is_real),
        "centroid_triplet": config.centroid_weight * ref_centroid_triplet(
            features, labels, config.num_instances, config.margin, is_real),
    }
    return sum(parts.values()), parts


def total_inputs(seed: int, real_counts: list[int]):
    features, labels, is_real = pk_batch(seed, real_counts, 4)
    rng = np.random.default_rng(seed + 100)
    logits = rng.normal(size=(len(labels), CLASSES)).astype(np.float32)
    centers = rng.normal(size=(CLASSES, 16)).astype(np.float32)
    return features, logits, centers, labels, is_real


def jax_total(features, logits, centers, labels, is_real, config):
    outputs = {"features": features, "neck": features, "logits": logits}
    return ctl_total_loss(outputs, labels, centers, config, is_real)


_total = jax.jit(jax.value_and_grad(jax_total, argnums=(0, 1, 2), has_aux=True), static_argnames="config")


@pytest.mark.parametrize("real_counts, config", [
    ([4, 4, 4, 4], CTLLossConfig()),
    ([4, 2, 3, 4], CTLLossConfig()),
    ([4, 2, 3, 4], CTLLossConfig(margin=None, xent_weight=0.5, triplet_weight=2.0, center_weight=1e-2,
                                 centroid_weight=0.7, label_smoothing=0.2)),
])
def test_total_loss_matches_reference(real_counts, config) -> None:
    features, logits, centers, labels, is_real = total_inputs(10, real_counts)
    (total, parts), grads = _total(*map(jnp.asarray, (features, logits, centers, labels, is_real)), config)
    tensors = [as_torch(features), as_torch(logits), as_torch(centers)]
    ref_total, ref_parts = reference_total(*tensors, labels, is_real, config)
    ref_total.backward()
    close(total, ref_total)
    for name, value in ref_parts.items():
        close(parts[name], value)
    for ours, tensor in zip(grads, tensors, strict=True):
        close(ours, tensor.grad)


def test_center_optimizer_matches_torch_sgd() -> None:
    config = CTLLossConfig()
    features, logits, centers, labels, is_real = total_inputs(11, [4, 2, 3, 4])
    _, (_, _, g_centers) = _total(*map(jnp.asarray, (features, logits, centers, labels, is_real)), config)
    optimizer = center_optimizer(lr=0.5, weight=config.center_weight)
    updates, _ = optimizer.update(g_centers, optimizer.init(jnp.asarray(centers)))
    stepped = optax.apply_updates(jnp.asarray(centers), updates)

    tensors = [as_torch(features), as_torch(logits), torch.nn.Parameter(as_torch(centers, grad=False))]
    sgd = torch.optim.SGD([tensors[2]], lr=0.5)
    ref_total, _ = reference_total(*tensors, labels, is_real, config)
    ref_total.backward()
    tensors[2].grad *= 1.0 / config.center_weight
    sgd.step()
    close(stepped, tensors[2])
    # i.e. the centres move by lr times the unweighted center-loss gradient
    _, (_, unweighted) = _center(*map(jnp.asarray, (features, labels, centers, is_real)))
    close(stepped, centers - 0.5 * np.asarray(unweighted))
    assert np.abs(np.asarray(stepped) - centers).max() > 1e-2


def test_total_loss_jits_without_mask() -> None:
    features, logits, centers, labels, _ = total_inputs(12, [4, 4, 4, 4])
    outputs = {"features": jnp.asarray(features), "neck": jnp.asarray(features), "logits": jnp.asarray(logits)}
    total, parts = jax.jit(ctl_total_loss, static_argnames="config")(outputs, jnp.asarray(labels),
                                                                      jnp.asarray(centers), CTLLossConfig())
    assert set(parts) == {"query_xent", "query_triplet", "query_center", "centroid_triplet"}
    np.testing.assert_allclose(total, sum(float(v) for v in parts.values()), rtol=1e-6)
    ref_total, _ = reference_total(as_torch(features), as_torch(logits), as_torch(centers), labels,
                                   np.ones(len(labels), bool), CTLLossConfig())
    close(total, ref_total)
