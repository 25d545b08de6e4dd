"""ITM hard-negative sampling, the ITM batch and the ITM / MLM losses (jaxretrieval/losses/matching.py).

References: X2-VLM's get_hard_negatives weights (softmax(sim) + 1e-5, positives zeroed, multinomial), transcribed in
float64 torch; torch.nn.functional.cross_entropy for the losses. The multi-device checks run in one fresh
interpreter with 8 simulated CPU devices and print one JSON line of measurements.
"""

from __future__ import annotations

import json
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_python

from jaxretrieval.losses.matching import (
    X2VLM_EPSILON,
    hard_negatives,
    itm_loss,
    matching_batch,
    mlm_loss,
    sample_negatives,
)

torch = pytest.importorskip("torch")
F = torch.nn.functional

N = 12
GROUP_PATTERNS = {
    "unique": (np.arange(N) * 7, None),
    "pairs": (np.arange(N) // 2, None),
    "one_big_group": (np.array([0] * 9 + [1, 2, 3]), None),  # rows 0-8 have 3 negatives, rows 9-11 have 11
    "two_groups": (np.array([5] * 11 + [6]), None),  # rows 0-10 have exactly one negative
    "all_same": (np.zeros(N, int), None),  # no row has a negative
    "random_repeats": (np.random.default_rng(1).integers(0, 4, N), None),
    "separate": (np.random.default_rng(2).integers(0, 5, N), np.random.default_rng(3).integers(0, 5, N)),
}


def _features(image_ids: np.ndarray, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    """Unit features whose texts lie close to the images of the same group, so positives dominate the softmax."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(int(image_ids.max()) + 1, 8))
    unit = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    image = unit(centres[image_ids] + 0.3 * rng.normal(size=(len(image_ids), 8)))
    text = unit(centres[image_ids] + 0.3 * rng.normal(size=(len(image_ids), 8)))
    return jnp.asarray(image), jnp.asarray(text)


@pytest.mark.parametrize("epsilon", [X2VLM_EPSILON, 0.0], ids=["x2vlm", "albef"])
def test_never_picks_a_positive(epsilon: float) -> None:
    keys = jax.random.split(jax.random.key(0), 300)
    draw = jax.jit(jax.vmap(lambda k, i, t, s, a, b: hard_negatives(k, i, t, s, a, b, epsilon),
                            in_axes=(0, None, None, None, None, None)))
    for name, (image_ids, text_ids) in GROUP_PATTERNS.items():
        text_ids = image_ids if text_ids is None else text_ids
        image, text = _features(image_ids)
        for scale in (1.0, 20.0, 1000.0):  # at 1000 the negatives' softmax underflows in float32
            picks = jax.device_get(draw(keys, image, text, scale, jnp.asarray(image_ids), jnp.asarray(text_ids)))
            has_negative_text = (image_ids[:, None] != text_ids[None, :]).any(axis=1)
            has_negative_image = (text_ids[:, None] != image_ids[None, :]).any(axis=1)
            np.testing.assert_array_equal(picks.text_valid, np.broadcast_to(has_negative_text, picks.text_valid.shape))
            np.testing.assert_array_equal(picks.image_valid,
                                          np.broadcast_to(has_negative_image, picks.image_valid.shape))
            rows = np.arange(N)
            t, i = picks.text_for_image, picks.image_for_text
            assert np.all(np.where(picks.text_valid, text_ids[t] != image_ids[rows], t == rows)), (name, scale)
            assert np.all(np.where(picks.image_valid, image_ids[i] != text_ids[rows], i == rows)), (name, scale)
            assert t.min() >= 0 and t.max() < N and i.min() >= 0 and i.max() < N
            if name == "two_groups":  # the only negative is always the one picked
                assert np.all(t[:, :11] == 11) and np.all(i[:, :11] == 11)


def _x2vlm_probabilities(similarity: np.ndarray, row_ids: np.ndarray, col_ids: np.ndarray,
                         epsilon: float) -> np.ndarray:
    """get_hard_negatives in float64 torch: softmax(sim, 1) + eps, masked_fill(ids equal, 0); multinomial's
    distribution is each row divided by its sum."""
    weights = F.softmax(torch.tensor(similarity, dtype=torch.float64), dim=1) + epsilon
    weights.masked_fill_(torch.tensor(row_ids[:, None] == col_ids[None, :]), 0)
    return (weights / weights.sum(1, keepdim=True)).numpy()


def _empirical(similarity: np.ndarray, row_ids: np.ndarray, col_ids: np.ndarray, epsilon: float,
               draws: int) -> np.ndarray:
    keys = jax.random.split(jax.random.key(1), draws)
    sample = jax.jit(jax.vmap(lambda k: sample_negatives(k, jnp.asarray(similarity), jnp.asarray(row_ids),
                                                         jnp.asarray(col_ids), 0, epsilon)[0]))
    picks = np.asarray(sample(keys))  # (draws, rows)
    return np.stack([np.bincount(picks[:, r], minlength=similarity.shape[1]) for r in range(len(row_ids))]) / draws


def test_pick_distribution_matches_the_original_weights() -> None:
    rng = np.random.default_rng(0)
    ids = np.array([0, 0, 1, 2, 2, 3, 4])
    draws = 20000
    # ALBEF-like scores: the softmax is spread over the negatives; epsilon barely matters
    similarity = 2.0 * rng.normal(size=(7, 7))
    for epsilon in (0.0, X2VLM_EPSILON):
        want = _x2vlm_probabilities(similarity, ids, ids, epsilon)
        got = _empirical(similarity.astype(np.float32), ids, ids, epsilon, draws)
        assert np.abs(got - want).max() < 0.015, (epsilon, got, want)  # 4.5 standard errors at p = 0.5
    # Positives at 12 hold nearly all of the softmax, so the negatives' weights (e^-15 .. e^-11) are comparable to
    # epsilon: the draw must add 1e-5 to the softmax over the whole row (positives included) before zeroing them.
    similarity = rng.uniform(-3.0, 1.0, size=(7, 7))
    similarity[ids[:, None] == ids[None, :]] = 12.0
    want = _x2vlm_probabilities(similarity, ids, ids, X2VLM_EPSILON)
    got = _empirical(similarity.astype(np.float32), ids, ids, X2VLM_EPSILON, draws)
    assert np.abs(got - want).max() < 0.015, (got, want)
    negatives_only = F.softmax(torch.tensor(np.where(ids[:, None] == ids[None, :], -np.inf, similarity)), dim=1)
    wrong = [_x2vlm_probabilities(similarity, ids, ids, 0.0),  # no epsilon
             ((negatives_only + X2VLM_EPSILON) / (negatives_only + X2VLM_EPSILON).sum(1, keepdim=True)).numpy()]
    for other in wrong:  # the test tells these apart from the original
        other = np.where(ids[:, None] == ids[None, :], 0.0, other)
        assert np.abs(other - want).max() > 0.1


def test_matching_batch_follows_x2vlm_arrangement() -> None:
    image_ids = np.array([0, 0, 1, 2, 2, 3])
    image, text = _features(image_ids)
    negatives = hard_negatives(jax.random.key(3), image, text, 10.0, jnp.asarray(image_ids))
    mask = jnp.arange(6.0)[:, None] * jnp.ones((6, 3))
    batch = matching_batch((image, mask), text, negatives)
    images, masks = batch.images
    np.testing.assert_array_equal(images[:6], image)
    np.testing.assert_array_equal(images[6:12], image[negatives.image_for_text])  # negative image for each text
    np.testing.assert_array_equal(images[12:], image)
    np.testing.assert_array_equal(masks[6:12, 0], np.asarray(negatives.image_for_text))
    np.testing.assert_array_equal(batch.texts[:12], jnp.concatenate([text, text]))
    np.testing.assert_array_equal(batch.texts[12:], text[negatives.text_for_image])  # negative text for each image
    np.testing.assert_array_equal(batch.labels, [1] * 6 + [0] * 12)
    np.testing.assert_array_equal(batch.weights, np.ones(18))
    lonely = hard_negatives(jax.random.key(3), image, text, 10.0, jnp.zeros(6, jnp.int32))
    np.testing.assert_array_equal(matching_batch(image, text, lonely).weights, [1] * 6 + [0] * 12)


def _torch_value_and_grad(fn, logits: np.ndarray, *args):
    x = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    value = fn(x, *args)
    value.backward()
    return value.item(), x.grad.numpy()


def _check_loss(jax_fn, torch_fn, logits: np.ndarray, jax_args: tuple, torch_args: tuple) -> None:
    want, want_grad = _torch_value_and_grad(torch_fn, logits, *torch_args)
    got, got_grad = jax.jit(jax.value_and_grad(jax_fn))(jnp.asarray(logits, jnp.float32), *jax_args)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-6, atol=1e-6)
    with jax.enable_x64(True):  # the same formula in float64: agreement far below float32 rounding
        got, got_grad = jax.value_and_grad(jax_fn)(jnp.asarray(logits, jnp.float64), *jax_args)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, want, rtol=1e-12)
        np.testing.assert_allclose(got_grad, want_grad, rtol=1e-10, atol=1e-14)


def test_itm_loss_matches_torch_cross_entropy() -> None:
    rng = np.random.default_rng(0)
    logits = (3.0 * rng.normal(size=(18, 2))).astype(np.float32)
    labels = np.array([1] * 6 + [0] * 12)
    _check_loss(itm_loss, F.cross_entropy, logits, (jnp.asarray(labels),), (torch.tensor(labels),))
    weights = np.array([1.0] * 6 + [1, 0, 1, 1, 0, 1] + [1.0] * 6)
    weighted = lambda x, y, w: (F.cross_entropy(x, y, reduction="none") * w).sum() / w.sum()
    _check_loss(itm_loss, weighted, logits, (jnp.asarray(labels), jnp.asarray(weights, jnp.float32)),
                (torch.tensor(labels), torch.tensor(weights)))
    assert float(itm_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.zeros(18))) == 0.0


def test_mlm_loss_matches_torch_ignore_index() -> None:
    rng = np.random.default_rng(0)
    b, length, vocab = 3, 7, 13
    logits = (2.0 * rng.normal(size=(b, length, vocab))).astype(np.float32)
    labels = np.where(rng.random((b, length)) < 0.4, rng.integers(0, vocab, (b, length)), -100)
    labels[0, 0], labels[1] = 5, -100  # row 1 has no masked position
    torch_mlm = lambda x, y: F.cross_entropy(x.view(-1, vocab), y.view(-1), ignore_index=-100)
    _check_loss(mlm_loss, torch_mlm, logits, (jnp.asarray(labels),), (torch.tensor(labels),))
    # X2-VLM's form: logits at the masked positions (b, n_mask, V), masked_ids padded with -100
    _check_loss(mlm_loss, torch_mlm, logits[:, :4], (jnp.asarray(labels[:, :4]),), (torch.tensor(labels[:, :4]),))


def test_mlm_loss_without_masked_positions_is_zero() -> None:
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 9)), jnp.float32)
    labels = jnp.full((2, 5), -100)
    value, grad = jax.value_and_grad(mlm_loss)(logits, labels)
    assert float(value) == 0.0 and np.all(np.asarray(grad) == 0.0)
    torch_value = F.cross_entropy(torch.tensor(np.asarray(logits)).view(-1, 9),
                                  torch.tensor(np.asarray(labels), dtype=torch.long).view(-1), ignore_index=-100)
    assert torch.isnan(torch_value)  # torch's NaN, which we replace


SHARDED = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    from jaxretrieval.config import MeshConfig
    from jaxretrieval.losses.matching import (gathered_hard_negatives, gathered_itm_loss, hard_negatives, itm_loss,
        matching_batch, mlm_loss, sharded_hard_negatives, sharded_itm_loss, sharded_mlm_loss)
    from jaxretrieval.sharding import BATCH_AXES, make_mesh

    rng = np.random.default_rng(0)
    n, d, length, vocab = 32, 8, 5, 11
    unit = lambda x: jnp.asarray(x / np.linalg.norm(x, axis=1, keepdims=True), jnp.float32)
    image, text = unit(rng.normal(size=(n, d))), unit(rng.normal(size=(n, d)))
    ids = {
        "none": (None, None),
        "repeats": (jnp.asarray(rng.integers(0, 9, n)), None),  # groups span devices
        "separate": (jnp.asarray(rng.integers(0, 12, n)), jnp.asarray(rng.integers(0, 12, n))),
        "lonely": (jnp.asarray([0] * 28 + [1, 2, 3, 4]), None),  # rows 0-27 have 4 negatives, all elsewhere
        "all_same": (jnp.zeros(n, jnp.int32), None),
    }
    key = jax.random.key(7)
    weights_w = jnp.asarray(rng.normal(size=(d, 2)), jnp.float32)

    def toy_itm(images, texts):  # a stand-in cross-encoder whose logits depend on both features
        return ((images * texts) @ weights_w) * 4.0 + texts[:, :2]

    def global_itm(image, text, image_ids, text_ids):  # X2-VLM's get_matching_loss written out, on one device
        neg = hard_negatives(key, image, text, 10.0, image_ids, text_ids)
        images = jnp.concatenate([image, image[neg.image_for_text], image])
        texts = jnp.concatenate([text, text, text[neg.text_for_image]])
        labels = jnp.asarray([1] * n + [0] * 2 * n)
        weights = jnp.concatenate([jnp.ones(n), neg.image_valid, neg.text_valid]).astype(jnp.float32)
        return itm_loss(toy_itm(images, texts), labels, weights)

    def local_itm(image, text, image_ids, text_ids):
        negatives = gathered_hard_negatives(key, image, text, 10.0, image_ids, text_ids)
        batch = matching_batch(image, text, negatives, BATCH_AXES)
        return gathered_itm_loss(toy_itm(batch.images, batch.texts), batch.labels, batch.weights)

    mlm_logits = jnp.asarray(2.0 * rng.normal(size=(n, length, vocab)), jnp.float32)
    mlm_labels = np.where(rng.random((n, length)) < 0.3, rng.integers(0, vocab, (n, length)), -100)
    mlm_labels[:8] = -100  # the first devices hold no masked position
    itm_logits = jnp.asarray(3.0 * rng.normal(size=(n, 2)), jnp.float32)
    itm_labels, itm_weights = jnp.asarray(rng.integers(0, 2, n)), jnp.asarray(rng.integers(0, 2, n), jnp.float32)
    scaled = lambda g, w: float(jnp.abs(g - w).max() / jnp.maximum(1e-3, jnp.abs(w).max()))  # relative

    out = {}
    for mesh_shape in ((8, 1, 1), (2, 2, 2)):
        mesh = make_mesh(MeshConfig(*mesh_shape))
        tag = "x".join(map(str, mesh_shape))
        sharded = jax.jit(sharded_hard_negatives(mesh))
        single = jax.jit(hard_negatives)
        batch = P(BATCH_AXES)
        mapped_itm = jax.shard_map(local_itm, mesh=mesh, in_specs=(batch,) * 4, out_specs=P())
        for case, (image_ids, text_ids) in ids.items():
            got, want = sharded(key, image, text, 10.0, image_ids, text_ids), single(key, image, text, 10.0,
                                                                                       image_ids, text_ids)
            out[f"{tag}/negatives/{case}"] = [bool(np.array_equal(g, w)) for g, w in zip(got, want)]
            out[f"{tag}/valid/{case}"] = [int(got.text_valid.sum()), int(got.image_valid.sum())]
            full_ids = jnp.arange(n) if image_ids is None else image_ids
            full_text_ids = full_ids if text_ids is None else text_ids
            (v, g), (w, gw) = (jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(image, text, full_ids, full_text_ids)
                               for fn in (mapped_itm, global_itm))
            out[f"{tag}/itm_pipeline/{case}"] = [scaled(v, w)] + [scaled(a, b) for a, b in zip(g, gw)]
        other = single(jax.random.key(8), image, text, 10.0)
        out[f"{tag}/key_matters"] = not np.array_equal(other.text_for_image, want.text_for_image)
        for name, args, local_fn, global_fn in (
                ("mlm", (mlm_logits, jnp.asarray(mlm_labels)), sharded_mlm_loss(mesh), mlm_loss),
                ("mlm_none", (mlm_logits, jnp.full((n, length), -100)), sharded_mlm_loss(mesh), mlm_loss),
                ("itm", (itm_logits, itm_labels, itm_weights), sharded_itm_loss(mesh), itm_loss),
                ("itm_unweighted", (itm_logits, itm_labels), sharded_itm_loss(mesh), itm_loss)):
            (v, g), (w, gw) = (jax.jit(jax.value_and_grad(fn))(*args) for fn in (local_fn, global_fn))
            out[f"{tag}/{name}"] = [scaled(v, w), scaled(g, gw), float(v), bool(jnp.isfinite(g).all())]
    print(json.dumps(out))
""")


def test_sharded_equals_single_device() -> None:
    out = json.loads(run_python(SHARDED, devices=8).stdout.strip().splitlines()[-1])
    for tag in ("8x1x1", "2x2x2"):
        for case in ("none", "repeats", "separate", "lonely", "all_same"):
            assert out[f"{tag}/negatives/{case}"] == [True] * 4, (tag, case)
            assert max(out[f"{tag}/itm_pipeline/{case}"]) < 1e-5, (tag, case, out[f"{tag}/itm_pipeline/{case}"])
        assert out[f"{tag}/valid/all_same"] == [0, 0] and out[f"{tag}/valid/repeats"] == [32, 32]
        assert out[f"{tag}/key_matters"]
        for name in ("mlm", "mlm_none", "itm", "itm_unweighted"):
            value_diff, grad_diff, value, finite = out[f"{tag}/{name}"]
            assert value_diff < 1e-6 and grad_diff < 1e-6 and finite, (tag, name, out[f"{tag}/{name}"])
        assert out[f"{tag}/mlm"][2] > 1.0 and out[f"{tag}/mlm_none"][2] == 0.0
