"""Causal text transformer in the CLIP arrangement, pooled at the end-of-text token."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxretrieval.models.layers import Transformer, layer_norm


class TextTransformer(nnx.Module):
    def __init__(self, *, context_length: int, vocab_size: int, width: int, layers: int, heads: int,
                 mlp_ratio: float, embed_dim: int, activation: str, rngs: nnx.Rngs, dtype=jnp.float32,
                 remat: str = "none", scan: bool = True, unroll: int = 1,
                 attention: str = "xla"):
        self.dtype = dtype
        self.token_embedding = nnx.Embed(vocab_size, width, dtype=dtype, param_dtype=jnp.float32,
                                         embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.positional_embedding = nnx.Param(0.01 * jax.random.normal(rngs.params(), (context_length, width)))
        self.transformer = Transformer(width, layers, heads, mlp_ratio, activation, causal=True, rngs=rngs,
                                       dtype=dtype, remat=remat, scan=scan, unroll=unroll,
                                       attention=attention)
        self.ln_final = layer_norm(width, rngs=rngs, dtype=dtype)
        self.text_projection = nnx.Param(width**-0.5 * jax.random.normal(rngs.params(), (width, embed_dim)))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens: (batch, context_length) int ids, EOT the largest id of each row (CLIP's argmax pooling)."""
        length = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:length].astype(self.dtype)
        x = self.ln_final(self.transformer(x))
        eot = jnp.argmax(tokens, axis=-1)
        pooled = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
        return pooled @ self.text_projection[...].astype(pooled.dtype)
