"""UIT, the PAB seed's unified image-text model (the CMP baseline): a Swin tower, a BERT whose layers from
`fusion_from` on cross-attend to the image tokens, chunk-pooled ITC features, an ITM head, an MLM head and a SimMIM
decoder for masked image modelling.

Read in the PAB repository (github:AIVIETNAM-Hub/Hybrid-Unified-and-Iterative-A-Novel-Framework-for-Text-based-
Person-Anomaly-Retrieval, uit/cmp: models/cmp.py `CMP`, models/simmim.py, models/swin_transformer.py, configs):
- image tokens: the Swin's final-norm tokens with their mean put in front (its forward returns
  cat(avgpool(x), x)), all attended by the fusion layers.
- ITC features: `AdaptiveAvgPool1d(3)` over the tokens after the first (image: the 49 patch tokens; text: every
  position after [CLS], padding included, as the original pools a max_length-padded row), the three chunk means
  concatenated (text: behind the [CLS] state), then `feature_mapping`: BatchNorm1d -> Dropout(0.5) -> Linear to
  embed_dim (weights N(0, 1e-5), bias 0), L2-normalised. The batch norm normalises by batch statistics in training
  and its running ones in evaluation.
- ITM: Linear(w, 2w) -> LayerNorm -> GELU -> Linear(2w, 2) on the fused [CLS]; MLM: BertForMaskedLM's head tied to
  the word embeddings; `temp` a learnable scalar (0.07), not clamped.
- SimMIM: the same Swin run on the image with the masked patch embeddings replaced by `mask_token`, a 1x1
  convolution to stride^2 * 3 channels, PixelShuffle(stride); the L1 error on masked pixels (`mim_error`).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxretrieval.models.bert import Bert, FusionHeads, ITMHead, MLMHead
from jaxretrieval.models.clip import l2_normalize
from jaxretrieval.models.layers import dense
from jaxretrieval.models.resnet import BatchNorm
from jaxretrieval.models.swin import SwinTransformer


def adaptive_avg_pool(x: jax.Array, bins: int) -> jax.Array:
    """(batch, length, width) -> (batch, bins, width): torch's AdaptiveAvgPool1d along the length, bin i the mean
    of positions floor(i L / bins) .. ceil((i + 1) L / bins) - 1 (neighbouring bins may share a position)."""
    length = x.shape[1]
    means = [jnp.mean(x[:, (i * length) // bins:math.ceil((i + 1) * length / bins)].astype(jnp.float32), axis=1)
             for i in range(bins)]
    return jnp.stack(means, axis=1)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout (torch's): zeros with probability `rate`, the rest scaled by 1 / (1 - rate); the identity
    without a key."""
    if key is None or rate == 0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class FeatureMapping(nnx.Module):
    """CMP's feature_mapping: BatchNorm1d -> Dropout -> Linear (weights N(0, 1e-5), bias 0)."""

    def __init__(self, features: int, out: int, *, rate: float, rngs: nnx.Rngs, dtype: Any):
        self.norm = BatchNorm(features)
        self.rate = rate
        self.linear = dense(features, out, rngs=rngs, std=1e-5, dtype=dtype)

    def __call__(self, x: jax.Array, *, train: bool = False, key: jax.Array | None = None) -> jax.Array:
        return self.linear(dropout(self.norm(x, train=train), self.rate, key if train else None))


def pixel_shuffle(x: jax.Array, stride: int, channels: int = 3) -> jax.Array:
    """(batch, h, w, channels * stride^2) -> (batch, h * stride, w * stride, channels): torch's PixelShuffle, input
    channel c * stride^2 + i * stride + j going to pixel (h * stride + i, w * stride + j) of channel c."""
    b, h, w, _ = x.shape
    x = x.reshape(b, h, w, channels, stride, stride)
    return x.transpose(0, 1, 4, 2, 5, 3).reshape(b, h * stride, w * stride, channels)


