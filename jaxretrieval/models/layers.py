"""Transformer pieces shared by the towers: pre-LN residual blocks in the CLIP arrangement."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxretrieval.models.stacking import REMAT_POLICIES, rematerialised, scan_stack, stack_modules
from jaxretrieval.sharding import constrain

__all__ = ["REMAT_POLICIES", "Attention", "Block", "LogitScalars", "MLP", "Transformer", "dense", "layer_norm",
           "rematerialised"]


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


def dense(d_in: int, d_out: int, *, rngs: nnx.Rngs, std: float, dtype, use_bias: bool = True) -> nnx.Linear:
    return nnx.Linear(
        d_in, d_out, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
        kernel_init=nnx.initializers.normal(std), rngs=rngs,
    )


def layer_norm(width: int, *, rngs: nnx.Rngs, dtype) -> nnx.LayerNorm:
    return nnx.LayerNorm(width, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


class Attention(nnx.Module):
    """Multi-head self-attention with one fused qkv projection (OpenAI's in_proj layout)."""

    def __init__(self, width: int, heads: int, *, causal: bool, layers: int, rngs: nnx.Rngs, dtype):
        self.heads = heads
        self.causal = causal
        self.qkv = dense(width, 3 * width, rngs=rngs, std=width**-0.5, dtype=dtype)
        self.out = dense(width, width, rngs=rngs, std=width**-0.5 * (2 * layers) ** -0.5, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, length, width = x.shape
        qkv = jnp.split(self.qkv(x).reshape(batch, length, 3 * self.heads, -1), 3, axis=2)
        q, k, v = (constrain(t, "batch", None, "heads", None) for t in qkv)
        y = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out(y.reshape(batch, length, width))


class MLP(nnx.Module):
    def __init__(self, width: int, hidden: int, activation: str, *, layers: int, rngs: nnx.Rngs, dtype):
        self.fc = dense(width, hidden, rngs=rngs, std=(2 * width) ** -0.5, dtype=dtype)
        self.proj = dense(hidden, width, rngs=rngs, std=width**-0.5 * (2 * layers) ** -0.5, dtype=dtype)
        self.activation = ACTIVATIONS[activation]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj(constrain(self.activation(self.fc(x)), "batch", None, "mlp"))


class Block(nnx.Module):
    def __init__(self, width, heads, mlp_ratio, activation, *, causal, layers, rngs: nnx.Rngs, dtype):
        self.ln_1 = layer_norm(width, rngs=rngs, dtype=dtype)
        self.attn = Attention(width, heads, causal=causal, layers=layers, rngs=rngs, dtype=dtype)
        self.ln_2 = layer_norm(width, rngs=rngs, dtype=dtype)
        self.mlp = MLP(width, int(width * mlp_ratio), activation, layers=layers, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = constrain(x + self.attn(self.ln_1(x)), "batch", None, None)
        return constrain(x + self.mlp(self.ln_2(x)), "batch", None, None)


class Transformer(nnx.Module):
    """`layers` blocks, stacked and scanned (`scan`, the default) or one module per layer."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, activation: str, *,
                 causal: bool, rngs: nnx.Rngs, dtype, remat: str = "none", scan: bool = True, unroll: int = 1):
        def make(block_rngs: nnx.Rngs) -> Block:
            return Block(width, heads, mlp_ratio, activation, causal=causal, layers=layers, rngs=block_rngs,
                         dtype=dtype)

        self.blocks = stack_modules(make, layers, rngs) if scan else nnx.List([make(rngs) for _ in range(layers)])
        self.remat = remat
        self.scan = scan
        self.unroll = unroll

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.scan:
            return scan_stack(self.blocks, x, lambda block, y: block(y), self.remat, unroll=self.unroll)
        run = rematerialised(lambda block, y: block(y), self.remat)
        for block in self.blocks:
            x = run(block, x)
        return x


class LogitScalars:
    """The learnable logit scale exp(t) (clamped at exp(max_logit_scale)) and, for the sigmoid loss, a logit bias
    (present when `model.init_logit_bias` is set). Mixed into every dual encoder."""

    def init_logit_scalars(self, config, max_logit_scale: float = float("inf")) -> None:
        self.logit_scale = nnx.Param(jnp.asarray(config.init_logit_scale, jnp.float32))
        self.max_logit_scale = max_logit_scale
        bias = config.init_logit_bias
        self.logit_bias = None if bias is None else nnx.Param(jnp.asarray(bias, jnp.float32))

    def scale(self) -> jax.Array:
        return jnp.exp(jnp.minimum(self.logit_scale[...], self.max_logit_scale))

    def loss_scalars(self) -> tuple[jax.Array, ...]:
        """(scale,) or (scale, bias): the scalars the training loss takes after the embeddings."""
        return (self.scale(),) if self.logit_bias is None else (self.scale(), self.logit_bias[...])
