"""Top-k re-ranking with a cross-encoder: candidates and their tie order, re-ranked lists and full matrices equal to a
dense scoring of every pair by the same tiny NNX ITM head, fill and combine modes, batching on 1 and 8 devices."""

from __future__ import annotations

import textwrap
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

from jaxretrieval.retrieval.fusion import ScoreMatrix, rerank_topk
from jaxretrieval.retrieval.index import GalleryIndex
from jaxretrieval.retrieval.rerank import candidates, fill_matrix, rerank, rerank_matrix, score_pairs

Q, G, L, D = 7, 13, 5, 8


class TinyITM(nnx.Module):
    """Masked-mean query tokens and a gallery feature -> MLP -> the "match" logit (class 1 of 2)."""

    def __init__(self, dim: int, rngs: nnx.Rngs) -> None:
        self.fc1 = nnx.Linear(3 * dim, 16, rngs=rngs)
        self.fc2 = nnx.Linear(16, 2, rngs=rngs)

    def __call__(self, query: dict, gallery: jax.Array) -> jax.Array:
        mask = query["mask"].astype(jnp.float32)
        pooled = (query["tokens"] * mask[..., None]).sum(-2) / mask.sum(-1, keepdims=True)
        pooled, gallery = jnp.broadcast_arrays(pooled, gallery)
        hidden = jax.nn.gelu(self.fc1(jnp.concatenate([pooled, gallery, pooled * gallery], axis=-1)))
        return self.fc2(hidden)[..., 1]


def problem(seed: int = 0, queries: int = Q, gallery: int = G):
    """(first-stage scores with many ties, query inputs, gallery inputs, jitted pair scorer, dense (Q, G) reference,
    trace counter)."""
    rng = np.random.default_rng(seed)
    first = (rng.integers(0, 4, (queries, gallery)) / 4).astype(np.float32)
    lengths = rng.integers(1, L + 1, queries)
    query = {"tokens": rng.normal(size=(queries, L, D)).astype(np.float32),
             "mask": (np.arange(L)[None] < lengths[:, None]).astype(np.int32)}
    feats = rng.normal(size=(gallery, D)).astype(np.float32)
    graphdef, params = nnx.split(TinyITM(D, nnx.Rngs(seed)))
    traces = []

    @jax.jit
    def itm(params, q, g):
        traces.append(1)
        return nnx.merge(graphdef, params)(q, g)

    pair_scores = partial(itm, params)
    dense_query = {"tokens": query["tokens"][:, None], "mask": query["mask"][:, None]}
    dense = np.asarray(nnx.merge(graphdef, params)(dense_query, feats[None]))
    assert dense.shape == (queries, gallery)
    return first, query, feats, pair_scores, dense, traces


