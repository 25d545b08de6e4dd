"""Retrieval metrics as pure functions of a score matrix and its ground truth.

Ranks break ties deterministically: among equal scores the item with the lower gallery index ranks first.
Recall/CMC, mAP and mINP are reported in percent.

- image-text: `image_text_recall`, and `coco_recall` for the COCO 5K and 5-fold 1K protocols;
- ranking (text-to-person, PAB): `ranking_metrics` on a boolean relevance mask;
- person re-id (Market-1501 protocol): `reid_metrics`, or `reid_query_results` + `summarize_reid` to keep the
  per-query outcome (e.g. to evaluate disjoint groups of queries against different galleries).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np

JUNK_PID = -1
"""Gallery items with this person id are dropped from every ranking (Market-1501 "junk" images)."""

# Queries are ranked in blocks of about this many (query, gallery) pairs, to bound memory on large galleries.
_BLOCK_PAIRS = 1 << 22


def _check(similarity: np.ndarray, text_to_image: np.ndarray) -> None:
    if similarity.ndim != 2:
        raise ValueError(f"similarity must be (images, texts), got shape {similarity.shape}")
    if text_to_image.shape != (similarity.shape[1],):
        raise ValueError(f"text_to_image has shape {text_to_image.shape}, expected ({similarity.shape[1]},) "
                         f"for a similarity of shape {similarity.shape}")
    if text_to_image.size and (text_to_image.min() < 0 or text_to_image.max() >= similarity.shape[0]):
        raise ValueError(f"text_to_image holds image indices outside [0, {similarity.shape[0]})")
    if not np.all(np.isfinite(similarity)):
        raise ValueError("similarity holds NaN or inf scores")


def best_rank(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per row, the best 0-based rank among that row's target columns. scores (rows, cols), targets mask."""
    order = np.argsort(-scores, axis=1, kind="stable")
    hits = np.take_along_axis(targets, order, axis=1)
    if not np.all(hits.any(axis=1)):
        raise ValueError("a query has no relevant gallery item")
    return hits.argmax(axis=1)


