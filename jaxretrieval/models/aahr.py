"""AAHR (Chen et al., KBS 2025, arXiv 2507.09256): VSE-infinity's encoders (models/vse.py) plus the paper's additions.
Its code is not public; where the paper leaves a detail open the choice is ours, named here and switchable in the
`aahr` config section (systems/aahr.py):

- Global-guided aggregation: a frozen CLIP's global image / caption features (precomputed, `clip_globals`) are
  projected to the joint width and fused with the L2-normalised GPO (local) embedding by a learned per-dimension gate,
  g = sigmoid(W [local; global] + b), e = l2norm(g * local + (1 - g) * global).
- Relations: over the batch, the intra-modal (x x^T) and inter-modal (x y^T) correlation matrices pick each item's k
  nearest items of its own modality (itself left out) and k of the other (its own pair left out, so an enhanced
  embedding cannot copy its positive); a one-layer GAT (attention over those 2k neighbours) or GCN (their mean)
  through a shared linear map, added residually and L2-normalised. The enhanced embeddings train with their own
  hinge term; retrieval uses the embeddings before it, so evaluation cost stays that of VSE-infinity.
- Momentum encoders with queues (MoCo / ALBEF style): an EMA copy of every part that makes an embedding, its
  features of the batch enqueued into fixed-size image and text queues with their image ids; the online embeddings
  are contrasted (InfoNCE, same image id = positive) against the momentum batch plus the queue. The copy's batch
  norm normalises by the batch's own statistics (as MoCo's key encoder in train mode); its running statistics are the
  online encoder's (`momentum_copy` shares non-parameter state), used by neither at training time.
- Prototypes: spherical k-means over both queues, refreshed every `refresh` steps from a key of the seed and step
  (the same run always finds the same centres); each online embedding is trained to predict the prototype of its
  pair's momentum embedding (cross-entropy over prototype similarities / temperature).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxretrieval.models.momentum import momentum_copy
from jaxretrieval.models.vse import VSE, l2norm, region_inputs, torch_linear

MOMENTUM_PARTS = ("image", "text", "image_global", "text_global", "image_gate", "text_gate")


class Buffer(nnx.Variable):
    """Training state that is not a parameter: queues, their pointer, prototypes."""


class RelationGNN(nnx.Module):
    """One graph layer over the batch's intra- and inter-modal neighbourhoods (see the module docstring)."""

    def __init__(self, dim: int, kind: str, k: int, *, rngs: nnx.Rngs):
        if kind not in ("gat", "gcn"):
            raise ValueError(f"relation kind must be gat or gcn, got {kind!r}")
        self.kind, self.k = kind, k
        self.linear = torch_linear(dim, dim, rngs=rngs)
        if kind == "gat":
            self.attend_query = nnx.Param(jax.random.normal(rngs.params(), (dim,)) / jnp.sqrt(dim))
            self.attend_key = nnx.Param(jax.random.normal(rngs.params(), (dim,)) / jnp.sqrt(dim))

    def neighbours(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """(n, 2n) bool: the k most correlated others of x within x, and within y without the pair."""
        n = x.shape[0]
        k = min(self.k, n - 1)
        off_diagonal = ~jnp.eye(n, dtype=bool)
        picks = []
        for other in (x, y):
            corr = jnp.where(off_diagonal, x @ other.T, -jnp.inf)
            threshold = jax.lax.top_k(corr, k)[0][:, -1:] if k else jnp.full((n, 1), jnp.inf)
            picks.append((corr >= threshold) & off_diagonal)
        return jnp.concatenate(picks, axis=1)

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """x (n, d) the nodes of one modality, y (n, d) their pairs in the other -> enhanced x, L2-normalised."""
        mask = self.neighbours(jax.lax.stop_gradient(x), jax.lax.stop_gradient(y))
        nodes = self.linear(jnp.concatenate([x, y]))
        if self.kind == "gcn":
            weights = mask / jnp.maximum(mask.sum(axis=1, keepdims=True), 1)
        else:
            scores = jax.nn.leaky_relu((self.linear(x) @ self.attend_query[...])[:, None]
                                       + (nodes @ self.attend_key[...])[None, :], 0.2)
            weights = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=1)
            weights = jnp.where(mask.any(axis=1, keepdims=True), weights, 0.0)
        return l2norm(x + jax.nn.elu(weights @ nodes))


def kmeans(points: jax.Array, count: int, iterations: int, key: jax.Array) -> jax.Array:
    """Spherical k-means: `count` unit centres of the (m, d) points, started from distinct points drawn with `key`;
    a centre that loses every point keeps its place."""
    start = jax.random.choice(key, points.shape[0], (count,), replace=False)
    centres = l2norm(points[start])

    def step(centres: jax.Array, _: Any) -> tuple[jax.Array, None]:
        assign = jax.nn.one_hot(jnp.argmax(points @ centres.T, axis=1), count, dtype=points.dtype)
        sums = assign.T @ points
        moved = l2norm(sums)
        return jnp.where(assign.sum(axis=0)[:, None] > 0, moved, centres), None

    return jax.lax.scan(step, centres, None, length=iterations)[0]


