"""Centroids-ReID evaluation: centroids as per-identity means, per-camera exclusion, a hand-worked ranking
with and without centroids, and a loop reference for per-camera centroid evaluation."""

from __future__ import annotations

import numpy as np
import pytest

from jaxretrieval.retrieval.centroids import (
    MIXED_CAMERA,
    centroid_gallery,
    centroid_scores,
    evaluate_reid,
    l2_normalize,
)
from jaxretrieval.retrieval.metrics import reid_metrics


def loop_means(emb, pids, camids, exclude=None) -> dict[int, np.ndarray]:
    groups: dict[int, list[np.ndarray]] = {}
    for e, p, c in zip(emb, pids, camids, strict=True):
        if c != exclude:
            groups.setdefault(int(p), []).append(e)
    return {p: np.mean(v, axis=0) for p, v in sorted(groups.items())}


def random_gallery(seed: int, g: int = 40, d: int = 6):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(g, d)).astype(np.float32), rng.integers(0, 8, size=g), rng.integers(0, 4, size=g))


@pytest.mark.parametrize("exclude", [None, 0, 2])
def test_centroids_are_identity_means(exclude) -> None:
    emb, pids, camids = random_gallery(0)
    centroids, c_pids, c_cams = centroid_gallery(emb, pids, camids, exclude_camid=exclude)
    expected = loop_means(emb, pids, camids, exclude)
    assert c_pids.tolist() == list(expected)
    np.testing.assert_allclose(centroids, np.stack(list(expected.values())), rtol=1e-6, atol=1e-6)
    assert centroids.dtype == np.float32
    assert (c_cams == MIXED_CAMERA).all() and c_cams.shape == c_pids.shape


def test_excluded_camera_drops_identities_seen_only_there() -> None:
    emb = np.array([[1.0, 0], [3, 0], [0, 2], [5, 5]])
    pids, camids = np.array([7, 7, 7, 8]), np.array([0, 1, 1, 0])
    centroids, c_pids, _ = centroid_gallery(emb, pids, camids, exclude_camid=0)
    assert c_pids.tolist() == [7]
    np.testing.assert_allclose(centroids, [[1.5, 1.0]])
    centroids, c_pids, _ = centroid_gallery(emb, pids, camids)
    np.testing.assert_allclose(centroids, [[4 / 3, 2 / 3], [5, 5]])
    centroids, c_pids, c_cams = centroid_gallery(emb[:1], pids[:1], camids[:1], exclude_camid=0)
    assert centroids.shape == (0, 2) and c_pids.size == 0 and c_cams.size == 0


# Gallery: id 1 in cameras 0 and 1, id 2 in cameras 1 and 2, id 4 only in camera 2.
G_EMB = np.array([[3.0, 0], [0, 2], [1, 1], [2, 2], [-1, 0]])
G_PIDS, G_CAMS = np.array([1, 1, 2, 2, 4]), np.array([0, 1, 1, 2, 2])
# Queries: id 1 cam 0, id 2 cam 1, id 3 (absent) cam 0, id 4 cam 2 (only its own camera holds id 4).
Q_EMB = np.array([[1.0, 0], [1, 1], [0, 1], [-1, 0]])
Q_PIDS, Q_CAMS = np.array([1, 2, 3, 4]), np.array([0, 1, 0, 2])
RANKS = (1, 2, 3)


def test_per_camera_centroids_hand_worked_case() -> None:
    # Camera 0 queries see id 1 as [0, 2] (g0 left out): the query [1, 0] scores 0 against it and 0.71
    # against id 2 -> rank 2, AP 1/2. The camera 1 query (id 2) sees id 2 as [2, 2] -> first.
    # Query 2 (id 3) and query 3 (id 4: no centroid without camera 2) have no valid match.
    out = evaluate_reid(Q_EMB, Q_PIDS, Q_CAMS, G_EMB, G_PIDS, G_CAMS, centroids=True, ranks=RANKS)
    assert out == pytest.approx({"R1": 50.0, "R2": 100.0, "R3": 100.0, "mAP": 75.0, "mINP": 75.0,
                                 "num_valid_queries": 2, "num_queries": 4})


def test_centroids_over_all_cameras_hand_worked_case() -> None:
    # Id 1's centroid [1.5, 1] now includes the query's own camera: query 0 finds it first, and query 3
    # is matched with the centroid of its own camera's image.
    out = evaluate_reid(Q_EMB, Q_PIDS, Q_CAMS, G_EMB, G_PIDS, G_CAMS, centroids=True, per_camera=False,
                        ranks=RANKS)
    assert out == pytest.approx({"R1": 100.0, "R2": 100.0, "R3": 100.0, "mAP": 100.0, "mINP": 100.0,
                                 "num_valid_queries": 3, "num_queries": 4})


def test_image_gallery_hand_worked_case() -> None:
    # Query 0: g0 removed (same id and camera); g2, g3 (0.71) precede g1 (0) -> rank 3. Query 1: g2 removed,
    # g3 first. Query 3: its only match g4 is in its camera -> no valid match.
    out = evaluate_reid(Q_EMB, Q_PIDS, Q_CAMS, G_EMB, G_PIDS, G_CAMS, centroids=False, ranks=RANKS)
    assert out == pytest.approx({"R1": 50.0, "R2": 50.0, "R3": 100.0, "mAP": 100 * (1 / 3 + 1) / 2,
                                 "mINP": 100 * (1 / 3 + 1) / 2, "num_valid_queries": 2, "num_queries": 4})
    scores = l2_normalize(Q_EMB) @ l2_normalize(G_EMB).T
    assert out == reid_metrics(scores, Q_PIDS, Q_CAMS, G_PIDS, G_CAMS, RANKS)


