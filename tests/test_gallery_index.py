"""GalleryIndex: exact top-k on the scores it computes (stable argsort, ties to the lower index) for k up to 1000, in
float32 and bfloat16, on 1 and 8 devices; half-precision products with float32 accumulation; a gallery placed once and
searched many times; save and load."""

from __future__ import annotations

import json
import re
import textwrap

import jax
import ml_dtypes
import numpy as np
import pytest
from conftest import run_python

from jaxretrieval.errors import DataError
from jaxretrieval.retrieval import index as index_module
from jaxretrieval.retrieval.index import GalleryIndex, default_gallery_chunk, default_mesh

BF16 = np.dtype(ml_dtypes.bfloat16)


def planted(rows: int, queries: int, dim: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Values in {-1, -0.5, 0, 0.5, 1}: every product and sum is exact in bfloat16 inputs and float32 sums, and a
    third of the gallery rows repeat earlier ones, so scores tie everywhere, across chunks and devices."""
    rng = np.random.default_rng(seed)
    gallery = rng.integers(-2, 3, (rows, dim)).astype(np.float32) / 2
    repeats = rng.choice(rows, rows // 3, replace=False)
    gallery[repeats] = gallery[rng.integers(0, rows, len(repeats))]
    return rng.integers(-2, 3, (queries, dim)).astype(np.float32) / 2, gallery


def stable_topk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("k", [1, 10, 100, 1000])
def test_planted_ties_match_a_stable_argsort(k, dtype):
    q, g = planted(2053, 37)  # 2053 rows: no chunk divides them
    index = GalleryIndex(g, dtype=dtype, gallery_chunk=384, query_chunk=16)
    scores, indices = index.search(q, k)
    want_scores, want_indices = stable_topk(q.astype(np.float64) @ g.astype(np.float64).T, k)
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_array_equal(scores, want_scores)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("k", [1, 10, 1000])
def test_random_data_match_a_stable_argsort_of_the_computed_scores(tmp_path, k, dtype):
    """Exact is defined on the scores the index computes: its own full matrix, argsorted, gives the same lists."""
    rng = np.random.default_rng(k)
    g = rng.standard_normal((3001, 48)).astype(np.float32)
    q = rng.standard_normal((20, 48)).astype(np.float32)
    index = GalleryIndex(g, dtype=dtype, gallery_chunk=1024, query_chunk=8)
    computed = np.load(index.write_similarity(q, tmp_path / "scores.npy"))
    scores, indices = index.search(q, k)
    want_scores, want_indices = stable_topk(computed, k)
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-6, atol=1e-6)
    cast = g.astype(BF16).astype(np.float64) if dtype == "bfloat16" else g.astype(np.float64)
    queries = q.astype(BF16).astype(np.float64) if dtype == "bfloat16" else q.astype(np.float64)
    np.testing.assert_allclose(computed, queries @ cast.T, atol=1e-4)  # the products of the stored values


def test_eight_devices_give_the_single_device_lists():
    out = run_python(textwrap.dedent("""
        import jax, numpy as np
        from jaxretrieval.config import MeshConfig
        from jaxretrieval.retrieval.index import GalleryIndex
        from jaxretrieval.sharding import make_mesh
        assert jax.device_count() == 8
        rng = np.random.default_rng(0)
        g = rng.integers(-2, 3, (2053, 8)).astype(np.float32) / 2
        g[rng.choice(2053, 600, replace=False)] = g[rng.integers(0, 2053, 600)]
        q = rng.integers(-2, 3, (21, 8)).astype(np.float32) / 2
        exact = q.astype(np.float64) @ g.astype(np.float64).T
        order = np.argsort(-exact, axis=1, kind="stable")
        for config in (MeshConfig(data=8), MeshConfig(data=2, fsdp=2, tensor=2)):
            mesh = make_mesh(config)
            for dtype in ("float32", "bfloat16"):
                index = GalleryIndex(g, mesh=mesh, dtype=dtype, gallery_chunk=128, query_chunk=8)
                for k in (1, 10, 100, 1000):
                    scores, indices = index.search(q, k)
                    np.testing.assert_array_equal(indices, order[:, :k])
                    np.testing.assert_array_equal(scores, np.take_along_axis(exact, order[:, :k], axis=1))
        print("ok")
    """), devices=8)
    assert out.stdout.strip().endswith("ok")


def test_a_bf16_gallery_is_multiplied_in_bf16_with_float32_accumulation():
    """What the search asks XLA for: a bf16 x bf16 dot giving float32, and no conversion of the gallery block."""
    index = GalleryIndex(np.ones((4096, 64), BF16), gallery_chunk=1024)
    queries = jax.ShapeDtypeStruct((32, 64), BF16, sharding=jax.sharding.NamedSharding(
        index.mesh, jax.sharding.PartitionSpec()))
    search = index_module._topk_fn(index.mesh, 10, index.layout.chunk, index.layout.per_device)
    text = search.lower(queries, index.array, index._rows).as_text()
    dots = re.findall(r"stablehlo\.dot_general.*?:\s*\((tensor<[^>]+>), (tensor<[^>]+>)\) -> (tensor<[^>]+>)", text)
    assert dots == [("tensor<32x64xbf16>", "tensor<1024x64xbf16>", "tensor<32x1024xf32>")]
    assert not re.search(r"stablehlo\.convert.*tensor<\d+x64xbf16>\) -> tensor<\d+x64xf32>", text)
    f32 = GalleryIndex(np.ones((4096, 64), np.float32), gallery_chunk=1024)
    text = index_module._topk_fn(f32.mesh, 10, 1024, 4096).lower(
        queries.update(dtype=np.float32), f32.array, f32._rows).as_text()
    assert "precision = [HIGHEST, HIGHEST]" in text  # float32 galleries keep every bit by default


def test_the_gallery_is_placed_once_and_searched_many_times(monkeypatch):
    calls = []
    real = index_module._place_gallery
    monkeypatch.setattr(index_module, "_place_gallery", lambda *a: calls.append(1) or real(*a))
    q, g = planted(500, 9)
    index = GalleryIndex(g, ids=[f"item{i}" for i in range(500)], gallery_chunk=128)
    first = index.search(q, 5)
    for k in (5, 50):
        scores, indices = index.search(q[::-1], k)
        np.testing.assert_array_equal(indices, stable_topk(q[::-1] @ g.T, k)[1])
    np.testing.assert_array_equal(index.search(q, 5)[1], first[1])
    assert len(calls) == 1
    assert index.ids[first[1][0, 0]] == f"item{first[1][0, 0]}"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_save_and_load_search_the_same(tmp_path, dtype):
    q, g = planted(700, 11)
    ids = np.array([f"img_{i:04d}" for i in range(700)])
    index = GalleryIndex(g, ids, dtype=dtype, gallery_chunk=256)
    folder = index.save(tmp_path / "gallery")
    assert sorted(p.name for p in folder.iterdir()) == ["embeddings.npy", "ids.npy", "index.json"]
    assert json.loads((folder / "index.json").read_text())["dtype"] == dtype
    loaded = GalleryIndex.load(folder, gallery_chunk=128)
    assert loaded.dtype == index.dtype and loaded.shape == index.shape
    np.testing.assert_array_equal(loaded.ids, ids)
    for got, want in zip(loaded.search(q, 20), index.search(q, 20), strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(loaded.embeddings(), g.astype(index.dtype))


def test_save_refuses_an_existing_folder_and_leaves_nothing_when_it_fails(tmp_path, monkeypatch):
    index = GalleryIndex(np.eye(4, dtype=np.float32), ids=["a", "b", "c", "d"])
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="taken already exists"):
        index.save(tmp_path / "taken")
    real_save = np.save
    monkeypatch.setattr(np, "save", lambda path, *a, **kw: (_ for _ in ()).throw(OSError("disk full"))
                        if str(path).endswith("ids.npy") else real_save(path, *a, **kw))
    with pytest.raises(OSError, match="disk full"):
        index.save(tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_loading_a_damaged_index_names_the_file(tmp_path):
    folder = GalleryIndex(np.eye(4, dtype=np.float32)).save(tmp_path / "gallery")
    meta = json.loads((folder / "index.json").read_text())
    (folder / "index.json").write_text(json.dumps({**meta, "rows": 5}))
    with pytest.raises(DataError, match=r"embeddings.npy holds \(4, 4\).*index.json says 5 rows"):
        GalleryIndex.load(folder)
    (folder / "embeddings.npy").unlink()
    with pytest.raises(DataError, match="not a saved gallery index: embeddings.npy is missing"):
        GalleryIndex.load(folder)


def test_bad_options_and_inputs_raise():
    g = np.eye(8, dtype=np.float32)
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16"):
        GalleryIndex(g, dtype="int8")
    with pytest.raises(ValueError, match="precision must be one of float32, tensorfloat32, bfloat16"):
        GalleryIndex(g, precision="fast")
    with pytest.raises(ValueError, match=r"ids hold \(3,\) values for a gallery of 8 rows"):
        GalleryIndex(g, ids=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"queries \(2, 4\) and gallery \(8, 8\) differ"):
        GalleryIndex(g).search(np.ones((2, 4), np.float32), 1)


def test_a_faster_float32_pass_is_an_option():
    q, g = planted(300, 7)
    rng = np.random.default_rng(3)
    q, g = q + rng.normal(0, 1e-3, q.shape).astype(np.float32), g + rng.normal(0, 1e-3, g.shape).astype(np.float32)
    exact = GalleryIndex(g).search(q, 5)
    fast = GalleryIndex(g, precision="bfloat16").search(q, 5)
    np.testing.assert_allclose(fast[0], exact[0], atol=0.05)


def test_the_default_gallery_chunk_follows_device_memory():
    mesh = default_mesh()
    assert default_gallery_chunk(mesh, 1024) == 65536  # a CPU reports no memory: 256 MiB of scores

    class Device:
        process_index = 0

        def __init__(self, limit):
            self.limit = limit

        def memory_stats(self):
            return {"bytes_limit": self.limit}

    class Mesh:
        def __init__(self, limit):
            self.devices = np.array([Device(limit)], dtype=object)

    assert default_gallery_chunk(Mesh(16 << 30), 1024) == 262144  # 1 GiB of scores on a 16 GiB device
    assert default_gallery_chunk(Mesh(141 << 30), 512) == 1 << 20  # capped
    assert default_gallery_chunk(Mesh(1 << 20), 1024) == 4096  # floored