class AAHR(VSE):
    """VSE + global gates, relation GNNs, momentum copies, queues and prototypes, each optional."""

    def __init__(self, *, region_dim: int, embed_dim: int, bert: dict[str, Any], region_mlp: bool = True,
                 global_dim: int = 0, relation: str = "gat", relation_k: int = 4, momentum: bool = True,
                 queue_size: int = 0, prototypes: int = 0, pad_id: int = 0, rngs: nnx.Rngs,
                 dtype: Any = jnp.float32):
        super().__init__(region_dim=region_dim, embed_dim=embed_dim, bert=bert, region_mlp=region_mlp, pad_id=pad_id,
                         rngs=rngs, dtype=dtype)
        def linear(d_in: int) -> nnx.Linear | None:
            return torch_linear(d_in, embed_dim, rngs=rngs) if global_dim else None

        self.image_global, self.text_global = linear(global_dim), linear(global_dim)
        self.image_gate, self.text_gate = linear(2 * embed_dim), linear(2 * embed_dim)
        related = relation != "none"
        self.image_relation = RelationGNN(embed_dim, relation, relation_k, rngs=rngs) if related else None
        self.text_relation = RelationGNN(embed_dim, relation, relation_k, rngs=rngs) if related else None
        self.momentum = nnx.Dict({part: momentum_copy(getattr(self, part)) for part in MOMENTUM_PARTS
                                  if getattr(self, part) is not None}) if momentum else None
        keys = jax.random.split(rngs.params(), 2)
        self.queues = nnx.Dict(
            image=Buffer(l2norm(jax.random.normal(keys[0], (queue_size, embed_dim)))),
            text=Buffer(l2norm(jax.random.normal(keys[1], (queue_size, embed_dim)))),
            ids=Buffer(jnp.full((queue_size,), -1, jnp.int32)),
            ptr=Buffer(jnp.zeros((), jnp.int32))) if queue_size else None
        self.prototypes = Buffer(jnp.zeros((prototypes, embed_dim), jnp.float32)) if prototypes else None

    # ---- embeddings: `parts` is the model itself or its momentum copies ------------------------------------------
    @staticmethod
    def fuse(local: jax.Array, global_: jax.Array | None, project: Any, gate: Any) -> jax.Array:
        local = l2norm(local)
        if global_ is None or project is None:
            return local
        other = l2norm(project(global_).astype(jnp.float32))
        g = jax.nn.sigmoid(gate(jnp.concatenate([local, other], axis=-1)).astype(jnp.float32))
        return l2norm(g * local + (1 - g) * other)

    def embed_image(self, parts: Any, images: Any, *, train: bool) -> jax.Array:
        regions, lengths = region_inputs(images)
        local = parts["image"](regions.astype(self.dtype), lengths, train=train).astype(jnp.float32)
        global_ = images.get("global") if isinstance(images, dict) else None
        return self.fuse(local, global_, parts.get("image_global"), parts.get("image_gate"))

    def embed_text(self, parts: Any, texts: Any) -> jax.Array:
        tokens = texts["tokens"] if isinstance(texts, dict) else texts
        local = parts["text"](tokens).astype(jnp.float32)
        global_ = texts.get("global") if isinstance(texts, dict) else None
        return self.fuse(local, global_, parts.get("text_global"), parts.get("text_gate"))

    def online_parts(self) -> dict[str, Any]:
        return {part: getattr(self, part) for part in MOMENTUM_PARTS}

    def encode_image(self, images: Any, normalize: bool = True, *, train: bool = False) -> jax.Array:
        return self.embed_image(self.online_parts(), images, train=train)

    def encode_text(self, texts: Any, normalize: bool = True) -> jax.Array:
        return self.embed_text(self.online_parts(), texts)

    def momentum_embeddings(self, images: Any, texts: Any) -> tuple[jax.Array, jax.Array]:
        """The momentum copies' (image, text) embeddings of a batch, without gradient (batch norms on the batch's
        statistics, their running values left alone)."""
        parts = {part: getattr(self.momentum, part, None) for part in MOMENTUM_PARTS}
        out = self.embed_image(parts, images, train=True), self.embed_text(parts, texts)
        return jax.tree.map(jax.lax.stop_gradient, out)


def enqueue(queues: dict, image: jax.Array, text: jax.Array, ids: jax.Array) -> dict:
    """The queues (pure dict: image, text, ids, ptr) with a batch written at the pointer, which advances by the batch
    and wraps (the queue size is a multiple of the batch)."""
    ptr = queues["ptr"]
    write = lambda q, rows: jax.lax.dynamic_update_slice_in_dim(q, rows.astype(q.dtype), ptr, axis=0)  # noqa: E731
    return {"image": write(queues["image"], image), "text": write(queues["text"], text),
            "ids": write(queues["ids"], ids), "ptr": (ptr + image.shape[0]) % queues["image"].shape[0]}


__all__ = ["AAHR", "Buffer", "MOMENTUM_PARTS", "RelationGNN", "enqueue", "kmeans"]
