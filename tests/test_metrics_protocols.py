"""COCO 5K/1K recall, ranking metrics (R@K, mAP, mINP) and the Market-1501 re-id protocol: hand-worked
cases, loop references written from the protocol definitions, ties, blocking and input checks."""

from __future__ import annotations

import numpy as np
import pytest

from jaxretrieval.retrieval import metrics
from jaxretrieval.retrieval.metrics import coco_recall, ranking_metrics, reid_metrics, reid_query_results


def ranked(row) -> list[int]:
    """Gallery indices best first: higher score, then lower index."""
    return sorted(range(len(row)), key=lambda j: (-row[j], j))


# ---------------------------------------------------------------- COCO 5K / 1K

# 4 images, captions 2i and 2i+1 describe image i; 2 folds of 2 images.
COCO_SIM = np.array([
    [1.0, 1, 0, 0, 0, 0, 0, 0],
    [1.5, 0, 1, 1, 0, 0, 0, 0],  # caption 0 outscores image 1's own captions
    [2.0, 0, 0, 0, 1, 1, 0, 0],  # ... and image 2's, from the other fold
    [0.0, 0, 0, 0, 0, 0, 1, 1],
])
COCO_T2I = np.repeat(np.arange(4), 2)


def test_coco_hand_worked_case() -> None:
    out = coco_recall(COCO_SIM, COCO_T2I, folds=2)
    # 5K: i2t ranks [0, 1, 1, 0]; t2i: caption 0 ranks image 0 third (after 2 and 1), the rest first.
    # Fold 0: i2t [0, 1], t2i [1, 0, 0, 0]; fold 1: all first.
    expected = {"i2t_R1": 50.0, "t2i_R1": 87.5, "rsum": 50 + 87.5 + 400,
                "1k_i2t_R1": 75.0, "1k_t2i_R1": 87.5, "1k_rsum": 75 + 87.5 + 400}
    for k in (5, 10):
        expected |= {f"i2t_R{k}": 100.0, f"t2i_R{k}": 100.0, f"1k_i2t_R{k}": 100.0, f"1k_t2i_R{k}": 100.0}
    assert out.keys() == expected.keys()
    for key, value in expected.items():
        assert out[key] == pytest.approx(value), key


def test_coco_caption_order_does_not_matter() -> None:
    perm = np.random.default_rng(0).permutation(len(COCO_T2I))
    assert coco_recall(COCO_SIM[:, perm], COCO_T2I[perm], folds=2) == coco_recall(COCO_SIM, COCO_T2I, folds=2)


def reference_coco(sim: np.ndarray, t2i: np.ndarray, folds: int, ks) -> dict[str, float]:
    def recall(images: list[int], texts: list[int]) -> dict[str, float]:
        out = {}
        i2t = []
        for i in images:
            order = [texts[j] for j in ranked([sim[i, t] for t in texts])]
            i2t.append(min(r for r, t in enumerate(order) if t2i[t] == i))
        t2i_ranks = []
        for t in texts:
            order = [images[j] for j in ranked([sim[i, t] for i in images])]
            t2i_ranks.append(order.index(t2i[t]))
        for name, ranks in (("i2t", i2t), ("t2i", t2i_ranks)):
            for k in ks:
                out[f"{name}_R{k}"] = 100.0 * sum(r < k for r in ranks) / len(ranks)
        out["rsum"] = sum(out.values())
        return out

    n_images, n_texts = sim.shape
    out = recall(list(range(n_images)), list(range(n_texts)))
    size = n_images // folds
    parts = []
    for f in range(folds):
        images = list(range(f * size, (f + 1) * size))
        parts.append(recall(images, [t for t in range(n_texts) if t2i[t] in images]))
    for key in parts[0]:
        out[f"1k_{key}"] = sum(p[key] for p in parts) / folds
    return out


@pytest.mark.parametrize("seed", range(4))
def test_coco_matches_loop_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    folds = int(rng.integers(1, 4))
    n_images = folds * int(rng.integers(1, 5))
    t2i = np.repeat(np.arange(n_images), rng.integers(1, 4, size=n_images))
    rng.shuffle(t2i)
    sim = rng.integers(0, 3, size=(n_images, len(t2i))).astype(float) if seed % 2 else rng.normal(
        size=(n_images, len(t2i)))
    out, expected = coco_recall(sim, t2i, folds=folds, ks=(1, 2, 5)), reference_coco(sim, t2i, folds, (1, 2, 5))
    assert out.keys() == expected.keys()
    for key in expected:
        assert out[key] == pytest.approx(expected[key]), key


def test_coco_rejects_uneven_folds() -> None:
    with pytest.raises(ValueError, match="folds"):
        coco_recall(COCO_SIM[:3, :6], COCO_T2I[:6], folds=2)
    with pytest.raises(ValueError, match="folds"):
        coco_recall(COCO_SIM, COCO_T2I, folds=0)


# ---------------------------------------------------------------- ranking metrics

