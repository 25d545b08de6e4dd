"""Symmetric InfoNCE with positive groups, against references written from the definition."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxretrieval.losses import contrastive_loss as _contrastive_loss
from jaxretrieval.losses import positive_mask, soft_cross_entropy

N, D = 8, 16  # one shape everywhere, so the jitted loss compiles few times
_jitted = jax.jit(_contrastive_loss)


def contrastive_loss(img, txt, scale, image_ids=None, text_ids=None):
    """The library's loss, jitted (eager dispatch compiles op by op, which is slow on CPU)."""
    as_ids = lambda x: None if x is None else jnp.asarray(x, jnp.int32)
    return _jitted(jnp.asarray(img), jnp.asarray(txt), jnp.float32(scale), as_ids(image_ids), as_ids(text_ids))


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def log_softmax_np(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def reference_loss(img, txt, scale, image_ids=None, text_ids=None) -> float:
    """Loops over rows in float64: each row's target is uniform over the columns sharing its id."""
    img, txt = np.asarray(img, np.float64), np.asarray(txt, np.float64)
    n = len(img)
    image_ids = np.arange(n) if image_ids is None else np.asarray(image_ids)
    text_ids = image_ids if text_ids is None else np.asarray(text_ids)
    logits = scale * img @ txt.T
    i2t_rows, t2i_rows = [], []
    log_p_i2t = log_softmax_np(logits)
    log_p_t2i = log_softmax_np(logits.T)
    for i in range(n):
        positives = [j for j in range(n) if text_ids[j] == image_ids[i]]
        i2t_rows.append(-sum(log_p_i2t[i, j] for j in positives) / len(positives))
    for j in range(n):
        positives = [i for i in range(n) if image_ids[i] == text_ids[j]]
        t2i_rows.append(-sum(log_p_t2i[j, i] for i in positives) / len(positives))
    return 0.5 * (np.mean(i2t_rows) + np.mean(t2i_rows))


def reference_loss_jnp(img, txt, scale, image_ids, text_ids):
    """The same definition in jnp (differentiable), written independently of the library's helpers."""
    logits = scale * img @ txt.T
    same = (image_ids[:, None] == text_ids[None, :]).astype(jnp.float32)
    i2t = -(same * jax.nn.log_softmax(logits, axis=1)).sum(1) / same.sum(1)
    t2i = -(same * jax.nn.log_softmax(logits, axis=0)).sum(0) / same.sum(0)
    return 0.5 * (i2t.mean() + t2i.mean())


IDS_WITH_REPEATS = np.array([0, 1, 0, 2, 1, 3, 0, 4])


@pytest.mark.parametrize(
    "ids",
    [None, np.arange(8), np.arange(8)[::-1] * 7, IDS_WITH_REPEATS],
    ids=["none", "unique", "unique-unordered", "repeats"],
)
@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
def test_matches_reference(ids, scale) -> None:
    rng = np.random.default_rng(0)
    img, txt = unit_rows(rng, N, D), unit_rows(rng, N, D)
    ours = contrastive_loss(img, txt, scale, ids)
    np.testing.assert_allclose(ours, reference_loss(img, txt, scale, ids), rtol=1e-5, atol=1e-5)


def test_separate_text_ids_match_reference() -> None:
    rng = np.random.default_rng(1)
    img, txt = unit_rows(rng, N, D), unit_rows(rng, N, D)
    image_ids = np.array([0, 0, 1, 2, 2, 2, 3, 1])
    text_ids = np.array([2, 0, 1, 0, 3, 2, 3, 3])  # every id on both sides
    ours = contrastive_loss(img, txt, 10.0, image_ids, text_ids)
    np.testing.assert_allclose(ours, reference_loss(img, txt, 10.0, image_ids, text_ids), rtol=1e-5)


def test_unique_ids_equal_plain_clip_loss() -> None:
    rng = np.random.default_rng(2)
    img, txt = unit_rows(rng, N, D), unit_rows(rng, N, D)
    scale = 20.0
    logits = scale * img.astype(np.float64) @ txt.astype(np.float64).T
    diag = np.arange(N)
    clip = 0.5 * (-log_softmax_np(logits)[diag, diag].mean() - log_softmax_np(logits.T)[diag, diag].mean())
    np.testing.assert_allclose(contrastive_loss(img, txt, scale), clip, rtol=1e-5)
    np.testing.assert_allclose(contrastive_loss(img, txt, scale, np.arange(N) + 100), clip, rtol=1e-5)


def test_repeated_ids_differ_from_plain_clip_loss() -> None:
    # The groups matter: the same embeddings with repeated ids give a different (smaller) loss.
    rng = np.random.default_rng(3)
    img, txt = unit_rows(rng, N, D), unit_rows(rng, N, D)
    plain = float(contrastive_loss(img, txt, 30.0))
    grouped = float(contrastive_loss(img, txt, 30.0, IDS_WITH_REPEATS))
    assert abs(plain - grouped) > 1e-3


def test_perfect_alignment_with_groups_reaches_the_uniform_target_entropy() -> None:
    # Two groups of identical embeddings, orthogonal between groups, a huge scale: each row's softmax is
    # uniform over its group, so the loss is the target entropy log(group size) (not 0).
    e = np.zeros((N, D), np.float32)
    e[:3, 0] = 1.0
    e[3:, 1] = 1.0
    ids = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    expected = (3 * np.log(3.0) + 5 * np.log(5.0)) / N
    np.testing.assert_allclose(contrastive_loss(e, e, 1000.0, ids), expected, rtol=1e-5)


def test_permuting_the_batch_leaves_the_loss_unchanged() -> None:
    rng = np.random.default_rng(4)
    img, txt = unit_rows(rng, N, D), unit_rows(rng, N, D)
    for ids in (None, IDS_WITH_REPEATS):
        perm = rng.permutation(N)
        base = contrastive_loss(img, txt, 12.0, ids)
        pids = perm if ids is None else ids[perm]
        permuted = contrastive_loss(img[perm], txt[perm], 12.0, pids)
        np.testing.assert_allclose(permuted, base, rtol=1e-5)
    # Permuting only the texts breaks the pairing, so the loss changes.
    swapped = contrastive_loss(img, txt[::-1], 12.0)
    assert abs(float(swapped) - float(contrastive_loss(img, txt, 12.0))) > 1e-3


def test_gradient_matches_jnp_reference_and_finite_differences() -> None:
    rng = np.random.default_rng(5)
    img, txt = unit_rows(rng, 6, 5), unit_rows(rng, 6, 5)
    ids = jnp.asarray([0, 1, 1, 2, 0, 3])
    scale = jnp.float32(7.0)
    grads = jax.jit(jax.grad(_contrastive_loss, argnums=(0, 1, 2)))(jnp.asarray(img), jnp.asarray(txt), scale, ids)
    expected = jax.jit(jax.grad(reference_loss_jnp, argnums=(0, 1, 2)))(
        jnp.asarray(img), jnp.asarray(txt), scale, ids, ids
    )
    for g, e in zip(grads, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-6)
    assert np.abs(grads[0]).max() > 1e-3

    # Central differences of the float64 numpy reference, on every coordinate.
    h = 1e-5
    ids_np = np.asarray(ids)
    for which, grad in ((0, grads[0]), (1, grads[1])):
        numeric = np.zeros(img.shape)
        for idx in np.ndindex(img.shape):
            plus = [img.astype(np.float64), txt.astype(np.float64)]
            minus = [img.astype(np.float64), txt.astype(np.float64)]
            plus[which][idx] += h
            minus[which][idx] -= h
            numeric[idx] = (reference_loss(*plus, 7.0, ids_np) - reference_loss(*minus, 7.0, ids_np)) / (2 * h)
        np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-5)
    numeric_scale = (reference_loss(img, txt, 7.0 + h, ids_np) - reference_loss(img, txt, 7.0 - h, ids_np)) / (2 * h)
    np.testing.assert_allclose(grads[2], numeric_scale, rtol=1e-3, atol=1e-6)


