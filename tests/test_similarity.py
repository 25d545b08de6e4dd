"""Exact chunked top-k retrieval and the full similarity matrix, against plain numpy references."""

from __future__ import annotations

import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import run_python
from jax.sharding import NamedSharding, PartitionSpec

from jaxretrieval.retrieval.index import _chunk_topk, _topk_fn, default_mesh
from jaxretrieval.retrieval.similarity import topk_similarity, write_similarity


def reference_topk(queries: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Full float64 matrix, stable sort on -score: equal scores keep the lower gallery index first."""
    scores = queries.astype(np.float64) @ gallery.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


def random_embeddings(rows: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize(("queries", "gallery", "k", "query_chunk", "gallery_chunk"), [
    (37, 500, 10, 16, 64),    # gallery not a multiple of the chunk, last query chunk partial
    (8, 257, 5, 8, 256),      # one real row in the last gallery chunk
    (6, 3000, 5, 4, 1024),    # tiled chunk top-k (3 chunks of 8 tiles)
    (5, 40, 40, 2, 7),        # k = G
    (6, 23, 23, 1, 1),        # k = G with chunks of one row
    (9, 100, 3, 1, 1),        # chunks of one
    (4, 30, 1, 1024, 65536),  # chunks larger than the inputs
    (1, 1, 1, 1, 1),
])
def test_topk_matches_numpy(queries: int, gallery: int, k: int, query_chunk: int, gallery_chunk: int) -> None:
    q, g = random_embeddings(queries, 32, seed=queries), random_embeddings(gallery, 32, seed=gallery + 1)
    scores, indices = topk_similarity(q, g, k, query_chunk=query_chunk, gallery_chunk=gallery_chunk)
    want_scores, want_indices = reference_topk(q, g, k)
    assert scores.dtype == np.float32 and indices.dtype == np.int32
    assert scores.shape == indices.shape == (queries, k)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(indices, want_indices)
    assert np.all(np.diff(scores, axis=1) <= 0)


@pytest.mark.parametrize(("gallery_chunk", "k"), [(1, 25), (3, 25), (16, 25), (1000, 25), (256, 1), (1024, 3)])
def test_ties_rank_the_lower_gallery_index_first(gallery_chunk: int, k: int) -> None:
    rng = np.random.default_rng(0)
    # Few distinct values and duplicated rows: most scores are tied, across chunk and tile boundaries too.
    q = rng.integers(-1, 2, (12, 4)).astype(np.float32)
    g = np.repeat(rng.integers(-1, 2, (400, 4)).astype(np.float32), 3, axis=0)
    scores, indices = topk_similarity(q, g, k, query_chunk=5, gallery_chunk=gallery_chunk)
    want_scores, want_indices = reference_topk(q, g, k)
    np.testing.assert_array_equal(scores, want_scores)
    np.testing.assert_array_equal(indices, want_indices)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize(("width", "k"), [(1024, 3), (1024, 7), (4096, 10), (1000, 4), (256, 2)])
def test_tiled_chunk_topk_equals_lax_top_k(width: int, k: int, tied: bool) -> None:
    rng = np.random.default_rng(width + k)
    scores = rng.standard_normal((16, width)).astype(np.float32)
    if tied:
        scores = np.round(scores)
    top, position = jax.jit(_chunk_topk, static_argnums=1)(scores, k)
    want_top, want_position = jax.lax.top_k(scores, k)
    np.testing.assert_array_equal(top, want_top)
    np.testing.assert_array_equal(position, want_position)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(position, order)


def test_all_equal_scores_give_the_first_k_indices() -> None:
    scores, indices = topk_similarity(np.ones((3, 2), np.float32), np.ones((50, 2), np.float32), 7, gallery_chunk=4)
    np.testing.assert_array_equal(indices, np.tile(np.arange(7), (3, 1)))
    np.testing.assert_array_equal(scores, 2.0)


def test_accepts_bf16_and_jax_arrays_and_computes_in_float32() -> None:
    q, g = random_embeddings(10, 64, 1), random_embeddings(300, 64, 2)
    q16, g16 = q.astype(ml_dtypes.bfloat16), g.astype(ml_dtypes.bfloat16)
    scores, indices = topk_similarity(jnp.asarray(q16), g16, 8, gallery_chunk=32)
    want_scores, want_indices = reference_topk(q16.astype(np.float32), g16.astype(np.float32), 8)
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    np.testing.assert_array_equal(indices, want_indices)


def test_write_similarity_equals_the_matrix_product(tmp_path: Path) -> None:
    q, g = random_embeddings(45, 16, 3), random_embeddings(77, 16, 4)
    path = write_similarity(q, g, tmp_path / "similarity.npy", query_chunk=8)
    written = np.load(path)
    assert written.dtype == np.float32 and written.shape == (45, 77)
    np.testing.assert_allclose(written, q @ g.T, atol=1e-5)


@pytest.mark.parametrize(("queries", "gallery", "k", "message"), [
    (np.zeros((3, 8)), np.zeros((5, 4)), 1, r"queries \(3, 8\) and gallery \(5, 4\) differ in embedding dim"),
    (np.zeros((3, 8)), np.zeros((5, 8)), 0, "k must be a positive integer"),
    (np.zeros((3, 8)), np.zeros((5, 8)), 6, r"k=6 exceeds the gallery size: gallery has shape \(5, 8\)"),
    (np.full((3, 8), np.nan), np.zeros((5, 8)), 1, r"queries of shape \(3, 8\) holds NaN or inf"),
    (np.zeros((3, 8)), np.full((5, 8), -np.inf), 1, r"gallery of shape \(5, 8\) holds NaN or inf"),
    (np.zeros(8), np.zeros((5, 8)), 1, r"queries must be \(rows, dim\), got shape \(8,\)"),
    (np.zeros((3, 8), np.int32), np.zeros((5, 8)), 1, "floating-point"),
    (np.zeros((3, 8)), np.zeros((0, 8)), 1, r"gallery of shape \(0, 8\) is empty"),
])
def test_bad_inputs_raise(queries: np.ndarray, gallery: np.ndarray, k: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        topk_similarity(queries, gallery, k)


def test_bad_chunks_and_overflow_raise(tmp_path: Path) -> None:
    q, g = np.ones((2, 4), np.float32), np.ones((6, 4), np.float32)
    with pytest.raises(ValueError, match="gallery_chunk must be a positive integer"):
        topk_similarity(q, g, 1, gallery_chunk=0)
    with pytest.raises(ValueError, match="query_chunk must be a positive integer"):
        write_similarity(q, g, tmp_path / "s.npy", query_chunk=-1)
    with pytest.raises(ValueError, match="overflowed float32"):
        topk_similarity(q * 3e38, g * 3e38, 2)


def compiled_temp_bytes(rows_per_device: int, query_chunk: int, gallery_chunk: int, dim: int = 64) -> int:
    mesh = default_mesh()
    replicated = NamedSharding(mesh, PartitionSpec())
    args = (jax.ShapeDtypeStruct((query_chunk, dim), jnp.float32, sharding=replicated),
            jax.ShapeDtypeStruct((rows_per_device, dim), jnp.float32,
                                 sharding=NamedSharding(mesh, PartitionSpec(mesh.axis_names))),
            jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated))
    compiled = _topk_fn(mesh, 5, gallery_chunk, rows_per_device).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_device_memory_is_bounded_by_the_chunk_not_the_gallery() -> None:
    query_chunk, gallery_chunk = 256, 1024
    small = compiled_temp_bytes(8 * gallery_chunk, query_chunk, gallery_chunk)
    large = compiled_temp_bytes(64 * gallery_chunk, query_chunk, gallery_chunk)
    assert large == small
    block = query_chunk * gallery_chunk * 4  # one chunk of float32 scores
    assert block <= small < 4 * block
    assert compiled_temp_bytes(8 * gallery_chunk, query_chunk, 4 * gallery_chunk) >= 4 * block


def test_a_gallery_whose_matrix_exceeds_memory_many_times() -> None:
    # 1024 x 2**20 float32 scores would take 4 GiB; the process stays under a quarter of that.
    out = run_python(textwrap.dedent("""
        import numpy as np
        from jaxretrieval.retrieval.similarity import topk_similarity
        rng = np.random.default_rng(0)
        q = rng.standard_normal((1024, 8), dtype=np.float32)
        g = rng.standard_normal((1 << 20, 8), dtype=np.float32)
        scores, indices = topk_similarity(q, g, 5, query_chunk=256, gallery_chunk=8192)
        top = (q[:4] @ g.T).argmax(axis=1)
        assert (indices[:4, 0] == top).all(), (indices[:4, 0], top)
        # VmHWM is this process's own peak; ru_maxrss would include the forking parent's size.
        status = open("/proc/self/status").read().split("VmHWM:")[1]
        print(int(status.split()[0]) * 1024)
    """), devices=1)
    peak = int(out.stdout.split()[-1])
    assert peak < (4 << 30) // 4, f"peak resident memory {peak / 2**20:.0f} MiB"


def test_sharded_results_equal_single_device(tmp_path: Path) -> None:
    out = run_python(f"path = {str(tmp_path / 'similarity.npy')!r}\n" + textwrap.dedent("""
        import jax
        import numpy as np
        from jaxretrieval.config import MeshConfig
        from jaxretrieval.retrieval.similarity import topk_similarity, write_similarity
        from jaxretrieval.sharding import make_mesh
        assert jax.device_count() == 8
        rng = np.random.default_rng(0)
        q = rng.standard_normal((45, 16)).astype(np.float32)
        g = rng.standard_normal((301, 16)).astype(np.float32)
        tied = np.repeat(rng.integers(-1, 2, (40, 4)).astype(np.float32), 3, axis=0)
        tied_q = rng.integers(-1, 2, (10, 4)).astype(np.float32)
        wide, wide_tied = rng.standard_normal((4000, 16)).astype(np.float32), np.repeat(tied, 30, axis=0)
        single = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
        cases = [(q, g, 10, 16), (q, g, 301, 7), (q, g, 3, 1), (tied_q, tied, 30, 4),
                 (q, wide, 3, 512), (tied_q, wide_tied, 3, 512)]
        want = [topk_similarity(*case[:3], mesh=single, query_chunk=8, gallery_chunk=case[3]) for case in cases]
        for (queries, gallery, k, _), (_, indices) in zip(cases, want):
            exact = queries.astype(np.float64) @ gallery.astype(np.float64).T
            np.testing.assert_array_equal(indices, np.argsort(-exact, axis=1, kind="stable")[:, :k])
        for config in (MeshConfig(data=8), MeshConfig(data=2, fsdp=2, tensor=2)):
            mesh = make_mesh(config)
            for (queries, gallery, k, chunk), (scores, indices) in zip(cases, want):
                got = topk_similarity(queries, gallery, k, mesh=mesh, query_chunk=8, gallery_chunk=chunk)
                np.testing.assert_array_equal(got[1], indices)
                np.testing.assert_allclose(got[0], scores, atol=1e-6)
            write_similarity(q, g, path, mesh=mesh, query_chunk=16)
            np.testing.assert_allclose(np.load(path), q @ g.T, atol=1e-5)
        print("ok")
    """), devices=8)
    assert out.stdout.strip().endswith("ok")