RANK_SCORES = np.array([
    [0.9, 0.8, 0.7, 0.6, 0.5],  # relevant at ranks 2 and 4: AP (1/2 + 2/4) / 2 = 1/2, INP 2/4
    [0.1, 0.5, 0.5, 0.3, 0.9],  # order 4, 1, 2 (tie: lower index first), 3, 0 -> relevant at 3 and 5
    [1.0, 0.0, 0.0, 0.0, 0.0],  # relevant at rank 1
])
RANK_RELEVANT = np.array([[0, 1, 0, 1, 0], [1, 0, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=bool)


def test_ranking_hand_worked_case() -> None:
    out = ranking_metrics(RANK_SCORES, RANK_RELEVANT, ks=(1, 2, 3))
    ap = [1 / 2, (1 / 3 + 2 / 5) / 2, 1.0]
    inp = [2 / 4, 2 / 5, 1.0]
    assert out == pytest.approx({"R1": 100 / 3, "R2": 200 / 3, "R3": 100.0, "mAP": 100 * np.mean(ap),
                                 "mINP": 100 * np.mean(inp)})
    assert list(ranking_metrics(RANK_SCORES, RANK_RELEVANT)) == ["R1", "R5", "R10", "mAP", "mINP"]


def reference_ranking(scores, relevant, ks) -> dict[str, float]:
    firsts, aps, inps = [], [], []
    for row, rel in zip(scores, relevant, strict=True):
        hits = [r + 1 for r, j in enumerate(ranked(row)) if rel[j]]  # 1-based ranks of the relevant items
        firsts.append(hits[0])
        aps.append(sum(n / rank for n, rank in enumerate(hits, 1)) / len(hits))
        inps.append(len(hits) / hits[-1])
    out = {f"R{k}": 100.0 * sum(f <= k for f in firsts) / len(firsts) for k in ks}
    return out | {"mAP": 100.0 * sum(aps) / len(aps), "mINP": 100.0 * sum(inps) / len(inps)}


@pytest.mark.parametrize("seed", range(6))
def test_ranking_matches_loop_reference(seed: int, monkeypatch) -> None:
    rng = np.random.default_rng(seed)
    q, g = int(rng.integers(1, 15)), int(rng.integers(1, 30))
    scores = rng.integers(0, 3, size=(q, g)).astype(float) if seed % 2 else rng.normal(size=(q, g))
    relevant = rng.random((q, g)) < 0.3
    relevant[np.arange(q), rng.integers(0, g, size=q)] = True
    ks = (1, 2, 5, 100)
    expected = reference_ranking(scores, relevant, ks)
    assert ranking_metrics(scores, relevant, ks) == pytest.approx(expected)
    monkeypatch.setattr(metrics, "_BLOCK_PAIRS", 7)  # many small query blocks: same answer
    assert ranking_metrics(scores, relevant, ks) == pytest.approx(expected)


def test_ranking_ties_and_infinities() -> None:
    relevant = np.array([[False, True, False]])
    assert ranking_metrics(np.zeros((1, 3)), relevant, ks=(1, 2))["R1"] == 0.0  # the tie goes to index 0
    assert ranking_metrics(np.zeros((1, 3)), relevant, ks=(1, 2))["R2"] == 100.0
    masked = np.array([[-np.inf, 0.0, np.inf]])
    assert ranking_metrics(masked, relevant, ks=(1, 2)) == {"R1": 0.0, "R2": 100.0, "mAP": 50.0, "mINP": 50.0}


@pytest.mark.parametrize(
    ("scores", "relevant", "match"),
    [
        (np.zeros((2, 3)), np.array([[True, False, False], [False, False, False]]), "query row 1"),
        (np.array([[0.0, np.nan, 1.0]]), np.array([[True, False, False]]), "NaN"),
        (np.zeros((1, 3)), np.array([[1, 0, 0]]), "boolean"),
        (np.zeros((1, 3)), np.ones((1, 2), bool), "shape"),
        (np.zeros(3), np.ones(3, bool), "shape"),
        (np.zeros((0, 3)), np.ones((0, 3), bool), "no queries"),
    ],
)
def test_ranking_input_errors(scores, relevant, match) -> None:
    with pytest.raises(ValueError, match=match):
        ranking_metrics(scores, relevant)


def test_ranking_rejects_bad_cutoffs() -> None:
    with pytest.raises(ValueError, match="cut-offs"):
        ranking_metrics(RANK_SCORES, RANK_RELEVANT, ks=(0, 1))


# ---------------------------------------------------------------- Market-1501 re-id

G_PIDS = np.array([1, 1, 2, -1, 0, 1])
G_CAMS = np.array([0, 1, 1, 1, 1, 2])
Q_PIDS, Q_CAMS = np.array([1, 2, 2, 3]), np.array([0, 1, 0, 0])
REID_SCORES = np.array([
    [0.99, 0.5, 0.8, 0.95, 0.7, 0.3],  # g0 same id+camera, g3 junk: kept g2, g4 (distractor), g1, g5
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # id 2's only image is in the query's camera: no valid match
    [0.1, 0.2, 0.9, 0.0, 0.0, 0.0],  # g2 first
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # id 3 is not in the gallery
])


def test_reid_hand_worked_case() -> None:
    out = reid_metrics(REID_SCORES, Q_PIDS, Q_CAMS, G_PIDS, G_CAMS, ranks=(1, 2, 3, 5, 10))
    # Query 0: matches at kept ranks 3 and 4 -> AP (1/3 + 2/4) / 2, INP 2/4. Query 2: rank 1.
    assert out == pytest.approx({"R1": 50.0, "R2": 50.0, "R3": 100.0, "R5": 100.0, "R10": 100.0,
                                 "mAP": 100 * (5 / 12 + 1) / 2, "mINP": 75.0,
                                 "num_valid_queries": 2, "num_queries": 4})
    results = reid_query_results(REID_SCORES, Q_PIDS, Q_CAMS, G_PIDS, G_CAMS)
    assert results.first_match.tolist() == [2, -1, 0, -1]
    assert results.valid.tolist() == [True, False, True, False]
    assert list(reid_metrics(REID_SCORES, Q_PIDS, Q_CAMS, G_PIDS, G_CAMS)) == [
        "R1", "R5", "R10", "R20", "R50", "mAP", "mINP", "num_valid_queries", "num_queries"]


def reference_reid(scores, q_pids, q_cams, g_pids, g_cams, ranks) -> dict[str, float]:
    firsts, aps, inps = [], [], []
    for q, row in enumerate(scores):
        kept = [j for j in ranked(row)
                if g_pids[j] != -1 and not (g_pids[j] == q_pids[q] and g_cams[j] == q_cams[q])]
        hits = [r + 1 for r, j in enumerate(kept) if g_pids[j] == q_pids[q]]
        if not hits:
            continue
        firsts.append(hits[0])
        aps.append(sum(n / rank for n, rank in enumerate(hits, 1)) / len(hits))
        inps.append(len(hits) / hits[-1])
    n = len(firsts)
    out = {f"R{r}": 100.0 * sum(f <= r for f in firsts) / n for r in ranks}
    return out | {"mAP": 100.0 * sum(aps) / n, "mINP": 100.0 * sum(inps) / n, "num_valid_queries": n,
                  "num_queries": len(scores)}


@pytest.mark.parametrize("seed", range(6))
def test_reid_matches_loop_reference(seed: int, monkeypatch) -> None:
    rng = np.random.default_rng(seed)
    q, g = int(rng.integers(3, 15)), int(rng.integers(5, 40))
    g_pids, g_cams = rng.integers(-1, 5, size=g), rng.integers(0, 3, size=g)
    q_pids, q_cams = rng.integers(1, 6, size=q), rng.integers(0, 3, size=q)
    q_pids[0], q_cams[0] = 9, 0  # a query whose id is not in the gallery
    g_pids[0], g_cams[0], q_pids[1], q_cams[1] = 4, 0, 4, 1  # and one with a valid match
    scores = rng.integers(0, 3, size=(q, g)).astype(float) if seed % 2 else rng.normal(size=(q, g))
    ranks = (1, 2, 5, 10, 50)
    expected = reference_reid(scores, q_pids, q_cams, g_pids, g_cams, ranks)
    assert reid_metrics(scores, q_pids, q_cams, g_pids, g_cams, ranks) == pytest.approx(expected)
    monkeypatch.setattr(metrics, "_BLOCK_PAIRS", 5)
    assert reid_metrics(scores, q_pids, q_cams, g_pids, g_cams, ranks) == pytest.approx(expected)


def test_reid_float32_scores_rank_like_float64() -> None:
    scores = np.random.default_rng(1).normal(size=REID_SCORES.shape).astype(np.float32)
    assert reid_metrics(scores, Q_PIDS, Q_CAMS, G_PIDS, G_CAMS) == reid_metrics(
        scores.astype(np.float64), Q_PIDS, Q_CAMS, G_PIDS, G_CAMS)


def test_reid_without_any_valid_query_is_an_error() -> None:
    with pytest.raises(ValueError, match="none of the 2 queries"):
        reid_metrics(REID_SCORES[[1, 3]], Q_PIDS[[1, 3]], Q_CAMS[[1, 3]], G_PIDS, G_CAMS)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((REID_SCORES, Q_PIDS[:3], Q_CAMS, G_PIDS, G_CAMS), "query_pids"),
        ((REID_SCORES, Q_PIDS, Q_CAMS, G_PIDS, G_CAMS[:5]), "gallery_camids"),
        ((np.where(REID_SCORES > 0.9, np.nan, REID_SCORES), Q_PIDS, Q_CAMS, G_PIDS, G_CAMS), r"NaN \(query rows \[0\]"),
        ((REID_SCORES[0], Q_PIDS, Q_CAMS, G_PIDS, G_CAMS), "shape"),
    ],
)
def test_reid_input_errors(args, match) -> None:
    with pytest.raises(ValueError, match=match):
        reid_metrics(*args)
