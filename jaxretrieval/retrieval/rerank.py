"""Two-stage retrieval: each query's top k gallery items under a first-stage (contrastive) score are re-scored by a
cross-encoder (an ITM head over fused query and gallery features), in fixed-size batches of pairs on the mesh.

One protocol serves every system; the originals differ only in k, in how a candidate's new score is formed
(`combine`) and in what the other items of the row get (`fill`):
- X2-VLM `Retrieval.py: evaluation()` (the base of CFACK, k_test 128): the score matrix starts filled with -100.0;
  per query row `sims.topk(k_test)` picks the candidates, the query's features are repeated k times against the
  candidates' features (tokens and attention masks), and the candidate gets `itm_head(cross CLS)[:, 1]`, the raw
  "match" logit (no softmax, the first-stage similarity not added): `combine="replace", fill=-100.0`. Rows are split
  over ranks and the matrices all-reduced by SUM, which adds -100 per other rank to every entry: a shift of the
  whole matrix that changes no ranking, so it is not reproduced.
- LAVIS BLIP-2 `blip2_models/blip2.py: compute_sim_matrix` (with `blip2_qformer.compute_itm`, the class-1 ITM
  logit averaged over the query tokens): the same -100 fill, but a candidate gets ITM + its first-stage similarity:
  `combine="add", fill=-100.0`.
- PAB (UIT's ITM over BEiT-3's top 10): the rest of the row gets the row's lowest re-scored value: `fill="row_min"`
  (see `fusion.rerank_topk`, which re-ranks with a precomputed score matrix through `fill_matrix` below).
A constant fill below every re-scored value ranks all k candidates first; "row_min" ties the non-candidates with the
row's last candidate, so a non-candidate with a lower gallery index ranks above it, as in PAB. `fill="keep"` leaves
the non-candidates their first-stage scores.

Ties: candidates are the first k of a stable sort by descending first-stage score (equal scores: lower gallery index
first, the rule of `GalleryIndex` and `fusion`; torch's `topk` in the originals leaves their order unspecified), and
re-ranked lists sort the same way on the new scores.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxretrieval.retrieval.index import default_mesh, positive
from jaxretrieval.sharding import BATCH_AXES, replicated_host_array, under_mesh


class CrossEncoder(NamedTuple):
    """A model's two-stage scoring for the evaluator, each function jitted, taking the parameters first."""

    image: Callable[[Any, jax.Array], tuple[jax.Array, Any]]  # pixels -> (normalised embeddings, per-image inputs)
    text: Callable[[Any, jax.Array], tuple[jax.Array, Any]]  # tokens -> (normalised embeddings, per-text inputs)
    pair_scores: Callable[[Any, Any, Any], jax.Array]  # (text inputs, image inputs), B rows each -> (B,) scores


class RerankSpec(NamedTuple):
    encoder: CrossEncoder
    k: int
    fill: Any = -100.0
    combine: str = "replace"
    batch_size: int = 256


FirstStage = np.ndarray | jax.Array | tuple[np.ndarray | jax.Array, np.ndarray | jax.Array]
Fill = Literal["row_min", "keep"] | float
Combine = Literal["replace", "add"]
PairScores = Callable[[Any, Any], jax.Array]
COMBINES = ("replace", "add")


def _finite(name: str, values: np.ndarray) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name} of shape {values.shape} hold {int(bad.sum())} NaN or inf value(s), the first at "
                         f"{where}")


