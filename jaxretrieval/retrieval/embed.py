"""Embedding a whole split with a jitted encoder, batches split over the mesh's batch axes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxretrieval.sharding import batch_sharding, replicated_host_array


def embed_all(encode: Callable[[jax.Array], Any], inputs: np.ndarray, batch_size: int, mesh: Mesh) -> Any:
    """Runs `encode` over `inputs` in batches; the last batch is padded to the batch size, then trimmed.

    `inputs` is held in full by every process (each places its own shards), so this is correct on many
    hosts, and the outputs come back gathered to every host: an array, or the pytree of arrays `encode` returns.
    """
    devices = mesh.devices.size
    batch_size = max(devices, batch_size - batch_size % devices)
    sharding = batch_sharding(mesh)
    outputs = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start:start + batch_size]  # an array, or a dict of arrays (precomp_pipeline.Rows)
        rows = len(jax.tree.leaves(chunk)[0])
        if rows < batch_size:
            chunk = jax.tree.map(lambda c, r=rows: np.concatenate([c, np.repeat(c[-1:], batch_size - r, axis=0)]),
                                 chunk)
        result = encode(jax.tree.map(lambda c: replicated_host_array(np.asarray(c), sharding), chunk))
        gathered = multihost_utils.process_allgather(result, tiled=True)
        outputs.append(jax.tree.map(lambda r, n=rows: np.asarray(r)[:n], gathered))
    return jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)


def text_image_scores(text_emb: np.ndarray, image_emb: np.ndarray) -> np.ndarray:
    """(texts, images) scores: dot products of single-vector embeddings, or for multi-vector images (images, vectors,
    d) (BLIP-2's query tokens) each image's best vector (the max over its vectors)."""
    if image_emb.ndim == 3:
        return np.einsum("td,iqd->tiq", text_emb, image_emb).max(axis=-1)
    return text_emb @ image_emb.T
