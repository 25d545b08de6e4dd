"""CUSA's model: CLIP's towers, a cross head and a uni head per modality, and the loss temperatures.

Each head is LayerNorm + Linear(D, D) on the tower's projected embedding (weights N(0, 0.02) as the original
initialises them). The cross heads give the retrieval embeddings; the uni heads serve the uni-modal loss. There
is no logit scale: the losses divide by their temperatures, learnable parameters or, where the config blocks
them, frozen values that the optimiser never moves.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxretrieval.models.clip import clip_towers, l2_normalize
from jaxretrieval.models.layers import layer_norm


class FrozenTemperature(nnx.Variable):
    """A temperature the config blocks: in the state (checkpointed), not a trainable parameter."""


class Head(nnx.Module):
    def __init__(self, width: int, *, rngs: nnx.Rngs, dtype):
        bound = 1 / math.sqrt(width)  # torch Linear's default bias init
        self.norm = layer_norm(width, rngs=rngs, dtype=dtype)
        self.proj = nnx.Linear(width, width, dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
                               kernel_init=nnx.initializers.normal(0.02),
                               bias_init=lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj(self.norm(x)).astype(jnp.float32)


class CUSAModel(nnx.Module):
    def __init__(self, model_config, temperatures: dict[str, tuple[float, bool]], uni_heads: bool, *,
                 rngs: nnx.Rngs, dtype=jnp.float32):
        """model_config: a ModelConfig (the CLIP towers); temperatures: name -> (initial value, learnable)."""
        self.visual, self.text = clip_towers(model_config, rngs=rngs, dtype=dtype)
        width = model_config.embed_dim
        self.cross_image = Head(width, rngs=rngs, dtype=dtype)
        self.cross_text = Head(width, rngs=rngs, dtype=dtype)
        self.uni_image = Head(width, rngs=rngs, dtype=dtype) if uni_heads else None
        self.uni_text = Head(width, rngs=rngs, dtype=dtype) if uni_heads else None
        self.temperatures = nnx.Dict({
            name: (nnx.Param if learnable else FrozenTemperature)(jnp.asarray(value, jnp.float32))
            for name, (value, learnable) in temperatures.items()})

    def encode_image(self, pixels: jax.Array, normalize: bool = False) -> jax.Array:
        """The cross-head embedding, what image-text retrieval ranks by."""
        features = self.cross_image(self.visual(pixels))
        return l2_normalize(features) if normalize else features

    def encode_text(self, tokens: jax.Array, normalize: bool = False) -> jax.Array:
        features = self.cross_text(self.text(tokens))
        return l2_normalize(features) if normalize else features

    def encode_image_uni(self, pixels: jax.Array, normalize: bool = False) -> jax.Array:
        features = self.uni_image(self.visual(pixels))
        return l2_normalize(features) if normalize else features

    def encode_text_uni(self, tokens: jax.Array, normalize: bool = False) -> jax.Array:
        features = self.uni_text(self.text(tokens))
        return l2_normalize(features) if normalize else features

    def features(self, pixels: jax.Array, tokens: jax.Array) -> dict[str, jax.Array | None]:
        """One pass of each tower through both of its heads (uni ones None without uni heads), normalised."""
        image, text = self.visual(pixels), self.text(tokens)
        uni = self.uni_image is not None
        return {"image_cross": l2_normalize(self.cross_image(image)), "text_cross": l2_normalize(self.cross_text(text)),
                "image_uni": l2_normalize(self.uni_image(image)) if uni else None,
                "text_uni": l2_normalize(self.uni_text(text)) if uni else None}

    def temperature_values(self) -> dict[str, jax.Array]:
        """Every temperature by name; frozen ones carry no gradient."""
        return {name: variable[...] if isinstance(variable, nnx.Param) else jax.lax.stop_gradient(variable[...])
                for name, variable in self.temperatures.items()}
