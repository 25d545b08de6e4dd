"""Retrieval metrics as pure functions of a similarity matrix and its ground truth.

Ranks break ties deterministically: among equal scores the item with the lower gallery index ranks first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


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
    i2t = best_rank(similarity, relevant)
    t2i = best_rank(similarity.T, relevant.T)
    out = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            out[f"{name}_R{k}"] = float(100.0 * np.mean(ranks < k))
    out["rsum"] = float(sum(out[f"{n}_R{k}"] for n in ("i2t", "t2i") for k in ks))
    return out


def recall_table(metrics: dict) -> str:
    """The image-text recall metrics as a small text table, with the gallery size and chance level."""
    lines = [f"{'':16}{'R@1':>8}{'R@5':>8}{'R@10':>8}"]
    for label, prefix in (("image -> text", "i2t"), ("text -> image", "t2i")):
        lines.append(f"{label:16}" + "".join(f"{metrics[f'{prefix}_R{k}']:8.1f}" for k in (1, 5, 10)))
    lines.append(f"rsum {metrics['rsum']:.1f}; gallery {metrics['num_images']} images, "
                 f"{metrics['num_texts']} captions (t2i R@1 by chance: {100 / metrics['num_images']:.2f}%)")
    return "\n".join(lines)
