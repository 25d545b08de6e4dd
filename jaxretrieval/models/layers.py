"""Transformer pieces shared by the towers: pre-LN residual blocks in the CLIP arrangement."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxretrieval.errors import ConfigError
from jaxretrieval.models.stacking import REMAT_POLICIES, rematerialised, scan_stack, stack_modules
from jaxretrieval.sharding import constrain

__all__ = ["ATTENTION_SETTINGS", "REMAT_POLICIES", "Attention", "Block", "LogitScalars", "MLP", "Transformer",
           "attend", "attention_implementation", "dense", "layer_norm", "rematerialised"]

# model.attention: auto takes cuDNN's fused attention where it applies (see attention_implementation), XLA elsewhere.
ATTENTION_SETTINGS = ("auto", "xla", "cudnn")


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


def attention_implementation(setting: str, dtype: Any, head_dim: int) -> str:
    """The implementation `jax.nn.dot_product_attention` is asked for: cudnn (fused flash attention) on a GPU for
    half-precision compute and head dims that are multiples of 8 up to 128, as the kernel requires; xla elsewhere.
    An explicit "cudnn" that cannot apply is an error naming why."""
    if setting not in ATTENTION_SETTINGS:
        raise ConfigError(f"model.attention must be one of {', '.join(ATTENTION_SETTINGS)}, got {setting!r}")
    reasons = [why for failed, why in (
        (jax.default_backend() != "gpu", f"the backend is {jax.default_backend()}, not gpu"),
        (jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16), f"compute is {jnp.dtype(dtype).name} (needs bf16)"),
        (head_dim % 8 or head_dim > 128, f"the head dim is {head_dim} (needs a multiple of 8, at most 128)"),
    ) if failed]
    if setting == "cudnn" and reasons:
        raise ConfigError("model.attention=cudnn cannot apply: " + "; ".join(reasons) + " (auto chooses for you)")
    return "xla" if setting == "xla" or reasons else "cudnn"


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False, keep: jax.Array | None = None,
           bias: jax.Array | None = None, implementation: str = "xla") -> jax.Array:
    """Scaled dot-product attention over (batch, length, heads, head_dim) inputs. keep: (batch, length) bool, False
    on padding keys; bias: added to the logits, broadcast to (batch, heads, queries, keys) (relative positions).
    cuDNN is given the padding as key lengths (its fused kernel takes no boolean mask), so there padding must
    trail each row, as the tokenizers write it."""
    if keep is None:
        return jax.nn.dot_product_attention(q, k, v, bias=bias, is_causal=causal, implementation=implementation)
    if implementation == "cudnn":
        lengths = jnp.sum(keep, axis=-1, dtype=jnp.int32)
        return jax.nn.dot_product_attention(q, k, v, bias=bias, is_causal=causal, key_value_seq_lengths=lengths,
                                            implementation="cudnn")
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=keep[:, None, None, :], is_causal=causal,
                                        implementation=implementation)


class Attention(nnx.Module):
    """Multi-head self-attention with one fused qkv projection (OpenAI's in_proj layout)."""

    def __init__(self, width: int, heads: int, *, causal: bool, layers: int, rngs: nnx.Rngs, dtype,
                 attention: str = "xla"):
        self.heads = heads
        self.causal = causal
        self.implementation = attention_implementation(attention, dtype, width // heads)
        self.qkv = dense(width, 3 * width, rngs=rngs, std=width**-0.5, dtype=dtype)
        self.out = dense(width, width, rngs=rngs, std=width**-0.5 * (2 * layers) ** -0.5, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, length, width = x.shape
        qkv = jnp.split(self.qkv(x).reshape(batch, length, 3 * self.heads, -1), 3, axis=2)
        q, k, v = (constrain(t, "batch", None, "heads", None) for t in qkv)
        y = attend(q, k, v, causal=self.causal, implementation=self.implementation)
        return self.out(y.reshape(batch, length, width))


class MLP(nnx.Module):
    def __init__(self, width: int, hidden: int, activation: str, *, layers: int, rngs: nnx.Rngs, dtype):
        self.fc = dense(width, hidden, rngs=rngs, std=(2 * width) ** -0.5, dtype=dtype)
        self.proj = dense(hidden, width, rngs=rngs, std=width**-0.5 * (2 * layers) ** -0.5, dtype=dtype)
        self.activation = ACTIVATIONS[activation]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj(constrain(self.activation(self.fc(x)), "batch", None, "mlp"))


class Block(nnx.Module):
    def __init__(self, width, heads, mlp_ratio, activation, *, causal, layers, rngs: nnx.Rngs, dtype,
                 attention: str = "xla"):
        self.ln_1 = layer_norm(width, rngs=rngs, dtype=dtype)
        self.attn = Attention(width, heads, causal=causal, layers=layers, rngs=rngs, dtype=dtype, attention=attention)
        self.ln_2 = layer_norm(width, rngs=rngs, dtype=dtype)
        self.mlp = MLP(width, int(width * mlp_ratio), activation, layers=layers, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = constrain(x + self.attn(self.ln_1(x)), "batch", None, None)
        return constrain(x + self.mlp(self.ln_2(x)), "batch", None, None)


class Transformer(nnx.Module):
    """`layers` blocks, stacked and scanned (`scan`, the default) or one module per layer."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, activation: str, *,
                 causal: bool, rngs: nnx.Rngs, dtype, remat: str = "none", scan: bool = True, unroll: int = 1,
                 attention: str = "xla"):
        def make(block_rngs: nnx.Rngs) -> Block:
            return Block(width, heads, mlp_ratio, activation, causal=causal, layers=layers, rngs=block_rngs,
                         dtype=dtype, attention=attention)

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