class UIT(FusionHeads, nnx.Module):
    def __init__(self, *, vision: dict[str, Any], text: dict[str, Any], embed_dim: int = 2048, chunks: int = 3,
                 proj_dropout: float = 0.5, temp: float = 0.07, itm_hidden: int | None = None, mlm: bool = True,
                 mim: bool = True, pad_id: int = 0, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        """vision: SwinTransformer keyword arguments; text: Bert keyword arguments (fusion_from set)."""
        self.pad_id, self.chunks, self.dtype = pad_id, chunks, dtype
        self.vision = SwinTransformer(**vision, rngs=rngs, dtype=dtype)
        width, text_width = self.vision.width, text["width"]
        self.text = Bert(**text, encoder_width=width, pooler=False, rngs=rngs, dtype=dtype)
        self.vision_proj = FeatureMapping(chunks * width, embed_dim, rate=proj_dropout, rngs=rngs, dtype=dtype)
        self.text_proj = FeatureMapping((chunks + 1) * text_width, embed_dim, rate=proj_dropout, rngs=rngs,
                                        dtype=dtype)
        std = text.get("init_std", 0.02)
        self.itm_head = ITMHead(text_width, itm_hidden, rngs=rngs, dtype=dtype, init_std=std)
        self.mlm_head = (MLMHead(text_width, text.get("vocab_size", 30522), rngs=rngs, dtype=dtype, init_std=std)
                         if mlm else None)
        self.temp = nnx.Param(jnp.asarray(temp, jnp.float32))
        if mim:
            embed = vision.get("embed_dim", 96)
            self.mask_token = nnx.Param(0.02 * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, (embed,)))
            self.mim_stride = self.vision.image_size[0] // self.vision.resolution[0]  # SimMIM's encoder_stride
            self.mim_decoder = dense(width, self.mim_stride**2 * 3, rngs=rngs, std=0.02, dtype=dtype)
        else:
            self.mask_token = self.mim_decoder = None

    def image_tokens(self, pixels: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        """(batch, 1 + patches, width): the tokens' mean, then the final-norm patch tokens."""
        tokens, pooled = self.vision(pixels, rngs=rngs)
        return jnp.concatenate([pooled[:, None], tokens], axis=1)

    def image_features(self, image_tokens: jax.Array, *, train: bool = False,
                       key: jax.Array | None = None) -> jax.Array:
        pooled = adaptive_avg_pool(image_tokens[:, 1:], self.chunks)
        flat = pooled.reshape(pooled.shape[0], -1)
        return l2_normalize(self.vision_proj(flat, train=train, key=key).astype(jnp.float32))

    def text_features(self, text_hidden: jax.Array, *, train: bool = False,
                      key: jax.Array | None = None) -> jax.Array:
        pooled = adaptive_avg_pool(text_hidden[:, 1:], self.chunks)
        flat = jnp.concatenate([text_hidden[:, 0].astype(jnp.float32), pooled.reshape(pooled.shape[0], -1)], axis=1)
        return l2_normalize(self.text_proj(flat, train=train, key=key).astype(jnp.float32))

    def mim_error(self, pixels: jax.Array, masked: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        """SimMIM's loss per image: the mean L1 error of the reconstruction over the masked pixels and the channels.
        masked: (batch or 1, patch rows, patch columns) of the Swin's patch grid, 1 = masked."""
        tokens, _ = self.vision(pixels, rngs=rngs, masked=masked, mask_token=self.mask_token[...])
        rows, cols = self.vision.resolution
        decoded = self.mim_decoder(tokens).reshape(tokens.shape[0], rows, cols, -1)
        reconstruction = pixel_shuffle(decoded.astype(jnp.float32), self.mim_stride)
        patch = pixels.shape[1] // masked.shape[1]
        weight = jnp.repeat(jnp.repeat(masked.astype(jnp.float32), patch, axis=1), patch, axis=2)[..., None]
        error = jnp.abs(pixels.astype(jnp.float32) - reconstruction) * weight
        per_image = jnp.sum(error, axis=(1, 2, 3)) / (jnp.sum(weight, axis=(1, 2, 3)) + 1e-5) / pixels.shape[-1]
        return jnp.broadcast_to(per_image, (pixels.shape[0],))


def block_mask(key: jax.Array, image_size: int, patch_size: int, block: int = 32, ratio: float = 0.5) -> jax.Array:
    """SimMIM's MaskGenerator: ceil(ratio x blocks) of the (image_size / block)^2 blocks chosen uniformly without
    replacement, as a (1, image_size / patch, image_size / patch) 0/1 map on the model's patch grid."""
    if image_size % block or block % patch_size:
        raise ValueError(f"the image size {image_size} must be a multiple of the mask block {block}, and the block a "
                         f"multiple of the patch {patch_size}")
    side = image_size // block
    count = math.ceil(side * side * ratio)
    chosen = jax.random.permutation(key, side * side)[:count]
    blocks = jnp.zeros(side * side, jnp.int32).at[chosen].set(1).reshape(side, side)
    scale = block // patch_size
    return jnp.repeat(jnp.repeat(blocks, scale, axis=0), scale, axis=1)[None]