def expected_lists(first: np.ndarray, values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference: stable top k of the first stage, then values there sorted by (-value, index), written plainly."""
    top = np.argsort(-first, axis=1, kind="stable")[:, :k]
    rows = [sorted((-values[q, j], j) for j in top[q]) for q in range(len(first))]
    return (np.array([[-v for v, _ in row] for row in rows]), np.array([[j for _, j in row] for row in rows]))


@pytest.mark.parametrize("k", [1, 5, G])
@pytest.mark.parametrize("batch_size", [4, 16])
def test_reranked_lists_equal_the_dense_computation_on_candidates(k, batch_size):
    first, query, feats, pair_scores, dense, traces = problem()
    scores, indices = rerank(first, pair_scores, query, feats, k, batch_size=batch_size)
    want_scores, want_indices = expected_lists(first, dense, k)
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)
    assert scores.shape == indices.shape == (Q, k) and len(traces) == 1  # one shape: the last batch is padded


def test_candidates_break_first_stage_ties_by_the_lower_gallery_index():
    first = np.array([[0.5, 0.9, 0.5, 0.5, 0.1], [1.0, 1.0, 1.0, 1.0, 1.0]])
    scores, indices = candidates(first, 3)
    np.testing.assert_array_equal(indices, [[1, 0, 2], [0, 1, 2]])
    np.testing.assert_array_equal(scores, [[0.9, 0.5, 0.5], [1.0, 1.0, 1.0]])
    shuffled = (np.array([[0.5, 0.5, 0.9, 0.5], [1.0, 1.0, 1.0, 1.0]]), np.array([[3, 2, 1, 0], [4, 2, 3, 1]]))
    scores, indices = candidates(shuffled, 3, gallery_size=5)
    np.testing.assert_array_equal(indices, [[1, 0, 2], [1, 2, 3]])


@pytest.mark.parametrize("fill", ["row_min", "keep", -100.0])
@pytest.mark.parametrize("combine", ["replace", "add"])
def test_full_matrix_fill_and_combine_modes(fill, combine):
    first, query, feats, pair_scores, dense, _ = problem(1)
    k = 5
    out = rerank_matrix(first, pair_scores, query, feats, k, fill=fill, combine=combine, batch_size=6)
    top = np.argsort(-first, axis=1, kind="stable")[:, :k]
    chosen = np.zeros_like(first, dtype=bool)
    np.put_along_axis(chosen, top, True, axis=1)
    new = dense + (first if combine == "add" else 0)
    rest = {"row_min": np.where(chosen, new, np.inf).min(axis=1, keepdims=True) + 0 * first, "keep": first,
            -100.0: np.full_like(first, -100.0)}[fill]
    np.testing.assert_allclose(out, np.where(chosen, new, rest), rtol=1e-5, atol=1e-6)
    assert out.shape == (Q, G)
    if fill == -100.0:  # X2-VLM: every candidate ranks before every other item
        assert set(np.argsort(-out, axis=1, kind="stable")[0, :k]) == set(top[0])


def test_ties_in_the_cross_encoder_scores_rank_the_lower_index_first():
    rng = np.random.default_rng(3)
    q, g = rng.integers(-1, 2, (6, 3)).astype(np.float32), rng.integers(-1, 2, (11, 3)).astype(np.float32)
    bilinear = jax.jit(lambda a, b: (a * b).sum(-1))  # small integers: exact, with many ties
    first = rng.normal(size=(6, 11))
    for k in (4, 11):
        scores, indices = rerank(first, bilinear, q, g, k, batch_size=5)
        want_scores, want_indices = expected_lists(first, q @ g.T, k)
        np.testing.assert_array_equal(indices, want_indices)
        np.testing.assert_array_equal(scores, want_scores)


def test_gallery_index_top_lists_give_the_dense_result():
    rng = np.random.default_rng(4)
    q, g = rng.integers(-2, 3, (9, 4)).astype(np.float32), rng.integers(-2, 3, (40, 4)).astype(np.float32)
    first, indices = GalleryIndex(g, gallery_chunk=8).search(q, 10)
    bilinear = jax.jit(lambda a, b: (a * b[:, ::-1]).sum(-1))
    for k in (3, 10):
        from_lists = rerank((first, indices), bilinear, q, g, k, batch_size=7)
        from_dense = rerank(q @ g.T, bilinear, q, g, k, batch_size=7)
        np.testing.assert_array_equal(from_lists[1], from_dense[1])
        np.testing.assert_array_equal(from_lists[0], from_dense[0])
    np.testing.assert_array_equal(rerank_matrix((first, indices), bilinear, q, g, 6, fill=-100.0),
                                  rerank_matrix(q @ g.T, bilinear, q, g, 6, fill=-100.0))


def test_fusion_rerank_is_the_same_protocol_on_a_precomputed_matrix():
    rng = np.random.default_rng(5)
    primary, itm = np.round(rng.normal(size=(2, Q, G)), 1)
    lookup = jnp.asarray(itm)

    def pair_scores(query, gallery):
        return lookup[query, gallery]

    for k in (1, 4, G, G + 3):
        fused = rerank_topk(ScoreMatrix(primary, list(range(Q)), list(range(G)), "p"),
                            ScoreMatrix(itm, list(range(Q)), list(range(G)), "itm"), k)
        direct = rerank_matrix(primary, pair_scores, np.arange(Q), np.arange(G), min(k, G), batch_size=8)
        np.testing.assert_allclose(fused.scores, direct, rtol=1e-6)


def test_score_pairs_pairs_each_query_with_its_own_candidates():
    seen = []

    def pair_scores(query, gallery):
        seen.append(np.stack([np.asarray(query), np.asarray(gallery)], axis=1))
        return (query * 100 + gallery).astype(jnp.float32)

    indices = np.array([[4, 0], [1, 1], [3, 2]])
    out = score_pairs(pair_scores, np.arange(3), np.arange(5), indices, batch_size=4)
    np.testing.assert_array_equal(out, [[4, 0], [101, 101], [203, 202]])
    assert [len(s) for s in seen] == [4, 4] and seen[1][2:].tolist() == [[2, 2], [2, 2]]  # padded with the last pair


@pytest.mark.parametrize("call, message", [
    (lambda p: rerank(p[0], p[3], p[1], p[2], G + 1), rf"k={G + 1} exceeds the gallery size.*\({Q}, {G}\)"),
    (lambda p: rerank(p[0], p[3], p[1], p[2], 0), "k must be a positive integer, got 0"),
    (lambda p: rerank(p[0][:, :-1], p[3], p[1], p[2], 2), rf"first-stage scores \({Q}, {G - 1}\).*gallery inputs {G}"),
    (lambda p: rerank(p[0][:-1], p[3], p[1], p[2], 2), rf"candidate indices \({Q - 1}, 2\).*{Q} queries"),
    (lambda p: rerank(p[0], p[3], {"tokens": p[1]["tokens"], "mask": p[1]["mask"][:-1]}, p[2], 2),
     r"query inputs must share one leading.*\(6, 5\)"),
    (lambda p: rerank(np.where(np.eye(Q, G) > 0, np.nan, p[0]), p[3], p[1], p[2], 2),
     r"first-stage scores of shape \(7, 13\).*NaN or inf.*\(0, 0\)"),
    (lambda p: rerank(p[0], lambda q, g: jnp.full(q["mask"].shape[0], jnp.inf), p[1], p[2], 2),
     r"cross-encoder scores of shape \(7, 2\) hold 14 NaN or inf"),
    (lambda p: rerank(p[0], lambda q, g: q["mask"], p[1], p[2], 2, batch_size=8),
     r"pair_scores must return \(8,\) scores.*got shape \(8, 5\)"),
    (lambda p: rerank_matrix(candidates(p[0], 4), p[3], p[1], p[2], 2, fill="keep"), "fill='keep' needs the dense"),
    (lambda p: rerank_matrix(p[0], p[3], p[1], p[2], 2, fill="min"), "fill must be 'row_min', 'keep' or a finite"),
    (lambda p: rerank_matrix(p[0], p[3], p[1], p[2], 2, fill=float("-inf")), "fill must be"),
    (lambda p: rerank(p[0], p[3], p[1], p[2], 2, combine="mul"), "combine must be one of replace, add"),
    (lambda p: rerank(candidates(p[0], 3), p[3], p[1], p[2], 4), r"k=4 exceeds the 3 first-stage candidates.*\(7, 3\)"),
    (lambda p: rerank((p[0][:, :3], np.zeros((Q, 2), int)), p[3], p[1], p[2], 1),
     r"scores \(7, 3\) and indices \(7, 2\)"),
    (lambda p: rerank((p[0][:, :2], np.full((Q, 2), G)), p[3], p[1], p[2], 1), rf"outside a gallery of {G} items"),
    (lambda p: rerank((p[0][:, :2], np.zeros((Q, 2), int)), p[3], p[1], p[2], 1), "repeat a gallery item"),
])
def test_bad_input_is_refused_with_shapes_named(call, message):
    with pytest.raises(ValueError, match=message):
        call(problem())


def test_fill_matrix_row_min_is_the_pab_rule():
    out = fill_matrix(np.array([[3.0, -1.0]]), np.array([[0, 2]]), 4, "row_min")
    np.testing.assert_array_equal(out, [[3.0, -1.0, -1.0, -1.0]])


EIGHT_DEVICES = textwrap.dedent("""
    import importlib.util, sys
    import jax, numpy as np
    from jax.sharding import Mesh, PartitionSpec
    from jaxretrieval.sharding import MESH_AXES
    from jaxretrieval.retrieval.rerank import rerank, rerank_matrix
    spec = importlib.util.spec_from_file_location("test_rerank", "tests/test_rerank.py")
    t = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(t)
    assert jax.device_count() == 8
    first, query, feats, itm, dense, traces = t.problem(2, queries=9, gallery=11)
    seen = []

    def pair_scores(q, g):
        seen.append((q["tokens"].sharding.spec, g.sharding.spec, q["tokens"].shape[0],
                     {s.data.shape[0] for s in g.addressable_shards}))
        return itm(q, g)

    for shape, batch_axes in (((4, 2, 1), ("data", "fsdp")), ((2, 2, 2), ("data", "fsdp"))):
        mesh = Mesh(np.asarray(jax.devices()).reshape(shape), MESH_AXES)
        split = shape[0] * shape[1]
        for batch_size in (12, 20):
            for k in (1, 5, 11):
                seen.clear()
                scores, indices = rerank(first, pair_scores, query, feats, k, mesh=mesh, batch_size=batch_size)
                want_scores, want_indices = t.expected_lists(first, dense, k)
                np.testing.assert_array_equal(indices, want_indices)
                np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)
                size = min(batch_size // split * split, -(-9 * k // split) * split)
                assert {s[2] for s in seen} == {size}, (seen, size)
                assert all(s[0] == PartitionSpec(batch_axes) == s[1] and s[3] == {size // split} for s in seen)
        for fill in ("row_min", "keep", -100.0):
            out = rerank_matrix(first, pair_scores, query, feats, 5, mesh=mesh, batch_size=12, fill=fill)
            single = rerank_matrix(first, itm, query, feats, 5, batch_size=7, fill=fill)
            np.testing.assert_allclose(out, single, rtol=1e-5, atol=1e-6)
    print("ok", len(traces))
""")


@pytest.mark.slow
def test_eight_devices_give_the_dense_result():
    from conftest import run_python

    out = run_python(EIGHT_DEVICES, devices=8).stdout.split()
    assert out[-2] == "ok" and int(out[-1]) <= 6  # one compile per (mesh, batch shape), plus the 1-device runs


def test_a_mesh_with_only_a_data_axis_splits_over_it():
    first, query, feats, pair_scores, dense, _ = problem(6)
    mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    a = rerank(first, pair_scores, query, feats, 3, mesh=mesh, batch_size=5)
    b = rerank(first, pair_scores, query, feats, 3, batch_size=5)
    np.testing.assert_array_equal(a[1], b[1])
