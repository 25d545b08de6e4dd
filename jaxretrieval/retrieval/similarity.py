"""Exact dot-product top-k retrieval over a gallery sharded across the mesh, in bounded memory.

Design: the gallery is split into contiguous blocks of rows, one block per device (over every mesh axis), and
each chunk of queries is replicated. Every device scans its own block in chunks of `gallery_chunk` rows,
keeping a running top-k per query, then the devices' top-k lists are all-gathered and merged. The other
layout, queries split over the batch axes, would need the whole gallery on every device; this one stores
G / devices gallery rows per device, does no redundant work, and exchanges only (query_chunk, k) candidates.
Memory per device is the gallery block plus O(query_chunk x gallery_chunk) scores, never queries x gallery.

Exact means exact on the float32 scores: the result is what a stable argsort of -score over the full
matrix would give. Ties: equal scores rank the lower gallery index first. `jax.lax.top_k` is documented to
put the lower of two equal elements' positions first, so every merge concatenates candidates in gallery-index
order (the running top-k, which only holds earlier rows, before the current chunk; device blocks in mesh
order), and position order among equal scores is then index order.

The gallery is padded to devices x (a multiple of the chunk); padded rows score -inf and, as they sit after
every real row, lose every tie too, so they never enter the top k when k <= gallery size. Similarity is the
plain dot product in float32 (embeddings are expected to be L2-normalised already; nothing is normalised
here); bf16 / fp16 inputs are kept in their dtype on device and cast per chunk.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxretrieval.sharding import replicated_host_array

ArrayLike = np.ndarray | jax.Array
_CHECK_ROWS = 1 << 14  # rows per slice when scanning inputs for NaN / inf, to bound host memory
_TILE = 128  # gallery chunks are rounded to this many rows, the tile width of _chunk_topk


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


def _check_inputs(queries: ArrayLike, gallery: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    queries, gallery = _as_host("queries", queries), _as_host("gallery", gallery)
    if queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"queries {queries.shape} and gallery {gallery.shape} differ in embedding dim")
    if gallery.shape[0] == 0 or gallery.shape[1] == 0:
        raise ValueError(f"gallery of shape {gallery.shape} is empty")
    return queries, gallery


def _positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _device_dtype(dtype: np.dtype) -> Any:
    """Half-precision inputs stay half on device (half the memory); anything else is stored as float32."""
    return dtype if np.dtype(dtype).itemsize == 2 else np.float32


def _default_mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()[:1]), ("data",))


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


def _place_gallery(gallery: np.ndarray, layout: _Layout) -> jax.Array:
    """The gallery as a global (padded, dim) array; each shard is built (and zero-padded) on its own."""
    dtype = _device_dtype(gallery.dtype)
    rows, dim = gallery.shape

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        start, stop, _ = index[0].indices(layout.padded)
        real = gallery[start:min(stop, rows)]
        if len(real) == stop - start and real.dtype == dtype:
            return real
        block = np.empty((stop - start, dim), dtype)
        block[:len(real)] = real
        block[len(real):] = 0
        return block

    return jax.make_array_from_callback((layout.padded, dim), layout.sharding, shard)


def _scores(queries: jax.Array, block: jax.Array) -> jax.Array:
    return jnp.dot(queries.astype(jnp.float32), block.astype(jnp.float32).T,
                   precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


def _merge(scores: jax.Array, indices: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Top k of candidates laid out in gallery-index order along the last axis (see the module docstring)."""
    top, position = jax.lax.top_k(scores, k)
    return top, jnp.take_along_axis(indices, position, axis=-1)


