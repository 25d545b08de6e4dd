"""VSE-infinity (Chen et al., CVPR 2021; woodfrog/vse_infty, lib/encoders.py, lib/modules/mlp.py; read for facts): a
region-feature image encoder and a BERT text encoder, each pooled by GPO into one joint-space vector.

- Image (`EncoderImageAggr`, precomp_enc_type "basic"): BUTD region features (B, K, 2048) -> fc (Xavier-uniform, zero
  bias) to the embedding width E, plus an MLP residual (Linear(2048, E/2), BatchNorm1d, ReLU, Linear(E/2, E)) over
  the B x K rows, then GPO over the regions and L2 normalisation. In training the data drops 20% of the regions per
  image (`data.precomp_encode`) and torch's batch is cut to its longest member, so its batch norm sees B x max(len)
  rows, zero padding included: ours keeps K rows and takes the statistics over the same B x max(len) rows.
- Text (`EncoderText`): BERT's last hidden states (attention mask: id != 0) -> Linear(width, E) -> GPO over the
  caption's tokens ([CLS] and [SEP] included) -> L2 normalisation. No MLP on this side.
- l2norm divides by (norm + 1e-8), as the original's.

- Raw images (the original's "backbone" option): a ResNet's last feature map is the set (see `VSE`), grids dropped
  at random in training as EncoderImageFull does (`drop_grids`).

`encode_image` takes the region array (every region valid, as at evaluation) or a dict {"regions", "lengths"}, or
pixels with a backbone;
`encode_text` the token ids. `updates` counts the train steps taken (the hinge loss turns to the hardest negative
after its warm-up, `systems.vse`); it is state, checkpointed with the parameters.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxretrieval.models.bert import Bert
from jaxretrieval.models.gpo import GPO
from jaxretrieval.models.resnet import BatchNorm, ResNet

EPS = 1e-8


class Counter(nnx.Variable):
    """An integer the train step advances: state, not trained."""


def l2norm(x: jax.Array, eps: float = EPS) -> jax.Array:
    """x / (||x|| + eps) along the last axis (vse_infty's l2norm)."""
    return x / (jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True)) + eps)


