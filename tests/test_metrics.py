"""Image-text recall@K: hand-worked cases, ties, a brute-force reference, input checks."""

from __future__ import annotations

import numpy as np
import pytest

from jaxretrieval.retrieval.metrics import image_text_recall

# 3 images x 6 captions, captions 2i and 2i+1 describe image i.
TEXT_TO_IMAGE = np.array([0, 0, 1, 1, 2, 2])
SIMILARITY = np.array(
    [
        #  t0    t1    t2    t3    t4    t5
        [0.90, 0.10, 0.80, 0.20, 0.30, 0.00],  # img0: t0 first                  -> i2t rank 0
        [0.70, 0.60, 0.50, 0.10, 0.40, 0.30],  # img1: t0, t1 above t2            -> i2t rank 2
        [0.20, 0.30, 0.90, 0.10, 0.80, 0.35],  # img2: t2 above t4                -> i2t rank 1
    ]
)
# t2i, per caption over the images:
#   t0 [.9 .7 .2] -> img0 first: rank 0          t1 [.1 .6 .3] -> img1, img2 above img0: rank 2
#   t2 [.8 .5 .9] -> img2, img0 above img1: 2    t3 [.2 .1 .1] -> img0 above; img1 ties img2, lower index: 1
#   t4 [.3 .4 .8] -> img2 first: 0               t5 [0 .3 .35] -> img2 first: 0
# i2t ranks [0, 2, 1]; t2i ranks [0, 2, 2, 1, 0, 0]
HAND_EXPECTED = {
    "i2t_R1": 100 / 3,
    "i2t_R2": 200 / 3,
    "i2t_R3": 100.0,
    "t2i_R1": 50.0,
    "t2i_R2": 400 / 6,
    "t2i_R3": 100.0,  # t2i ranks < 2: t0, t3, t4, t5
}


def test_hand_worked_case() -> None:
    out = image_text_recall(SIMILARITY, TEXT_TO_IMAGE, ks=(1, 2, 3))
    assert set(out) == set(HAND_EXPECTED) | {"rsum"}
    for key, value in HAND_EXPECTED.items():
        assert out[key] == pytest.approx(value), key
    assert out["rsum"] == pytest.approx(sum(HAND_EXPECTED.values()))
    assert all(isinstance(v, float) for v in out.values())


def test_default_ks_on_hand_worked_case() -> None:
    out = image_text_recall(SIMILARITY, TEXT_TO_IMAGE)
    assert set(out) == {"i2t_R1", "i2t_R5", "i2t_R10", "t2i_R1", "t2i_R5", "t2i_R10", "rsum"}
    assert out["i2t_R1"] == pytest.approx(100 / 3) and out["t2i_R1"] == pytest.approx(50.0)
    assert out["i2t_R5"] == out["i2t_R10"] == out["t2i_R5"] == out["t2i_R10"] == 100.0
    assert out["rsum"] == pytest.approx(100 / 3 + 50.0 + 400.0)


def test_transposed_roles_are_not_mixed_up() -> None:
    # One caption per image: swapping image and caption roles swaps i2t and t2i.
    rng = np.random.default_rng(0)
    sim = rng.normal(size=(5, 5))
    ids = np.arange(5)
    out, flipped = image_text_recall(sim, ids, ks=(1, 2)), image_text_recall(sim.T, ids, ks=(1, 2))
    for k in (1, 2):
        assert out[f"i2t_R{k}"] == flipped[f"t2i_R{k}"] and out[f"t2i_R{k}"] == flipped[f"i2t_R{k}"]


def test_ties_go_to_the_lower_index() -> None:
    # All scores equal: the ranking is the gallery order.
    out = image_text_recall(np.zeros((3, 6)), TEXT_TO_IMAGE, ks=(1, 2, 3, 5))
    # i2t: image i's first caption sits at index 2i -> ranks [0, 2, 4]
    assert out["i2t_R1"] == pytest.approx(100 / 3)
    assert out["i2t_R3"] == pytest.approx(200 / 3)
    assert out["i2t_R5"] == pytest.approx(100.0)
    # t2i: caption j's image sits at index TEXT_TO_IMAGE[j] -> ranks [0, 0, 1, 1, 2, 2]
    assert out["t2i_R1"] == pytest.approx(100 / 3)
    assert out["t2i_R2"] == pytest.approx(200 / 3)
    assert out["t2i_R3"] == pytest.approx(100.0)

    # A tie between the right image (lower index) and a wrong one counts as a hit at R1 ...
    sim = np.array([[0.5, 0.1], [0.5, 0.9]])
    assert image_text_recall(sim, np.array([0, 1]), ks=(1,))["t2i_R1"] == 100.0
    # ... and a miss when the wrong image has the lower index.
    assert image_text_recall(sim, np.array([1, 0]), ks=(1,))["t2i_R1"] == 0.0

    # Same ranking whatever the float dtype or input container.
    as_list = image_text_recall(SIMILARITY.astype(np.float32).tolist(), TEXT_TO_IMAGE.tolist(), ks=(1, 2, 3))
    assert as_list == image_text_recall(SIMILARITY, TEXT_TO_IMAGE, ks=(1, 2, 3))