def test_bf16_embeddings_are_computed_in_float32() -> None:
    rng = np.random.default_rng(6)
    img, txt = unit_rows(rng, N, D), unit_rows(rng, N, D)
    out = contrastive_loss(jnp.asarray(img, jnp.bfloat16), jnp.asarray(txt, jnp.bfloat16), 10.0)
    assert out.dtype == jnp.float32
    rounded = np.asarray(jnp.asarray(img, jnp.bfloat16).astype(jnp.float32))
    rounded_t = np.asarray(jnp.asarray(txt, jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_allclose(out, reference_loss(rounded, rounded_t, 10.0), rtol=1e-5)


def test_building_blocks() -> None:
    mask = jax.jit(positive_mask)(jnp.asarray([0, 1, 0]), jnp.asarray([1, 0, 2, 0]))
    np.testing.assert_array_equal(mask, [[0, 1, 0, 1], [1, 0, 0, 0], [0, 1, 0, 1]])
    logits = jnp.asarray([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    positives = jnp.asarray([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    ce = jax.jit(soft_cross_entropy)(logits, positives)
    lse = np.log(np.exp([1.0, 2.0, 3.0]).sum())
    np.testing.assert_allclose(ce[0], 0.5 * ((lse - 1.0) + (lse - 3.0)), rtol=1e-6)
    assert float(ce[1]) == 0.0  # a row with no positives contributes nothing (no NaN)
