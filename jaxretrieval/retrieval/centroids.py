"""Re-id evaluation against identity centroids (Wieczorek et al., "On the Unreasonable Effectiveness of
Centroids in Image Retrieval", Centroids-ReID) as well as against the plain image gallery.

A centroid is the mean of an identity's raw gallery embeddings. Scores are inner products of L2-normalised
features (`normalize=True`): Centroids-ReID normalises query features and centroids (TEST.FEAT_NORM) after
averaging, then ranks by Euclidean distance, which orders a gallery exactly as cosine similarity does.

Per-camera centroids (`per_camera=True`, Centroids-ReID's default KEEP_CAMID_CENTROIDS) keep the Market-1501
rule that a query may not be matched with its own camera's images of the same person: queries from camera c
are scored against centroids built from the gallery images of every other camera, for every identity.
(Centroids-ReID instead builds, per identity, one centroid for each query camera of that identity and removes
the same-person ones that contain the query's camera; the true-match centroid is the same, the negatives differ
slightly.) The centroids' camera id is `MIXED_CAMERA` (-1), so with non-negative query camera ids the camera
rule of `reid_metrics` removes nothing: the exclusion was done by construction. `per_camera=False` builds one
centroid per identity from all its gallery images, the lenient variant in which same-camera images count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from jaxretrieval.retrieval.metrics import ReidQueryResults, reid_metrics, reid_query_results, summarize_reid

MIXED_CAMERA = -1
"""Camera id given to centroids, which mix the images of several cameras."""


def _float(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    return x.astype(np.result_type(x.dtype, np.float32), copy=False)


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm; rows with a norm below `eps` are divided by `eps` (as torch's normalize)."""
    x = _float(x)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def _scores(queries: np.ndarray, gallery: np.ndarray, normalize: bool) -> np.ndarray:
    if normalize:
        queries, gallery = l2_normalize(queries), l2_normalize(gallery)
    return _float(queries) @ _float(gallery).T


def _check_set(name: str, embeddings: np.ndarray, pids: np.ndarray, camids: np.ndarray) -> None:
    if embeddings.ndim != 2:
        raise ValueError(f"{name} embeddings must be (items, dim), got shape {embeddings.shape}")
    for what, ids in (("pids", pids), ("camids", camids)):
        if ids.shape != (embeddings.shape[0],):
            raise ValueError(f"{name} {what} have shape {ids.shape}, expected ({embeddings.shape[0]},)")


def centroid_gallery(embeddings: np.ndarray, pids: np.ndarray, camids: np.ndarray, *,
                     exclude_camid: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The mean embedding of each identity: (centroids (P, D), their pids (P,) sorted, camids (P,)).

    With `exclude_camid`, images from that camera are left out, and identities seen only there get no
    centroid. The centroids are not normalised; their camera id is `MIXED_CAMERA`.
    """
    embeddings, pids, camids = _float(embeddings), np.asarray(pids), np.asarray(camids)
    _check_set("gallery", embeddings, pids, camids)
    if exclude_camid is not None:
        keep = camids != exclude_camid
        embeddings, pids = embeddings[keep], pids[keep]
    ids, inverse, counts = np.unique(pids, return_inverse=True, return_counts=True)
    if ids.size == 0:
        return np.zeros((0, embeddings.shape[1]), embeddings.dtype), ids, np.zeros(0, int)
    order = np.argsort(inverse, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    sums = np.add.reduceat(embeddings[order].astype(np.float64), starts, axis=0)
    centroids = (sums / counts[:, None]).astype(embeddings.dtype)
    return centroids, ids, np.full(ids.size, MIXED_CAMERA)


class CentroidBlock(NamedTuple):
    """Some queries scored against one centroid gallery; the last five fields are `reid_metrics`' arguments."""

    query_index: np.ndarray  # (q,) rows of the query set in this block
    scores: np.ndarray  # (q, P)
    query_pids: np.ndarray  # (q,)
    query_camids: np.ndarray  # (q,)
    gallery_pids: np.ndarray  # (P,) the centroids' ids
    gallery_camids: np.ndarray  # (P,) all MIXED_CAMERA


def centroid_scores(query_emb: np.ndarray, query_pids: np.ndarray, query_camids: np.ndarray,
                    gallery_emb: np.ndarray, gallery_pids: np.ndarray, gallery_camids: np.ndarray, *,
                    per_camera: bool, normalize: bool = True) -> list[CentroidBlock]:
    """Query x centroid scores: one block per query camera with `per_camera`, else one block for all queries.

    The blocks partition the queries; see the module docstring for how the centroids are built. Query camera
    ids must be non-negative, so that none equals `MIXED_CAMERA`.
    """
    query_emb, gallery_emb = _float(query_emb), _float(gallery_emb)
    q_pids, q_cams = np.asarray(query_pids), np.asarray(query_camids)
    _check_set("query", query_emb, q_pids, q_cams)
    _check_set("gallery", gallery_emb, np.asarray(gallery_pids), np.asarray(gallery_camids))
    if query_emb.shape[1] != gallery_emb.shape[1]:
        raise ValueError(f"query dim {query_emb.shape[1]} != gallery dim {gallery_emb.shape[1]}")
    if (q_cams < 0).any():
        raise ValueError("query camera ids must be non-negative with centroids (-1 marks a centroid's camera)")
    if per_camera:
        groups = [(int(camera), np.flatnonzero(q_cams == camera)) for camera in np.unique(q_cams)]
    else:
        groups = [(None, np.arange(len(q_pids)))]
    blocks = []
    for camera, rows in groups:
        centroids, c_pids, c_cams = centroid_gallery(gallery_emb, gallery_pids, gallery_camids, exclude_camid=camera)
        blocks.append(CentroidBlock(rows, _scores(query_emb[rows], centroids, normalize), q_pids[rows],
                                    q_cams[rows], c_pids, c_cams))
    return blocks


def evaluate_reid(query_emb: np.ndarray, query_pids: np.ndarray, query_camids: np.ndarray,
                  gallery_emb: np.ndarray, gallery_pids: np.ndarray, gallery_camids: np.ndarray, *,
                  centroids: bool, per_camera: bool = True, normalize: bool = True,
                  ranks: Sequence[int] = (1, 5, 10, 20, 50)) -> dict[str, float]:
    """Re-id metrics (`reid_metrics`' keys) of the queries against the image gallery or its identity centroids.

    `centroids=False` ranks the gallery images under the Market-1501 protocol. `centroids=True` ranks the
    centroids of `centroid_scores` (per query camera unless `per_camera=False`); a query whose identity has
    no centroid in its block, e.g. one seen only by the query's own camera, has no valid match and is
    skipped and counted as in `reid_metrics`. `normalize=False` scores by the raw inner product.
    """
    if not centroids:
        return reid_metrics(_scores(query_emb, gallery_emb, normalize), query_pids, query_camids, gallery_pids,
                            gallery_camids, ranks)
    blocks = centroid_scores(query_emb, query_pids, query_camids, gallery_emb, gallery_pids, gallery_camids,
                             per_camera=per_camera, normalize=normalize)
    n = len(query_pids)
    first, ap, inp = np.full(n, -1), np.full(n, np.nan), np.full(n, np.nan)
    for block in blocks:
        part = reid_query_results(*block[1:])
        first[block.query_index], ap[block.query_index], inp[block.query_index] = part
    return summarize_reid(ReidQueryResults(first, ap, inp), ranks)