def sort_rows(values: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's (value, index) pairs ordered by descending value, equal values by ascending index."""
    order = np.lexsort((indices, -values), axis=-1)
    return np.take_along_axis(values, order, axis=-1), np.take_along_axis(indices, order, axis=-1)


def candidates(first_stage: FirstStage, k: int, gallery_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each query's top k gallery items: (scores (Q, k), indices (Q, k) int64), best first, ties to the lower index.

    `first_stage` is a dense (Q, G) score matrix or a (scores, indices) pair of (Q, k') top lists with k' >= k, as
    `GalleryIndex.search` returns them (re-sorted here by the tie rule; `gallery_size` bounds their indices).
    """
    k = positive("k", k)
    if isinstance(first_stage, tuple):
        if len(first_stage) != 2:
            raise ValueError(f"first-stage top lists must be a (scores, indices) pair, got {len(first_stage)} items")
        scores, indices = (np.asarray(a) for a in first_stage)
        if scores.ndim != 2 or scores.shape != indices.shape:
            raise ValueError(f"first-stage scores {scores.shape} and indices {indices.shape} must be equal (Q, k) "
                             "shapes")
        if k > scores.shape[1]:
            raise ValueError(f"k={k} exceeds the {scores.shape[1]} first-stage candidates per query: top lists have "
                             f"shape {scores.shape}")
        if not np.issubdtype(indices.dtype, np.integer):
            raise ValueError(f"first-stage indices must be integers, got dtype {indices.dtype}")
        _finite("first-stage scores", scores)
        bound = np.iinfo(np.int64).max if gallery_size is None else gallery_size
        if indices.size and (indices.min() < 0 or indices.max() >= bound):
            raise ValueError(f"first-stage indices span [{indices.min()}, {indices.max()}], outside a gallery of "
                             f"{bound} items")
        ordered = np.sort(indices, axis=1)
        if (ordered[:, 1:] == ordered[:, :-1]).any():
            raise ValueError(f"first-stage indices {indices.shape} repeat a gallery item within a query's list")
        scores, indices = sort_rows(scores, indices.astype(np.int64))
        return scores[:, :k], indices[:, :k]
    scores = np.asarray(first_stage)
    if scores.ndim != 2:
        raise ValueError(f"first-stage scores must be a (queries, gallery) matrix, got shape {scores.shape}")
    if gallery_size is not None and scores.shape[1] != gallery_size:
        raise ValueError(f"first-stage scores {scores.shape} cover {scores.shape[1]} gallery items, the gallery "
                         f"inputs {gallery_size}")
    if k > scores.shape[1]:
        raise ValueError(f"k={k} exceeds the gallery size: first-stage scores have shape {scores.shape}")
    _finite("first-stage scores", scores)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k].astype(np.int64)
    return np.take_along_axis(scores, top, axis=1), top


def _check_fill(fill: Fill) -> None:
    if isinstance(fill, str):
        if fill not in ("row_min", "keep"):
            raise ValueError(f"fill must be 'row_min', 'keep' or a finite number, got {fill!r}")
    elif isinstance(fill, bool) or not isinstance(fill, int | float | np.floating) or not math.isfinite(fill):
        raise ValueError(f"fill must be 'row_min', 'keep' or a finite number, got {fill!r}")


def _check_combine(combine: Combine) -> None:
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {', '.join(COMBINES)}, got {combine!r}")


def fill_matrix(values: np.ndarray, indices: np.ndarray, gallery_size: int, fill: Fill = "row_min",
                base: np.ndarray | None = None) -> np.ndarray:
    """A (Q, gallery_size) matrix holding values[q, j] at column indices[q, j] and, elsewhere in row q: the lowest of
    the row's values ("row_min"), base's score ("keep") or the number `fill`."""
    values, indices = np.asarray(values), np.asarray(indices)
    if values.shape != indices.shape or values.ndim != 2:
        raise ValueError(f"re-scored values {values.shape} and indices {indices.shape} must be equal (Q, k) shapes")
    _check_fill(fill)
    if fill == "keep":
        if base is None:
            raise ValueError("fill='keep' needs the dense (Q, G) first-stage matrix; top lists were given")
        if base.shape != (len(values), gallery_size):
            raise ValueError(f"fill='keep': first-stage scores {base.shape} are not (Q, G) = "
                             f"{(len(values), gallery_size)}")
        out = np.array(base, dtype=np.result_type(base, values))
    elif fill == "row_min":
        out = np.empty((len(values), gallery_size), values.dtype)
        out[:] = values.min(axis=1, keepdims=True)
    else:
        out = np.full((len(values), gallery_size), fill, np.result_type(values, np.float32))
    np.put_along_axis(out, indices, values, axis=1)
    return out


def _leaves(name: str, tree: Any) -> tuple[list[np.ndarray], Any]:
    leaves, treedef = jax.tree.flatten(tree)
    leaves = [np.asarray(leaf) for leaf in leaves]
    if not leaves:
        raise ValueError(f"{name} hold no arrays")
    shapes = [leaf.shape for leaf in leaves]
    if any(len(s) == 0 for s in shapes) or len({s[0] for s in shapes}) != 1:
        raise ValueError(f"{name} must share one leading (row) dimension, got shapes {shapes}")
    return leaves, treedef


def _batch_axes(mesh: Mesh) -> tuple[tuple[str, ...], int]:
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names) or tuple(mesh.axis_names)
    return axes, math.prod(mesh.shape[a] for a in axes)


def score_pairs(pair_scores: PairScores, query_inputs: Any, gallery_inputs: Any, indices: np.ndarray, *,
                mesh: Mesh | None = None, batch_size: int = 1024) -> np.ndarray:
    """(Q, k) cross-encoder scores: entry [q, j] = pair_scores(query q's rows, gallery item indices[q, j]'s rows).

    query_inputs / gallery_inputs: pytrees of host arrays (features, tokens, masks) with Q / G leading rows, held in
    full by every process. Pairs are taken row by row in batches of `batch_size` (rounded down to a multiple of the
    devices on the mesh's batch axes), gathered on the host and placed on `mesh` split over those axes; the last
    batch is padded with its last pair, then trimmed, so every call has one shape. `pair_scores(queries, gallery)`
    gets two pytrees of B rows each and returns (B,) scores; jit it (e.g. `lambda q, g: itm(params, q, g)` with a
    jitted `itm`), as it is called as given. The next batch is dispatched before the previous one is read back.
    """
    mesh = mesh if mesh is not None else default_mesh()
    q_leaves, q_def = _leaves("query inputs", query_inputs)
    g_leaves, g_def = _leaves("gallery inputs", gallery_inputs)
    indices = np.asarray(indices)
    if indices.ndim != 2 or len(indices) != len(q_leaves[0]):
        raise ValueError(f"candidate indices {indices.shape} must be (Q, k) for {len(q_leaves[0])} queries")
    if indices.size and (indices.min() < 0 or indices.max() >= len(g_leaves[0])):
        raise ValueError(f"candidate indices span [{indices.min()}, {indices.max()}], outside a gallery of "
                         f"{len(g_leaves[0])} rows")
    axes, devices = _batch_axes(mesh)
    pairs = indices.size
    size = max(devices, positive("batch_size", batch_size) // devices * devices)
    size = min(size, max(devices, math.ceil(pairs / devices) * devices))
    sharding = NamedSharding(mesh, PartitionSpec(axes))
    query_of = np.repeat(np.arange(len(indices)), indices.shape[1])
    gallery_of = indices.reshape(-1)
    parts: list[np.ndarray] = []

    def place(leaves: list[np.ndarray], treedef: Any, rows: np.ndarray) -> Any:
        return jax.tree.unflatten(treedef, [replicated_host_array(leaf[rows], sharding) for leaf in leaves])

    def collect(count: int, result: jax.Array) -> None:
        host = np.asarray(multihost_utils.process_allgather(result, tiled=True))
        if host.shape != (size,):
            raise ValueError(f"pair_scores must return ({size},) scores for a batch of {size} pairs, got shape "
                             f"{host.shape}")
        parts.append(host[:count])

    pending: list[tuple[int, jax.Array]] = []
    for start in range(0, pairs, size):
        stop = min(start + size, pairs)
        rows = np.concatenate([np.arange(start, stop), np.full(size - (stop - start), stop - 1)])
        pending.append((stop - start, pair_scores(place(q_leaves, q_def, query_of[rows]),
                                                  place(g_leaves, g_def, gallery_of[rows]))))
        if len(pending) == 2:
            collect(*pending.pop(0))
    for item in pending:
        collect(*item)
    scores = np.concatenate(parts).reshape(indices.shape) if parts else np.zeros(indices.shape, np.float32)
    _finite("cross-encoder scores", scores)
    return scores


def _combined(cross: np.ndarray, first: np.ndarray, combine: Combine) -> np.ndarray:
    return cross if combine == "replace" else cross + first


def _gallery_size(gallery_inputs: Any) -> int:
    return len(_leaves("gallery inputs", gallery_inputs)[0][0])


def rerank(first_stage: FirstStage, pair_scores: PairScores, query_inputs: Any, gallery_inputs: Any, k: int, *,
           combine: Combine = "replace", mesh: Mesh | None = None,
           batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Re-ranked top-k lists: (scores (Q, k), gallery indices (Q, k)), best first, ties to the lower index.

    Candidates are each query's top k under `first_stage` (see `candidates`); each gets pair_scores' value
    (combine="replace") or that plus its first-stage score ("add"). Batching and placement as in `score_pairs`.
    """
    _check_combine(combine)
    first, top = candidates(first_stage, k, _gallery_size(gallery_inputs))
    cross = score_pairs(pair_scores, query_inputs, gallery_inputs, top, mesh=mesh, batch_size=batch_size)
    return sort_rows(_combined(cross, first, combine), top)


def rerank_matrix(first_stage: FirstStage, pair_scores: PairScores, query_inputs: Any, gallery_inputs: Any, k: int,
                  *, fill: Fill = "row_min", combine: Combine = "replace", mesh: Mesh | None = None,
                  batch_size: int = 1024) -> np.ndarray:
    """The full (Q, G) re-ranked matrix: candidates as in `rerank`, the other items of each row per `fill`:
    "row_min" (PAB), "keep" (their first-stage scores; needs a dense first stage) or a number (X2-VLM: -100.0)."""
    _check_fill(fill)
    _check_combine(combine)
    gallery = _gallery_size(gallery_inputs)
    dense = None if isinstance(first_stage, tuple) else np.asarray(first_stage)
    if fill == "keep" and dense is None:
        raise ValueError("fill='keep' needs the dense (Q, G) first-stage matrix; top lists were given")
    first, top = candidates(first_stage, k, gallery)
    cross = score_pairs(pair_scores, query_inputs, gallery_inputs, top, mesh=mesh, batch_size=batch_size)
    return fill_matrix(_combined(cross, first, combine), top, gallery, fill, dense)


@functools.lru_cache(maxsize=8)
def fusion_cross_encoder(graphdef: nnx.GraphDef, mesh: Any) -> CrossEncoder:
    """The CrossEncoder of a BERT-fusion model (models.bert.FusionHeads with image_tokens / image_features /
    text_features: X-VLM, UIT): ITC features of each side, the image tokens and the text states with their mask kept
    for the ITM head's pair scores (the match logit)."""
    def image(params: Any, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        model = nnx.merge(graphdef, params)
        tokens = model.image_tokens(pixels)
        return model.image_features(tokens), tokens

    def text(params: Any, tokens: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        model = nnx.merge(graphdef, params)
        hidden = model.text_hidden(tokens)
        return model.text_features(hidden), (hidden, model.keep(tokens))

    def pair_scores(params: Any, texts: tuple[jax.Array, jax.Array], images: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, params).match_logits(*texts, images)[:, 1]

    jit = lambda fn: jax.jit(under_mesh(fn, mesh))  # noqa: E731
    return CrossEncoder(jit(image), jit(text), jit(pair_scores))
