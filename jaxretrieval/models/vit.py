"""ViT image tower in the CLIP arrangement: patches + class token, ln_pre, blocks, ln_post, projection."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from jaxretrieval.models.layers import Transformer, dense, layer_norm


class VisionTransformer(nnx.Module):
    def __init__(self, *, image_size: int, patch_size: int, width: int, layers: int, heads: int,
                 mlp_ratio: float, embed_dim: int, activation: str, rngs: nnx.Rngs, dtype=jnp.float32,
                 remat: str = "none", scan: bool = True, unroll: int = 1,
                 attention: str = "xla"):
        self.patch_size = patch_size
        self.dtype = dtype
        grid = image_size // patch_size
        scale = width**-0.5
        # A stride-p convolution without bias, written as a matmul over flattened (ph, pw, c) patches.
        self.patch_embed = dense(patch_size * patch_size * 3, width, rngs=rngs, std=scale, dtype=dtype,
                                 use_bias=False)
        self.class_embedding = nnx.Param(scale * jax.random.normal(rngs.params(), (width,)))
        self.positional_embedding = nnx.Param(scale * jax.random.normal(rngs.params(), (grid * grid + 1, width)))
        self.ln_pre = layer_norm(width, rngs=rngs, dtype=dtype)
        self.transformer = Transformer(width, layers, heads, mlp_ratio, activation, causal=False, rngs=rngs,
                                       dtype=dtype, remat=remat, scan=scan, unroll=unroll,
                                       attention=attention)
        self.ln_post = layer_norm(width, rngs=rngs, dtype=dtype)
        self.proj = nnx.Param(scale * jax.random.normal(rngs.params(), (width, embed_dim)))

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """pixels: (batch, height, width, 3), normalised. Returns (batch, embed_dim), not normalised."""
        p = self.patch_size
        patches = rearrange(pixels.astype(self.dtype), "b (h ph) (w pw) c -> b (h w) (ph pw c)", ph=p, pw=p)
        x = self.patch_embed(patches)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.positional_embedding[...].astype(x.dtype)
        x = self.transformer(self.ln_pre(x))
        pooled = self.ln_post(x[:, 0])
        return pooled @ self.proj[...].astype(pooled.dtype)