def test_centroids_are_normalised_before_scoring() -> None:
    # Raw inner products favour the long centroid of id 2; cosine favours id 1.
    g_emb, g_pids, g_cams = np.array([[1.0, 0.1], [10, 10]]), np.array([1, 2]), np.array([1, 1])
    args = (np.array([[1.0, 0]]), np.array([1]), np.array([0]), g_emb, g_pids, g_cams)
    assert evaluate_reid(*args, centroids=True, ranks=(1,))["R1"] == 100.0
    assert evaluate_reid(*args, centroids=True, normalize=False, ranks=(1,))["R1"] == 0.0
    (block,) = centroid_scores(*args, per_camera=True)
    np.testing.assert_allclose(block.scores, [[1 / np.hypot(1, 0.1), np.sqrt(0.5)]])


def test_blocks_partition_queries_and_feed_reid_metrics() -> None:
    blocks = centroid_scores(Q_EMB, Q_PIDS, Q_CAMS, G_EMB, G_PIDS, G_CAMS, per_camera=True)
    assert [b.query_index.tolist() for b in blocks] == [[0, 2], [1], [3]]
    assert [b.gallery_pids.tolist() for b in blocks] == [[1, 2, 4], [1, 2, 4], [1, 2]]
    camera_1 = blocks[1]
    assert camera_1.scores == pytest.approx(np.array([[np.sqrt(0.5), 1.0, -np.sqrt(0.5)]]))
    assert reid_metrics(*camera_1[1:], ranks=(1,)) == {"R1": 100.0, "mAP": 100.0, "mINP": 100.0,
                                                       "num_valid_queries": 1, "num_queries": 1}
    (single,) = centroid_scores(Q_EMB, Q_PIDS, Q_CAMS, G_EMB, G_PIDS, G_CAMS, per_camera=False)
    assert single.query_index.tolist() == [0, 1, 2, 3] and single.scores.shape == (4, 3)


def reference_centroid_eval(q_emb, q_pids, q_cams, g_emb, g_pids, g_cams, ranks) -> dict[str, float]:
    """Per query: centroids of every identity from the gallery images outside the query's camera, ranked by
    cosine similarity (ties: lower id first); the query's own identity is the one match."""
    firsts, aps, inps = [], [], []
    for e, p, c in zip(q_emb, q_pids, q_cams, strict=True):
        means = loop_means(g_emb, g_pids, g_cams, exclude=c)
        cos = {pid: float(e @ m / np.linalg.norm(e) / np.linalg.norm(m)) for pid, m in means.items()}
        if p not in cos:
            continue
        order = sorted(cos, key=lambda pid: (-cos[pid], pid))
        rank = order.index(p) + 1
        firsts.append(rank)
        aps.append(1 / rank)
        inps.append(1 / rank)
    n = len(firsts)
    out = {f"R{r}": 100.0 * sum(f <= r for f in firsts) / n for r in ranks}
    return out | {"mAP": 100.0 * sum(aps) / n, "mINP": 100.0 * sum(inps) / n, "num_valid_queries": n,
                  "num_queries": len(q_pids)}


@pytest.mark.parametrize("seed", range(4))
def test_per_camera_centroids_match_loop_reference(seed: int) -> None:
    g_emb, g_pids, g_cams = random_gallery(seed, g=60)
    rng = np.random.default_rng(100 + seed)
    q = 25
    q_emb, q_pids, q_cams = rng.normal(size=(q, 6)), rng.integers(0, 10, size=q), rng.integers(0, 4, size=q)
    ranks = (1, 3, 5, 20)
    out = evaluate_reid(q_emb, q_pids, q_cams, g_emb, g_pids, g_cams, centroids=True, ranks=ranks)
    expected = reference_centroid_eval(q_emb, q_pids, q_cams, g_emb.astype(np.float64), g_pids, g_cams, ranks)
    assert out == pytest.approx(expected, rel=1e-5)
    assert out["num_valid_queries"] < q  # ids 8 and 9 are never in the gallery


def test_no_valid_query_at_all_is_an_error() -> None:
    with pytest.raises(ValueError, match="none of the 2 queries"):
        evaluate_reid(Q_EMB[2:], Q_PIDS[2:], Q_CAMS[2:], G_EMB, G_PIDS, G_CAMS, centroids=True)


@pytest.mark.parametrize(
    ("q_cams", "q_emb", "g_pids", "match"),
    [
        (np.array([0, 1, -1, 2]), Q_EMB, G_PIDS, "non-negative"),
        (Q_CAMS, np.ones((4, 3)), G_PIDS, "dim"),
        (Q_CAMS, Q_EMB, G_PIDS[:4], "gallery pids"),
        (Q_CAMS[:3], Q_EMB, G_PIDS, "query camids"),
    ],
)
def test_input_errors(q_cams, q_emb, g_pids, match) -> None:
    with pytest.raises(ValueError, match=match):
        centroid_scores(q_emb, Q_PIDS, q_cams, G_EMB, g_pids, G_CAMS, per_camera=True)