def torch_linear(d_in: int, d_out: int, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
                 xavier: bool = False) -> nnx.Linear:
    """nn.Linear with torch's default init (weight and bias uniform on +-1/sqrt(d_in)), or Xavier-uniform weights
    and a zero bias (vse_infty's fc)."""
    bound = math.sqrt(6.0 / (d_in + d_out)) if xavier else 1.0 / math.sqrt(d_in)

    def uniform(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return nnx.Linear(d_in, d_out, kernel_init=uniform, bias_init=nnx.initializers.zeros_init() if xavier else uniform,
                      param_dtype=jnp.float32, dtype=dtype, rngs=rngs)


def valid_rows(lengths: jax.Array, size: int) -> jax.Array:
    """(B, size) bool: position < length."""
    return jnp.arange(size)[None, :] < lengths[:, None]


class RegionMLP(nnx.Module):
    """vse_infty's MLP(d_in, E // 2, E, 2) over the rows of a (B, K, d_in) array."""

    def __init__(self, d_in: int, hidden: int, d_out: int, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.layers_0 = torch_linear(d_in, hidden, rngs=rngs, dtype=dtype)
        self.bn_0 = BatchNorm(hidden)
        self.layers_1 = torch_linear(hidden, d_out, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, *, train: bool, rows: jax.Array | None = None) -> jax.Array:
        return self.layers_1(jax.nn.relu(self.bn_0(self.layers_0(x), train=train, rows=rows)))


class RegionEncoder(nnx.Module):
    """Region features -> fc + MLP residual -> GPO (unnormalised); `regions` gives the per-region embeddings."""

    def __init__(self, region_dim: int, embed_dim: int, *, mlp: bool = True, rngs: nnx.Rngs,
                 dtype: Any = jnp.float32):
        self.fc = torch_linear(region_dim, embed_dim, rngs=rngs, dtype=dtype, xavier=True)
        self.mlp = RegionMLP(region_dim, embed_dim // 2, embed_dim, rngs=rngs, dtype=dtype) if mlp else None
        self.gpo = GPO(32, 32, rngs=rngs)

    def regions(self, features: jax.Array, lengths: jax.Array, *, train: bool) -> jax.Array:
        """(B, K, E): fc(x) + mlp(x) per region. In train mode the batch norm's statistics come from the positions
        below the batch's longest length."""
        out = self.fc(features)
        if self.mlp is not None:
            rows = valid_rows(jnp.full_like(lengths, jnp.max(lengths)), features.shape[1]) if train else None
            out = self.mlp(features, train=train, rows=rows) + out
        return out

    def __call__(self, features: jax.Array, lengths: jax.Array, *, train: bool = False) -> jax.Array:
        return self.gpo(self.regions(features, lengths, train=train), lengths)[0]


class TextEncoder(nnx.Module):
    """BERT -> Linear -> GPO over the caption's tokens (unnormalised)."""

    def __init__(self, bert: dict[str, Any], embed_dim: int, *, pad_id: int = 0, rngs: nnx.Rngs,
                 dtype: Any = jnp.float32):
        self.pad_id = pad_id
        self.bert = Bert(**bert, pooler=False, rngs=rngs, dtype=dtype)
        self.linear = torch_linear(bert["width"], embed_dim, rngs=rngs, dtype=dtype)
        self.gpo = GPO(32, 32, rngs=rngs)

    def tokens(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """((B, L, E) per-token embeddings, (B,) lengths: the non-padding tokens)."""
        keep = tokens != self.pad_id
        hidden = self.bert.encode_text(tokens, keep)
        return self.linear(hidden), jnp.maximum(keep.sum(axis=-1), 1)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        embedded, lengths = self.tokens(tokens)
        return self.gpo(embedded, lengths)[0]


def region_inputs(images: Any) -> tuple[jax.Array, jax.Array]:
    """(regions, lengths) of an `encode_image` input: an array (every region valid) or a dict with "regions" and
    optionally "lengths"."""
    regions = images["regions"] if isinstance(images, dict) else images
    lengths = images.get("lengths") if isinstance(images, dict) else None
    if lengths is None:
        lengths = jnp.full((regions.shape[0],), regions.shape[1], jnp.int32)
    return regions, lengths


def drop_grids(key: jax.Array, features: jax.Array, p: float = 0.2) -> tuple[jax.Array, jax.Array]:
    """EncoderImageFull's training-time grid drop over (B, N, C) backbone features: per image r ~ U(0, 1); where
    r > p each grid is dropped with probability p r, else every grid is kept. The kept grids come first in order,
    zeros after; (features, lengths), at least one grid kept."""
    rows, count = features.shape[:2]
    grid_key, image_key = jax.random.split(key)
    rate = jax.random.uniform(image_key, (rows, 1))
    keep = jnp.where(rate > p, jax.random.uniform(grid_key, (rows, count)) > p * rate, True)
    keep = keep.at[:, 0].set(keep[:, 0] | ~keep.any(axis=1))
    order = jnp.argsort(~keep, axis=1, stable=True)
    kept = jnp.take_along_axis(keep, order, axis=1)
    moved = jnp.take_along_axis(features, order[..., None], axis=1)
    return jnp.where(kept[..., None], moved, 0), keep.sum(axis=1)


class VSE(nnx.Module):
    """The VSE-infinity model: `image` and `text` encoders into one E-dimensional space. With `backbone` (a ResNet's
    stage sizes) the image side reads pixels: the ResNet's last feature map (batch norms frozen) is the set of
    grid features that fc (no MLP, the original's "backbone" option) and GPO pool."""

    def __init__(self, *, region_dim: int, embed_dim: int, bert: dict[str, Any], region_mlp: bool = True,
                 backbone: dict[str, Any] | None = None, pad_id: int = 0, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.dtype = dtype
        self.backbone = ResNet(**backbone, last_stride=2, stem_relu=True, rngs=rngs, dtype=dtype) if backbone else None
        if self.backbone is not None:
            region_dim, region_mlp = self.backbone.features, False
        self.image = RegionEncoder(region_dim, embed_dim, mlp=region_mlp, rngs=rngs, dtype=dtype)
        self.text = TextEncoder(bert, embed_dim, pad_id=pad_id, rngs=rngs, dtype=dtype)
        self.updates = Counter(jnp.zeros((), jnp.int32))

    def image_sets(self, images: Any, drop_key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """(features (B, K, D), lengths): the regions given, or the backbone's grids of the pixels given (dropped at
        random with `drop_key`)."""
        if self.backbone is None:
            return region_inputs(images)
        grid = self.backbone(images, train=False)
        grid = grid.reshape(grid.shape[0], -1, grid.shape[-1])
        if drop_key is not None:
            return drop_grids(drop_key, grid)
        return grid, jnp.full((grid.shape[0],), grid.shape[1], jnp.int32)

    def encode_image(self, images: Any, normalize: bool = True, *, train: bool = False,
                     drop_key: jax.Array | None = None) -> jax.Array:
        regions, lengths = self.image_sets(images, drop_key)
        pooled = self.image(regions.astype(self.dtype), lengths, train=train).astype(jnp.float32)
        return l2norm(pooled) if normalize else pooled

    def encode_text(self, tokens: jax.Array, normalize: bool = True) -> jax.Array:
        pooled = self.text(tokens).astype(jnp.float32)
        return l2norm(pooled) if normalize else pooled


__all__ = ["Counter", "drop_grids", "RegionEncoder", "RegionMLP", "TextEncoder", "VSE", "l2norm", "region_inputs",
           "torch_linear", "valid_rows"]