def brute_force_recall(sim: np.ndarray, text_to_image: np.ndarray, ks) -> dict[str, float]:
    """Rank of item j for a query = #items scoring strictly higher + #equal-scoring items with a lower index."""

    def rank(scores, j):
        return sum(1 for k in range(len(scores)) if scores[k] > scores[j] or (scores[k] == scores[j] and k < j))

    n_images, n_texts = sim.shape
    i2t = [min(rank(sim[i], j) for j in range(n_texts) if text_to_image[j] == i) for i in range(n_images)]
    t2i = [rank(sim[:, j], text_to_image[j]) for j in range(n_texts)]
    out = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            out[f"{name}_R{k}"] = 100.0 * sum(r < k for r in ranks) / len(ranks)
    out["rsum"] = sum(out.values())
    return out


@pytest.mark.parametrize("seed", range(6))
def test_random_cases_match_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_images = int(rng.integers(1, 12))
    per_image = rng.integers(1, 4, size=n_images)  # 1-3 captions each
    text_to_image = np.repeat(np.arange(n_images), per_image)
    rng.shuffle(text_to_image)
    if seed % 2:  # few distinct values: many ties
        sim = rng.integers(0, 3, size=(n_images, len(text_to_image))).astype(np.float64)
    else:
        sim = rng.normal(size=(n_images, len(text_to_image)))
    ks = (1, 2, 5, 10)
    out = image_text_recall(sim, text_to_image, ks=ks)
    expected = brute_force_recall(sim, text_to_image, ks)
    assert out.keys() == expected.keys()
    for key in expected:
        assert out[key] == pytest.approx(expected[key]), key


@pytest.mark.parametrize(
    ("sim", "ids", "match"),
    [
        (np.zeros((3, 6)), np.zeros(5, int), "shape"),  # one id short
        (np.zeros((3, 6)), np.zeros((6, 1), int), "shape"),
        (np.zeros(6), np.zeros(6, int), "shape"),  # not a matrix
        (np.zeros((2, 3, 6)), np.zeros(6, int), "shape"),
        (np.where(np.eye(3, 6) > 0, np.nan, 0.0), TEXT_TO_IMAGE, "NaN"),
        (np.where(np.eye(3, 6) > 0, np.inf, 0.0), TEXT_TO_IMAGE, "inf"),
        (np.zeros((3, 6)), np.array([0, 0, 1, 1, 2, 3]), "outside"),  # image 3 of 3
        (np.zeros((3, 6)), np.array([0, -1, 1, 1, 2, 2]), "outside"),
    ],
)
def test_invalid_inputs_raise_clear_errors(sim, ids, match) -> None:
    with pytest.raises(ValueError, match=match):
        image_text_recall(sim, ids)


def test_image_without_captions_is_an_error() -> None:
    with pytest.raises(ValueError, match="no relevant"):
        image_text_recall(np.zeros((3, 4)), np.array([0, 0, 2, 2]))


@pytest.mark.parametrize("seed", range(4))
def test_recall_from_topk_lists_equals_full_matrix(seed) -> None:
    from jaxretrieval.retrieval.metrics import image_text_recall_topk

    rng = np.random.default_rng(seed)
    images, per_image = 30, 3
    text_to_image = rng.permutation(np.repeat(np.arange(images), per_image))
    similarity = np.round(rng.normal(size=(images, images * per_image)), 1)  # rounding makes many ties
    image_top = np.argsort(-similarity, axis=1, kind="stable")[:, :10]
    text_top = np.argsort(-similarity.T, axis=1, kind="stable")[:, :10]
    assert image_text_recall_topk(image_top, text_top, text_to_image) == image_text_recall(similarity, text_to_image)
    with pytest.raises(ValueError, match="depth 5"):
        image_text_recall_topk(image_top[:, :5], text_top, text_to_image)
