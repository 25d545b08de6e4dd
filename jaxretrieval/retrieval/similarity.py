"""Exact dot-product top-k and the full score matrix for one-off calls: a `GalleryIndex` built for the call (see
`jaxretrieval.retrieval.index` for the layout, the arithmetic and what exact means). Build the index yourself to
search one gallery many times."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from jax.sharding import Mesh

from jaxretrieval.retrieval.index import ArrayLike, GalleryIndex, positive

__all__ = ["topk_similarity", "write_similarity"]


def topk_similarity(queries: ArrayLike, gallery: ArrayLike, k: int, *, mesh: Mesh | None = None,
                    query_chunk: int = 1024, gallery_chunk: int | None = None,
                    precision: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k gallery items per query by dot product: (scores (Q, k) float32 descending, indices (Q, k) int32).

    Equal scores rank the lower gallery index first. Inputs are host data every process holds in full (a jax.Array
    is fetched to the host first); half-precision galleries are multiplied in their dtype with float32
    accumulation. `mesh` defaults to one device; with a mesh, the gallery is split over all its axes. Device memory
    per step is about query_chunk x gallery_chunk float32 scores (by default sized from the device's memory)."""
    positive("k", k)
    index = GalleryIndex(gallery, mesh=mesh, precision=precision, gallery_chunk=gallery_chunk,
                         query_chunk=query_chunk)
    return index.search(queries, k)


def write_similarity(queries: ArrayLike, gallery: ArrayLike, path: str | Path, *, mesh: Mesh | None = None,
                     query_chunk: int = 1024, precision: str = "float32") -> Path:
    """Writes the full (Q, G) float32 dot-product matrix to `path` as a .npy file, one query chunk at a time (for
    protocols that need every score); the host holds at most one query_chunk x G block."""
    positive("query_chunk", query_chunk)
    gallery_rows = np.shape(gallery)[0] if np.ndim(gallery) == 2 else 1
    devices = 1 if mesh is None else mesh.devices.size
    index = GalleryIndex(gallery, mesh=mesh, precision=precision, query_chunk=query_chunk,
                         gallery_chunk=max(1, -(-gallery_rows // devices)))
    return index.write_similarity(queries, path)