def image_text_recall(similarity: np.ndarray, text_to_image: np.ndarray,
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """i2t and t2i recall@K (percent) and their sum (rsum).

    similarity: (images, texts). text_to_image[j] is the image caption j describes; an image with several
    captions counts as found in i2t when any of them is within the top K.
    """
    similarity = np.asarray(similarity, dtype=np.float64)
    text_to_image = np.asarray(text_to_image)
    _check(similarity, text_to_image)
    relevant = text_to_image[None, :] == np.arange(similarity.shape[0])[:, None]
    return _recall_summary(best_rank(similarity, relevant), best_rank(similarity.T, relevant.T), ks)


def _recall_summary(i2t_ranks: np.ndarray, t2i_ranks: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    out = {}
    for name, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        for k in ks:
            out[f"{name}_R{k}"] = float(100.0 * np.mean(ranks < k))
    out["rsum"] = float(sum(out[f"{n}_R{k}"] for n in ("i2t", "t2i") for k in ks))
    return out


def _first_hit(hits: np.ndarray) -> np.ndarray:
    """Per row, the 0-based position of the first True, or the row length when there is none."""
    return np.where(hits.any(axis=1), hits.argmax(axis=1), hits.shape[1])


def image_text_recall_topk(image_top_texts: np.ndarray, text_top_images: np.ndarray, text_to_image: np.ndarray,
                           ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """`image_text_recall` from top-k lists alone (k >= max(ks)), so the full matrix is never needed.

    image_top_texts: (images, k) caption indices, best first; text_top_images: (texts, k) image indices.
    """
    text_to_image = np.asarray(text_to_image)
    depth = min(image_top_texts.shape[1], text_top_images.shape[1])
    if depth < max(ks):
        raise ValueError(f"top-k lists of depth {depth} cannot give recall@{max(ks)}")
    images = np.arange(image_top_texts.shape[0])[:, None]
    i2t = _first_hit(text_to_image[image_top_texts] == images)
    t2i = _first_hit(text_top_images == text_to_image[:, None])
    return _recall_summary(i2t, t2i, ks)


def recall_table(metrics: dict) -> str:
    """The image-text recall metrics as a small text table, with the gallery size and chance level."""
    lines = [f"{'':16}{'R@1':>8}{'R@5':>8}{'R@10':>8}"]
    for label, prefix in (("image -> text", "i2t"), ("text -> image", "t2i")):
        lines.append(f"{label:16}" + "".join(f"{metrics[f'{prefix}_R{k}']:8.1f}" for k in (1, 5, 10)))
    lines.append(f"rsum {metrics['rsum']:.1f}; gallery {metrics['num_images']} images, "
                 f"{metrics['num_texts']} captions (t2i R@1 by chance: {100 / metrics['num_images']:.2f}%)")
    return "\n".join(lines)


def metrics_table(metrics: dict, title: str = "") -> str:
    """Any evaluation's metrics as a text table (rich): the image-text recall table for that protocol, else one row
    per metric family (R@K, mAP, mINP, each also after re-ranking) and the counts."""
    from rich.console import Console
    from rich.table import Table

    if {"i2t_R1", "t2i_R1", "rsum", "num_images", "num_texts"} <= set(metrics):
        return (f"{title}\n" if title else "") + recall_table(metrics)
    table = Table(title=title or None, show_edge=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        table.add_row(key, f"{value:.2f}" if isinstance(value, float) else str(value))
    console = Console(width=100, record=True, file=io.StringIO())
    console.print(table)
    return console.export_text().rstrip()


def coco_recall(similarity: np.ndarray, text_to_image: np.ndarray, folds: int = 5,
                ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """COCO image-text recall on the full test set ("5K") and averaged over folds ("1K").

    Keys: `i2t_R{k}`, `t2i_R{k}`, `rsum` over all images, as `image_text_recall`; and the same keys prefixed
    `1k_` for the mean over `folds` folds of consecutive images, each fold ranking only its own images and the
    captions that describe them. The prefix names the usual protocol (5000 images in 5 folds of 1000) whatever
    the fold size. The image count must be divisible by `folds`.
    """
    similarity = np.asarray(similarity, dtype=np.float64)
    text_to_image = np.asarray(text_to_image)
    _check(similarity, text_to_image)
    n_images = similarity.shape[0]
    if folds < 1 or n_images % folds:
        raise ValueError(f"{n_images} images cannot be split into {folds} equal folds")
    out = image_text_recall(similarity, text_to_image, ks)
    size = n_images // folds
    per_fold = []
    for fold in range(folds):
        texts = np.flatnonzero(text_to_image // size == fold)
        images = slice(fold * size, (fold + 1) * size)
        per_fold.append(image_text_recall(similarity[images, texts], text_to_image[texts] - fold * size, ks))
    out.update({f"1k_{key}": float(np.mean([m[key] for m in per_fold])) for key in per_fold[0]})
    return out


def _query_blocks(n_queries: int, n_gallery: int) -> Iterator[slice]:
    step = max(1, _BLOCK_PAIRS // max(n_gallery, 1))
    for start in range(0, n_queries, step):
        yield slice(start, min(start + step, n_queries))


def _rank_block(scores: np.ndarray, relevant: np.ndarray,
                keep: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: 0-based rank of the first relevant kept item (-1 if none), AP and INP (NaN if none).

    Items outside `keep` are removed from the ranking before anything is counted.
    """
    n, g = scores.shape
    first = np.full(n, -1)
    ap, inp = np.full(n, np.nan), np.full(n, np.nan)
    if g == 0:
        return first, ap, inp
    order = np.argsort(-scores.astype(np.float64), axis=1, kind="stable")
    hit = np.take_along_axis(relevant, order, axis=1)
    if keep is None:
        rank = np.broadcast_to(np.arange(1, g + 1), (n, g))
    else:
        kept = np.take_along_axis(keep, order, axis=1)
        hit &= kept
        rank = np.cumsum(kept, axis=1)  # 1-based rank of each kept item among the kept ones
    n_rel = hit.sum(axis=1)
    found = n_rel > 0
    rows = np.arange(n)
    first_rank = rank[rows, hit.argmax(axis=1)]
    last_rank = rank[rows, g - 1 - hit[:, ::-1].argmax(axis=1)]
    precision = np.divide(np.cumsum(hit, axis=1), rank, out=np.zeros((n, g)), where=hit)
    first[found] = first_rank[found] - 1
    ap[found] = precision[found].sum(axis=1) / n_rel[found]
    inp[found] = n_rel[found] / last_rank[found]
    return first, ap, inp


def _rank_all(scores: np.ndarray,
              masks: Callable[[slice], tuple[np.ndarray, np.ndarray | None]]) -> tuple[np.ndarray, ...]:
    parts = [_rank_block(scores[rows], *masks(rows)) for rows in _query_blocks(*scores.shape)]
    if not parts:
        return np.zeros(0, int), np.zeros(0), np.zeros(0)
    return tuple(np.concatenate(column) for column in zip(*parts, strict=True))


def _check_scores(scores: np.ndarray) -> None:
    if scores.ndim != 2:
        raise ValueError(f"scores must be (queries, gallery), got shape {scores.shape}")
    if np.isnan(scores).any():
        rows = np.flatnonzero(np.isnan(scores).any(axis=1))
        raise ValueError(f"scores hold NaN (query rows {rows[:5].tolist()}{' ...' if rows.size > 5 else ''})")


def _check_ks(ks: Sequence[int]) -> None:
    if not ks or any(int(k) != k or k < 1 for k in ks):
        raise ValueError(f"cut-offs must be positive integers, got {tuple(ks)}")


def ranking_metrics(scores: np.ndarray, relevant: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K, mAP and mINP (percent) of ranking each query's gallery by score.

    scores (Q, G): higher is better; +-inf are allowed, NaN is an error. relevant (Q, G) boolean. Keys `R{k}`
    (share of queries with a relevant item in the top k), `mAP` (mean over queries of the mean precision at
    the ranks of the relevant items) and `mINP` (mean over queries of the number of relevant items divided by
    the 1-based rank of the last one, Ye et al., "Deep Learning for Person Re-identification"). Every query
    needs at least one relevant item.
    """
    scores, relevant = np.asarray(scores), np.asarray(relevant)
    _check_scores(scores)
    _check_ks(ks)
    if relevant.dtype != bool:
        raise ValueError(f"relevant must be a boolean mask, got dtype {relevant.dtype}")
    if relevant.shape != scores.shape:
        raise ValueError(f"relevant has shape {relevant.shape}, scores {scores.shape}")
    if scores.shape[0] == 0:
        raise ValueError("no queries to rank")
    missing = np.flatnonzero(~relevant.any(axis=1))
    if missing.size:
        raise ValueError(f"query row {missing[0]} has no relevant gallery item ({missing.size} such rows)")
    first, ap, inp = _rank_all(scores, lambda rows: (relevant[rows], None))
    out = {f"R{k}": float(100.0 * np.mean(first < k)) for k in ks}
    out["mAP"] = float(100.0 * ap.mean())
    out["mINP"] = float(100.0 * inp.mean())
    return out


class ReidQueryResults(NamedTuple):
    """Per-query re-id outcome; a query without a valid match has first_match -1 and NaN ap and inp."""

    first_match: np.ndarray  # (Q,) 0-based rank of the first true match among the gallery items kept
    ap: np.ndarray  # (Q,) average precision
    inp: np.ndarray  # (Q,) inverse negative penalty

    @property
    def valid(self) -> np.ndarray:
        return self.first_match >= 0


def reid_query_results(scores: np.ndarray, query_pids: np.ndarray, query_camids: np.ndarray,
                       gallery_pids: np.ndarray, gallery_camids: np.ndarray) -> ReidQueryResults:
    """Ranks each query's gallery under the Market-1501 protocol; see `reid_metrics`."""
    scores = np.asarray(scores)
    _check_scores(scores)
    q_pids, q_cams, g_pids, g_cams = (np.asarray(a) for a in (query_pids, query_camids, gallery_pids,
                                                                gallery_camids))
    n_q, n_g = scores.shape
    for name, ids, size in (("query_pids", q_pids, n_q), ("query_camids", q_cams, n_q),
                            ("gallery_pids", g_pids, n_g), ("gallery_camids", g_cams, n_g)):
        if ids.shape != (size,):
            raise ValueError(f"{name} has shape {ids.shape}, expected ({size},) for scores of shape {scores.shape}")
    not_junk = g_pids != JUNK_PID

    def masks(rows: slice) -> tuple[np.ndarray, np.ndarray]:
        match = g_pids[None, :] == q_pids[rows, None]
        same_camera = g_cams[None, :] == q_cams[rows, None]
        return match, ~(match & same_camera) & not_junk

    return ReidQueryResults(*_rank_all(scores, masks))


def summarize_reid(results: ReidQueryResults, ranks: Sequence[int] = (1, 5, 10, 20, 50)) -> dict[str, float]:
    """CMC at `ranks`, mAP and mINP (percent) over the valid queries, and the query counts."""
    _check_ks(ranks)
    valid = results.valid
    if not valid.any():
        raise ValueError(f"none of the {valid.size} queries has a valid match in the gallery")
    first = results.first_match[valid]
    out: dict[str, float] = {f"R{r}": float(100.0 * np.mean(first < r)) for r in ranks}
    out["mAP"] = float(100.0 * results.ap[valid].mean())
    out["mINP"] = float(100.0 * results.inp[valid].mean())
    out["num_valid_queries"] = int(valid.sum())
    out["num_queries"] = int(valid.size)
    return out


def reid_metrics(scores: np.ndarray, query_pids: np.ndarray, query_camids: np.ndarray, gallery_pids: np.ndarray,
                 gallery_camids: np.ndarray, ranks: Sequence[int] = (1, 5, 10, 20, 50)) -> dict[str, float]:
    """Person re-id CMC, mAP and mINP (percent) under the Market-1501 protocol.

    scores (Q, G), higher is better. For each query the gallery items with its person id AND its camera are
    removed, as are the junk items (person id `JUNK_PID`, -1): open-reid, fast-reid and Centroids-ReID drop
    Market's -1 images when loading the data, which ranks the same. Id 0 (Market's distractors) is an ordinary
    id, a non-match for every query. Queries left with no true match are skipped: `num_valid_queries` of
    `num_queries` are averaged (an error if none). `R{r}` is the share of valid queries whose first match is
    within the top r, so ranks past the gallery size count every valid query.
    """
    return summarize_reid(reid_query_results(scores, query_pids, query_camids, gallery_pids, gallery_camids), ranks)
