"""A gallery of embeddings resident on the devices of a mesh, searched exactly by dot product, in bounded memory.

Layout: the gallery is split into contiguous blocks of rows, one block per device (over every mesh axis); each chunk
of queries is replicated. Every device scans its block `gallery_chunk` rows at a time keeping a running top-k per
query, then the devices' top-k lists are all-gathered and merged. Each device stores G / devices rows, does no
redundant work and exchanges only (query_chunk, k) candidates; memory is the block plus O(query_chunk x
gallery_chunk) scores, never queries x gallery.

Scores: half-precision galleries (bf16, fp16) are multiplied in their own dtype with float32 accumulation (tensor
cores); float32 galleries in full float32 unless `precision` asks for a faster pass ("tensorfloat32", "bfloat16").
Queries are cast to the gallery's dtype. Exact means exact on the scores so computed: the top k equal a stable
argsort of -score over the whole matrix of them, equal scores ranking the lower gallery index first. `lax.top_k`
puts the lower of two equal positions first, and every merge concatenates candidates in gallery-index order (the
running top-k, which holds only earlier rows, before the current chunk; device blocks in mesh order).

The gallery is padded to devices x (a multiple of the chunk); padded rows score -inf and sit after every real row,
so they lose every tie and never enter the top k when k <= gallery size. Nothing is normalised here: embeddings are
expected to be L2-normalised already.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxretrieval.errors import DataError
from jaxretrieval.sharding import replicated_host_array

ArrayLike = np.ndarray | jax.Array
_CHECK_ROWS = 1 << 14  # rows per slice when scanning inputs for NaN / inf, to bound host memory
_TILE = 128  # gallery chunks are rounded to this many rows, the widest tile of _chunk_topk
PRECISIONS = ("float32", "tensorfloat32", "bfloat16")  # passes of a float32 product (jax.lax.Precision names)
STORAGE = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}
_SCORE_BUDGET = 1 << 28  # bytes of float32 scores per step where the device does not report its memory (CPU)
INDEX_FORMAT = 1


def _as_host(name: str, array: ArrayLike) -> np.ndarray:
    host = np.asarray(array)
    if host.ndim != 2:
        raise ValueError(f"{name} must be (rows, dim), got shape {host.shape}")
    if not jnp.issubdtype(host.dtype, jnp.floating):
        raise ValueError(f"{name} must hold floating-point embeddings, got dtype {host.dtype} "
                         f"with shape {host.shape}")
    for start in range(0, len(host), _CHECK_ROWS):
        if not np.isfinite(host[start:start + _CHECK_ROWS]).all():
            raise ValueError(f"{name} of shape {host.shape} holds NaN or inf values")
    return host


def positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def default_mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()[:1]), ("data",))


def default_gallery_chunk(mesh: Mesh, query_chunk: int) -> int:
    """Gallery rows per scan step: a query chunk's float32 scores against them take about 1/16 of a device's memory
    (256 MiB where the device does not report it, as on CPU), in whole tiles, between 4,096 and 1,048,576 rows; on
    many processes, process 0's figure (each asks its own device)."""
    local = next(d for d in mesh.devices.flat if d.process_index == jax.process_index())  # others' are not ours to ask
    stats = local.memory_stats() or {}
    budget = stats.get("bytes_limit", 16 * _SCORE_BUDGET) // 16
    rows = int(min(max(budget // (query_chunk * 4) // _TILE * _TILE, 4096), 1 << 20))
    if jax.process_count() > 1:  # every process must compile the same program: process 0's choice holds
        rows = int(multihost_utils.broadcast_one_to_all(np.asarray(rows, np.int32)))
    return rows


class _Layout:
    """How the gallery rows are split: `per_device` rows per device, scanned `chunk` rows at a time."""

    def __init__(self, mesh: Mesh, rows: int, gallery_chunk: int) -> None:
        self.axes = tuple(mesh.axis_names)
        self.devices = mesh.devices.size
        per_device = math.ceil(rows / self.devices)
        steps = math.ceil(per_device / gallery_chunk)
        # Equal steps just large enough (in whole tiles) waste far less on padding than full chunks.
        align = _TILE if gallery_chunk >= _TILE else 1
        self.chunk = min(gallery_chunk, math.ceil(per_device / steps / align) * align)
        self.per_device = math.ceil(per_device / self.chunk) * self.chunk
        self.padded = self.devices * self.per_device
        self.sharding = NamedSharding(mesh, PartitionSpec(self.axes))


def _place_gallery(gallery: np.ndarray, layout: _Layout, dtype: np.dtype) -> jax.Array:
    """The gallery as a global (padded, dim) array of `dtype`; each shard is built (and zero-padded) on its own."""
    rows, dim = gallery.shape

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        start, stop, _ = index[0].indices(layout.padded)
        real = gallery[start:min(stop, rows)]
        if len(real) == stop - start and real.dtype == dtype:
            return real
        block = np.zeros((stop - start, dim), dtype)
        block[:len(real)] = real
        return block

    return jax.make_array_from_callback((layout.padded, dim), layout.sharding, shard)


def scores(queries: jax.Array, block: jax.Array, precision: str = "float32") -> jax.Array:
    """(queries, rows) float32 dot products as the index computes them: queries cast to the block's dtype, a half
    block multiplied in half precision with float32 accumulation, a float32 one at `precision`."""
    queries = queries.astype(block.dtype)
    pass_ = None if block.dtype != jnp.float32 else jax.lax.Precision(precision)
    return jax.lax.dot_general(queries, block, (((1,), (1,)), ((), ())), precision=pass_,
                               preferred_element_type=jnp.float32)


def _merge(values: jax.Array, indices: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Top k of candidates laid out in gallery-index order along the last axis (see the module docstring)."""
    top, position = jax.lax.top_k(values, k)
    return top, jnp.take_along_axis(indices, position, axis=-1)


def _tile_for(width: int, k: int) -> int:
    """The widest tile (a power of two from _TILE down to 32, dividing the row) leaving at least 4k tiles; 0: none
    does, and one top-k over the row is cheaper (on CPU, k = 1000 over 50,048 scores: 1.2 s whole, 2.0 s in tiles
    of 8)."""
    tile = _TILE
    while tile >= 32 and (width % tile or width // tile < 4 * k):
        tile //= 2
    return tile if tile >= 32 else 0


def _chunk_topk(values: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """`jax.lax.top_k` over the last axis, same result (ties included), cheaper on wide rows.

    Each row is cut into tiles; only the k tiles with the highest maxima (lower tile first among equal maxima) can
    hold the top k, so one top-k over the tile maxima and one over k tiles, concatenated in tile order, replace a
    top-k over the whole row. Tiles shrink as k grows, so that the tiles kept stay a small part of the row.
    """
    rows, width = values.shape
    tile = _tile_for(width, k)
    if not tile:
        return jax.lax.top_k(values, k)
    values = values.reshape(rows, width // tile, tile)
    _, best = jax.lax.top_k(values.max(axis=2), k)
    best = jnp.sort(best, axis=1)
    candidates = jnp.take_along_axis(values, best[:, :, None], axis=1).reshape(rows, k * tile)
    top, position = jax.lax.top_k(candidates, k)
    return top, jnp.take_along_axis(best, position // tile, axis=1) * tile + position % tile


@functools.lru_cache(maxsize=32)
def _topk_fn(mesh: Mesh, k: int, chunk: int, per_device: int, precision: str = "float32") -> Any:
    """jit(queries (Qc, D) replicated, gallery (padded, D) sharded, rows () int32) -> top-k, replicated."""
    axes = tuple(mesh.axis_names)
    steps = per_device // chunk
    chunk_k = min(k, chunk)

    def local(queries: jax.Array, block: jax.Array, rows: jax.Array) -> tuple[jax.Array, jax.Array]:
        offset = jax.lax.axis_index(axes) * per_device

        def step(i: jax.Array, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
            part = jax.lax.dynamic_slice_in_dim(block, i * chunk, chunk)
            index = offset + i * chunk + jnp.arange(chunk, dtype=jnp.int32)
            values = jnp.where(index < rows, scores(queries, part, precision), -jnp.inf)
            top, position = _chunk_topk(values, chunk_k)
            merged = (jnp.concatenate([carry[0], top], axis=1),
                      jnp.concatenate([carry[1], index[position]], axis=1))
            return _merge(*merged, k)

        start = (jnp.full((queries.shape[0], k), -jnp.inf, jnp.float32),
                 jnp.full((queries.shape[0], k), jnp.iinfo(jnp.int32).max, jnp.int32))
        top, index = jax.lax.fori_loop(0, steps, step, start)
        gathered = [jax.lax.all_gather(x, axes, axis=1, tiled=True) for x in (top, index)]
        return _merge(*gathered, k)

    replicated = PartitionSpec()
    mapped = jax.shard_map(local, mesh=mesh, in_specs=(replicated, PartitionSpec(axes), replicated),
                           out_specs=(replicated, replicated), check_vma=False)
    return jax.jit(mapped)


@functools.lru_cache(maxsize=8)
def _similarity_fn(mesh: Mesh, precision: str = "float32") -> Any:
    """jit(queries (Qc, D) replicated, gallery (padded, D) sharded) -> (Qc, padded) split over the gallery."""
    axes = tuple(mesh.axis_names)
    return jax.jit(functools.partial(scores, precision=precision),
                   out_shardings=NamedSharding(mesh, PartitionSpec(None, axes)))


def _query_chunks(queries: np.ndarray, query_chunk: int, mesh: Mesh) -> Iterator[tuple[int, int, jax.Array]]:
    """(start, rows, device chunk): fixed-size replicated chunks, the last one zero-padded."""
    size = min(query_chunk, max(len(queries), 1))
    sharding = NamedSharding(mesh, PartitionSpec())
    for start in range(0, len(queries), size):
        host = np.zeros((size, queries.shape[1]), queries.dtype)
        real = queries[start:start + size]
        host[:len(real)] = real
        yield start, len(real), replicated_host_array(host, sharding)


class GalleryIndex:
    """A gallery placed once on the devices of `mesh` (one device by default), split by rows over all its axes, then
    searched any number of times with no copy of the gallery; `save` / `load` keep it for later searches.

    `dtype`: how the gallery is stored and multiplied (float32, bfloat16 or float16; default: half inputs stay
    half, anything else float32). `precision`: the passes of a float32 product (float32, the default and exact;
    tensorfloat32 or bfloat16, faster on GPUs and TPUs). `ids`: one id per row, kept with the index.
    """

    def __init__(self, embeddings: ArrayLike, ids: Sequence[Any] | np.ndarray | None = None, *,
                 mesh: Mesh | None = None, dtype: str | None = None, precision: str = "float32",
                 gallery_chunk: int | None = None, query_chunk: int = 1024) -> None:
        gallery = _as_host("gallery", embeddings)
        if gallery.shape[0] == 0 or gallery.shape[1] == 0:
            raise ValueError(f"gallery of shape {gallery.shape} is empty")
        if dtype is not None and dtype not in STORAGE:
            raise ValueError(f"dtype must be one of {', '.join(STORAGE)}, got {dtype!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.dtype = STORAGE[dtype] if dtype else (gallery.dtype if gallery.dtype.itemsize == 2 else
                                                  STORAGE["float32"])
        self.precision = precision
        self.ids = None if ids is None else np.asarray(ids)
        if self.ids is not None and self.ids.shape != (len(gallery),):
            raise ValueError(f"ids hold {self.ids.shape} values for a gallery of {len(gallery)} rows")
        self.mesh = mesh if mesh is not None else default_mesh()
        self.query_chunk = positive("query_chunk", query_chunk)
        chunk = default_gallery_chunk(self.mesh, self.query_chunk) if gallery_chunk is None else gallery_chunk
        self.layout = _Layout(self.mesh, len(gallery), positive("gallery_chunk", chunk))
        self.shape = gallery.shape
        self.array = _place_gallery(gallery, self.layout, self.dtype)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self._rows = replicated_host_array(np.asarray(len(gallery), np.int32), replicated)

    def __len__(self) -> int:
        return self.shape[0]

    def _queries(self, queries: ArrayLike) -> np.ndarray:
        queries = _as_host("queries", queries)
        if queries.shape[1] != self.shape[1]:
            raise ValueError(f"queries {queries.shape} and gallery {self.shape} differ in embedding dim")
        return queries.astype(self.dtype, copy=False)

    def search(self, queries: ArrayLike, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k gallery rows per query: (scores (Q, k) float32 descending, indices (Q, k) int32). The next
        query chunk is copied and dispatched while the device works on the current one; only (chunk, k) results
        come back."""
        k = positive("k", k)
        if k > len(self):
            raise ValueError(f"k={k} exceeds the gallery size: gallery has shape {self.shape}")
        queries = self._queries(queries)
        search = _topk_fn(self.mesh, k, self.layout.chunk, self.layout.per_device, self.precision)
        top_scores = np.empty((len(queries), k), np.float32)
        top_indices = np.empty((len(queries), k), np.int32)
        pending: list[tuple[int, int, tuple[jax.Array, jax.Array]]] = []
        for start, count, chunk in _query_chunks(queries, self.query_chunk, self.mesh):
            pending.append((start, count, search(chunk, self.array, self._rows)))
            if len(pending) == 2:
                _collect(pending.pop(0), top_scores, top_indices)
        for item in pending:
            _collect(item, top_scores, top_indices)
        if not np.isfinite(top_scores).all():
            raise ValueError(f"dot products of queries {queries.shape} and gallery {self.shape} overflowed "
                             "float32; embeddings are expected to be L2-normalised")
        return top_scores, top_indices

    def write_similarity(self, queries: ArrayLike, path: str | Path) -> Path:
        """Writes the whole (Q, G) float32 score matrix to `path` (.npy), one query chunk at a time: the host holds at
        most one query_chunk x G block; on many processes every one computes and process 0 writes."""
        queries = self._queries(queries)
        similarity = _similarity_fn(self.mesh, self.precision)
        path = Path(path)
        writer = jax.process_index() == 0
        out = (np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(len(queries), len(self)))
               if writer else None)
        for start, count, chunk in _query_chunks(queries, self.query_chunk, self.mesh):
            block = multihost_utils.process_allgather(similarity(chunk, self.array), tiled=True)
            if out is not None:
                out[start:start + count] = np.asarray(block)[:count, :len(self)]
        if out is not None:
            out.flush()
            del out
        return path

    def embeddings(self) -> np.ndarray:
        """The stored gallery rows, on the host, in the stored dtype."""
        return np.asarray(multihost_utils.process_allgather(self.array, tiled=True))[:len(self)]

    def save(self, folder: str | Path) -> Path:
        """Writes the index to a new folder: embeddings.npy (bf16 stored as its uint16 bits), ids.npy if any, and
        index.json. Written beside it first and renamed into place, so a failed save leaves nothing."""
        folder = Path(folder)
        if folder.exists():
            raise FileExistsError(f"index folder {folder} already exists; choose a new one")
        folder.parent.mkdir(parents=True, exist_ok=True)
        rows = self.embeddings()
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            bits = rows.view(np.uint16) if self.dtype == STORAGE["bfloat16"] else rows
            np.save(staging / "embeddings.npy", bits, allow_pickle=False)
            if self.ids is not None:
                np.save(staging / "ids.npy", self.ids, allow_pickle=False)
            meta = {"format": INDEX_FORMAT, "rows": self.shape[0], "dim": self.shape[1],
                    "dtype": next(name for name, d in STORAGE.items() if d == self.dtype),
                    "precision": self.precision, "ids": self.ids is not None}
            (staging / "index.json").write_text(json.dumps(meta, indent=2) + "\n")
            os.replace(staging, folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return folder

    @classmethod
    def load(cls, folder: str | Path, *, mesh: Mesh | None = None, **options: Any) -> GalleryIndex:
        """An index `save` wrote, or the image embeddings of a `python -m jaxretrieval.embed` export (clip-retrieval's
        layout), placed on `mesh`; options as for the constructor (gallery_chunk, query_chunk)."""
        folder = Path(folder)
        if (folder / "img_emb").is_dir() and not (folder / "index.json").exists():
            from jaxretrieval.export import index_from_export

            return index_from_export(folder, "image", mesh=mesh, **options)
        meta_path = folder / "index.json"
        try:
            meta = json.loads(meta_path.read_text())
            dtype = STORAGE[meta["dtype"]]
            rows = np.load(folder / "embeddings.npy", allow_pickle=False, mmap_mode="r")
            ids = np.load(folder / "ids.npy", allow_pickle=False) if meta["ids"] else None
        except FileNotFoundError as e:
            raise DataError(f"{folder} is not a saved gallery index: {Path(e.filename).name} is missing") from e
        except (KeyError, ValueError) as e:
            raise DataError(f"{meta_path}: unreadable gallery index ({type(e).__name__}: {e})") from e
        if dtype == STORAGE["bfloat16"]:
            rows = rows.view(dtype)
        if rows.shape != (meta["rows"], meta["dim"]) or (ids is not None and ids.shape != (meta["rows"],)):
            raise DataError(f"{folder}: embeddings.npy holds {rows.shape} (ids {None if ids is None else ids.shape}) "
                            f"where index.json says {meta['rows']} rows of {meta['dim']}")
        options.setdefault("precision", meta.get("precision", "float32"))
        return cls(rows, ids, mesh=mesh, dtype=meta["dtype"], **options)


def _collect(item: tuple[int, int, tuple[jax.Array, jax.Array]], top_scores: np.ndarray,
             top_indices: np.ndarray) -> None:
    start, count, (top, index) = item
    top_scores[start:start + count] = np.asarray(top)[:count]
    top_indices[start:start + count] = np.asarray(index)[:count]
