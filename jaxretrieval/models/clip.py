"""CLIP dual encoder: an image tower, a text tower and a learnable logit scale."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxretrieval.models.layers import LogitScalars
from jaxretrieval.models.text import TextTransformer
from jaxretrieval.models.vit import VisionTransformer


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def clip_towers(config, *, rngs: nnx.Rngs, dtype=jnp.float32) -> tuple[VisionTransformer, TextTransformer]:
    """CLIP's image and text towers as `config` (a ModelConfig) sizes them, each ending in its projection."""
    shared = {"embed_dim": config.embed_dim, "activation": config.activation, "rngs": rngs, "dtype": dtype,
              "scan": config.scan_layers, "unroll": config.scan_unroll, "attention": config.attention}
    image, text = config.image, config.text
    visual = VisionTransformer(image_size=image.image_size, patch_size=image.patch_size, width=image.width,
                               layers=image.layers, heads=image.heads, mlp_ratio=image.mlp_ratio, remat=image.remat,
                               **shared)
    text_tower = TextTransformer(context_length=text.context_length, vocab_size=text.vocab_size, width=text.width,
                                 layers=text.layers, heads=text.heads, mlp_ratio=text.mlp_ratio, remat=text.remat,
                                 **shared)
    return visual, text_tower


class CLIP(nnx.Module, LogitScalars):
    def __init__(self, config, *, rngs: nnx.Rngs, dtype=jnp.float32):
        """config: a `jaxretrieval.config.ModelConfig`."""
        self.visual, self.text = clip_towers(config, rngs=rngs, dtype=dtype)
        self.init_logit_scalars(config, config.max_logit_scale)

    def encode_image(self, pixels: jax.Array, normalize: bool = False) -> jax.Array:
        features = self.visual(pixels).astype(jnp.float32)
        return l2_normalize(features) if normalize else features

    def encode_text(self, tokens: jax.Array, normalize: bool = False) -> jax.Array:
        features = self.text(tokens).astype(jnp.float32)
        return l2_normalize(features) if normalize else features

    def __call__(self, pixels: jax.Array, tokens: jax.Array, *, rngs: nnx.Rngs | None = None
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Normalised image and text embeddings and the logit scale exp(t). CLIP has no stochastic layers, so
        `rngs` (what the train step passes every family) is unused."""
        return self.encode_image(pixels, normalize=True), self.encode_text(tokens, normalize=True), self.scale()