def _chunk_topk(scores: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """`jax.lax.top_k` over the last axis, same result (ties included), cheaper on wide rows.

    Each row is cut into tiles of _TILE scores; only the k tiles with the highest maxima (lower tile first
    among equal maxima) can hold the top k, so one top-k over the tile maxima and one over k tiles,
    concatenated in tile order, replace a top-k over the whole row.
    """
    rows, width = scores.shape
    tiles = width // _TILE
    if width % _TILE or tiles <= k:
        return jax.lax.top_k(scores, k)
    scores = scores.reshape(rows, tiles, _TILE)
    _, best = jax.lax.top_k(scores.max(axis=2), k)
    best = jnp.sort(best, axis=1)
    candidates = jnp.take_along_axis(scores, best[:, :, None], axis=1).reshape(rows, k * _TILE)
    top, position = jax.lax.top_k(candidates, k)
    return top, jnp.take_along_axis(best, position // _TILE, axis=1) * _TILE + position % _TILE


@functools.lru_cache(maxsize=32)
def _topk_fn(mesh: Mesh, k: int, chunk: int, per_device: int) -> Any:
    """jit(queries (Qc, D) replicated, gallery (padded, D) sharded, rows () int32) -> top-k, replicated."""
    axes = tuple(mesh.axis_names)
    steps = per_device // chunk
    chunk_k = min(k, chunk)

    def local(queries: jax.Array, block: jax.Array, rows: jax.Array) -> tuple[jax.Array, jax.Array]:
        offset = jax.lax.axis_index(axes) * per_device

        def step(i: jax.Array, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
            part = jax.lax.dynamic_slice_in_dim(block, i * chunk, chunk)
            index = offset + i * chunk + jnp.arange(chunk, dtype=jnp.int32)
            scores = jnp.where(index < rows, _scores(queries, part), -jnp.inf)
            top, position = _chunk_topk(scores, chunk_k)
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


def _query_chunks(queries: np.ndarray, query_chunk: int, mesh: Mesh) -> Iterator[tuple[int, int, jax.Array]]:
    """(start, rows, device chunk): fixed-size replicated chunks, the last one zero-padded."""
    size = min(query_chunk, max(len(queries), 1))
    sharding = NamedSharding(mesh, PartitionSpec())
    dtype = _device_dtype(queries.dtype)
    for start in range(0, len(queries), size):
        host = np.zeros((size, queries.shape[1]), dtype)
        real = queries[start:start + size]
        host[:len(real)] = real
        yield start, len(real), replicated_host_array(host, sharding)


def topk_similarity(queries: ArrayLike, gallery: ArrayLike, k: int, *, mesh: Mesh | None = None,
                    query_chunk: int = 1024, gallery_chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k gallery items per query by dot product: (scores (Q, k) float32 descending, indices (Q, k) int32).

    Equal scores rank the lower gallery index first. Inputs are host data every process holds in full (a
    jax.Array is fetched to the host first). `mesh` defaults to one device; with a mesh, the gallery is split
    over all its axes. Device memory per step is about query_chunk x gallery_chunk float32 scores.
    """
    k = _positive("k", k)
    query_chunk, gallery_chunk = _positive("query_chunk", query_chunk), _positive("gallery_chunk", gallery_chunk)
    queries, gallery = _check_inputs(queries, gallery)
    if k > len(gallery):
        raise ValueError(f"k={k} exceeds the gallery size: gallery has shape {gallery.shape}")
    mesh = mesh if mesh is not None else _default_mesh()
    layout = _Layout(mesh, len(gallery), gallery_chunk)
    search = _topk_fn(mesh, k, layout.chunk, layout.per_device)
    device_gallery = _place_gallery(gallery, layout)
    rows = replicated_host_array(np.asarray(len(gallery), np.int32), NamedSharding(mesh, PartitionSpec()))

    scores = np.empty((len(queries), k), np.float32)
    indices = np.empty((len(queries), k), np.int32)
    pending: list[tuple[int, int, tuple[jax.Array, jax.Array]]] = []
    for start, count, chunk in _query_chunks(queries, query_chunk, mesh):
        pending.append((start, count, search(chunk, device_gallery, rows)))  # dispatch the next before waiting
        if len(pending) == 2:
            _collect(pending.pop(0), scores, indices)
    for item in pending:
        _collect(item, scores, indices)
    if not np.isfinite(scores).all():
        raise ValueError(f"dot products of queries {queries.shape} and gallery {gallery.shape} overflowed "
                         "float32; embeddings are expected to be L2-normalised")
    return scores, indices


def _collect(item: tuple[int, int, tuple[jax.Array, jax.Array]], scores: np.ndarray, indices: np.ndarray) -> None:
    start, count, (top, index) = item
    scores[start:start + count] = np.asarray(top)[:count]
    indices[start:start + count] = np.asarray(index)[:count]


@functools.lru_cache(maxsize=8)
def _similarity_fn(mesh: Mesh) -> Any:
    """jit(queries (Qc, D) replicated, gallery (padded, D) sharded) -> (Qc, padded) split over the gallery."""
    axes = tuple(mesh.axis_names)
    return jax.jit(_scores, out_shardings=NamedSharding(mesh, PartitionSpec(None, axes)))


def write_similarity(queries: ArrayLike, gallery: ArrayLike, path: str | Path, *, mesh: Mesh | None = None,
                     query_chunk: int = 1024) -> Path:
    """Writes the full (Q, G) float32 dot-product matrix to `path` as a .npy file, one query chunk at a time.

    For protocols that need every score. The host holds at most one query_chunk x G block (plus the open
    memory map); each device holds its share of the gallery and query_chunk x G / devices scores. On many
    processes every one computes, and process 0 writes the file.
    """
    query_chunk = _positive("query_chunk", query_chunk)
    queries, gallery = _check_inputs(queries, gallery)
    mesh = mesh if mesh is not None else _default_mesh()
    layout = _Layout(mesh, len(gallery), gallery_chunk=math.ceil(len(gallery) / mesh.devices.size))
    device_gallery = _place_gallery(gallery, layout)
    similarity = _similarity_fn(mesh)
    path = Path(path)
    writer = jax.process_index() == 0
    out = (np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(len(queries), len(gallery)))
           if writer else None)
    for start, count, chunk in _query_chunks(queries, query_chunk, mesh):
        block = multihost_utils.process_allgather(similarity(chunk, device_gallery), tiled=True)
        if out is not None:
            out[start:start + count] = np.asarray(block)[:count, :len(gallery)]
    if out is not None:
        out.flush()
        del out
    return path
