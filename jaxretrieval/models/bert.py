"""BERT in the arrangement retrieval systems use it: a text encoder whose upper layers cross-attend to image tokens.

Layers are post-LN (x = LayerNorm(x + sublayer(x))), GELU (erf) feed-forward, learned absolute positions and token
types, LayerNorm eps 1e-12, as Hugging Face's `BertModel`. The encoder holds two stacks, each scanned:

- `text`: layers 0 .. fusion_from - 1, self-attention only (the text encoder of ALBEF / X-VLM / UIT);
- `fusion`: layers fusion_from .. layers - 1, in units of `cross_every` layers whose first also cross-attends to
  the image tokens (X2-VLM: 18 layers from 12 on, every layer; ALBEF / UIT: 12 from 6; BLIP-2's Q-Former: from 0,
  every other layer). Cross-attention keys and values come from `encoder_width`-wide image features.

`layer_path(i)` says where HF layer i lives (stack, unit, position), which the converters use. Dropout is not
applied (the eval-mode forward; training recipes that need BERT's 0.1 dropout are noted where used).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxretrieval.models.layers import attend, attention_implementation, dense
from jaxretrieval.models.stacking import scan_stack, stack_modules
from jaxretrieval.sharding import constrain

EPS = 1e-12


def _norm(width: int, rngs: nnx.Rngs, dtype: Any) -> nnx.LayerNorm:
    return nnx.LayerNorm(width, epsilon=EPS, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def _gelu(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x.astype(jnp.float32), approximate=False).astype(x.dtype)


class Attention(nnx.Module):
    """Multi-head attention with separate q/k/v projections and the post-LN output block (BertAttention)."""

    def __init__(self, width: int, heads: int, *, kv_width: int | None = None, rngs: nnx.Rngs, dtype: Any,
                 attention: str = "xla", init_std: float = 0.02):
        self.heads = heads
        self.query = dense(width, width, rngs=rngs, std=init_std, dtype=dtype)
        self.key = dense(kv_width or width, width, rngs=rngs, std=init_std, dtype=dtype)
        self.value = dense(kv_width or width, width, rngs=rngs, std=init_std, dtype=dtype)
        self.output = dense(width, width, rngs=rngs, std=init_std, dtype=dtype)
        self.norm = _norm(width, rngs, dtype)
        self.implementation = attention_implementation(attention, dtype, width // heads)

    def __call__(self, x: jax.Array, keep: jax.Array | None, *, context: jax.Array | None = None,
                 causal: bool = False) -> jax.Array:
        """keep: (batch, key length) bool, False on padded keys (those of `context` when given)."""
        source = x if context is None else context

        def heads(t: jax.Array) -> jax.Array:
            return constrain(t.reshape(*t.shape[:2], self.heads, -1), "batch", None, "heads", None)

        y = attend(heads(self.query(x)), heads(self.key(source)), heads(self.value(source)), causal=causal,
                   keep=keep, implementation=self.implementation)
        return self.norm(x + self.output(y.reshape(x.shape)))


class Layer(nnx.Module):
    """Self-attention, optionally cross-attention to image tokens, then the feed-forward block."""

    def __init__(self, width: int, heads: int, ffn_dim: int, *, cross: bool, encoder_width: int, rngs: nnx.Rngs,
                 dtype: Any, attention: str = "xla", init_std: float = 0.02):
        self.attention = Attention(width, heads, rngs=rngs, dtype=dtype, attention=attention, init_std=init_std)
        self.crossattention = (Attention(width, heads, kv_width=encoder_width, rngs=rngs, dtype=dtype,
                                         attention=attention, init_std=init_std) if cross else None)
        self.intermediate = dense(width, ffn_dim, rngs=rngs, std=init_std, dtype=dtype)
        self.output = dense(ffn_dim, width, rngs=rngs, std=init_std, dtype=dtype)
        self.norm = _norm(width, rngs, dtype)

    def __call__(self, x: jax.Array, keep: jax.Array | None, image: jax.Array | None = None,
                 image_keep: jax.Array | None = None, causal: bool = False) -> jax.Array:
        x = self.attention(x, keep, causal=causal)
        if self.crossattention is not None:
            x = self.crossattention(x, image_keep, context=image)
        hidden = constrain(_gelu(self.intermediate(x)), "batch", None, "mlp")
        return constrain(self.norm(x + self.output(hidden)), "batch", None, None)


class FusionUnit(nnx.Module):
    """`cross_every` consecutive fusion layers: the first cross-attends, the others (`rest`) do not."""

    def __init__(self, make: Any, cross_every: int):
        self.cross = make(True)
        self.rest = nnx.List([make(False) for _ in range(cross_every - 1)])

    def __call__(self, x, keep, image, image_keep, causal):
        x = self.cross(x, keep, image, image_keep, causal)
        for layer in self.rest:
            x = layer(x, keep, causal=causal)
        return x


class Stack(nnx.Module):
    """`count` identical modules held stacked and scanned (see models/stacking.py)."""

    def __init__(self, make: Any, count: int, rngs: nnx.Rngs, remat: str, unroll: int):
        self.layers = stack_modules(make, count, rngs) if count else None
        self.remat = remat
        self.unroll = unroll

    def __call__(self, x: jax.Array, *args: Any) -> jax.Array:
        if self.layers is None:
            return x
        return scan_stack(self.layers, x, lambda layer, y: layer(y, *args), self.remat, unroll=self.unroll)


class Embeddings(nnx.Module):
    def __init__(self, vocab_size: int, width: int, max_positions: int, type_vocab_size: int, *, rngs: nnx.Rngs,
                 dtype: Any):
        def table(rows: int) -> nnx.Embed:
            return nnx.Embed(rows, width, dtype=dtype, param_dtype=jnp.float32,
                             embedding_init=nnx.initializers.normal(0.02), rngs=rngs)

        self.word = table(vocab_size)
        self.position = table(max_positions)
        self.token_type = table(type_vocab_size)
        self.norm = _norm(width, rngs, dtype)

    def __call__(self, tokens: jax.Array, token_types: jax.Array | None = None) -> jax.Array:
        positions = jnp.arange(tokens.shape[1])[None]
        types = jnp.zeros_like(tokens) if token_types is None else token_types
        return self.norm(self.word(tokens) + self.position(positions) + self.token_type(types))


class Bert(nnx.Module):
    """The encoder (see the module docstring), with the pooler (dense + tanh on the first token)."""

    def __init__(self, *, vocab_size: int = 30522, width: int = 768, layers: int = 12, heads: int = 12,
                 ffn_dim: int = 3072, max_positions: int = 512, type_vocab_size: int = 2,
                 fusion_from: int | None = None, cross_every: int = 1, encoder_width: int | None = None,
                 causal: bool = False, pooler: bool = True, rngs: nnx.Rngs,
                 dtype: Any = jnp.float32, remat: str = "none", unroll: int = 1, attention: str = "xla",
                 init_std: float = 0.02):
        """init_std: the normal init's std of the linear layers' weights (HF's initializer_range, which also
        initialises the embeddings; 0.02 is BERT-base's, made for width 768: a tiny model trained from scratch
        learns its [CLS] far sooner from a larger one). The embeddings keep 0.02."""
        fusion_from = layers if fusion_from is None else fusion_from
        if not 0 <= fusion_from <= layers or (layers - fusion_from) % cross_every:
            raise ValueError(f"fusion layers {fusion_from}..{layers - 1} do not split into units of {cross_every}")
        self.sizes = (("layers", layers), ("fusion_from", fusion_from), ("cross_every", cross_every))
        self.causal = causal
        self.embeddings = Embeddings(vocab_size, width, max_positions, type_vocab_size, rngs=rngs, dtype=dtype)

        def layer(cross: bool, layer_rngs: nnx.Rngs) -> Layer:
            return Layer(width, heads, ffn_dim, cross=cross, encoder_width=encoder_width or width, rngs=layer_rngs,
                         dtype=dtype, attention=attention, init_std=init_std)

        self.text = Stack(lambda r: layer(False, r), fusion_from, rngs, remat, unroll)
        self.fusion = Stack(lambda r: FusionUnit(lambda cross: layer(cross, r), cross_every),
                            (layers - fusion_from) // cross_every, rngs, remat, unroll)
        self.pooler = dense(width, width, rngs=rngs, std=init_std, dtype=dtype) if pooler else None

    def encode_text(self, tokens: jax.Array, keep: jax.Array | None = None,
                    token_types: jax.Array | None = None) -> jax.Array:
        """Hidden states after the text layers. keep: (batch, length) bool, False on padding."""
        return self.text(self.embeddings(tokens, token_types), keep, None, None, self.causal)

    def fuse(self, text: jax.Array, keep: jax.Array | None, image: jax.Array,
             image_keep: jax.Array | None = None) -> jax.Array:
        """Hidden states after the fusion layers, from the text layers' output and image tokens (batch, n, width)."""
        return self.fusion(text, keep, image.astype(text.dtype), image_keep, self.causal)

    def __call__(self, tokens: jax.Array, keep: jax.Array | None = None, image: jax.Array | None = None,
                 image_keep: jax.Array | None = None, token_types: jax.Array | None = None) -> jax.Array:
        """Every layer in order; without `image` the model must have no fusion layers."""
        x = self.encode_text(tokens, keep, token_types)
        if self.fusion.layers is None:
            return x
        if image is None:
            raise ValueError("this BERT has fusion layers: give the image tokens they cross-attend to")
        return self.fuse(x, keep, image, image_keep)

    def pool(self, hidden: jax.Array) -> jax.Array:
        return jnp.tanh(self.pooler(hidden[:, 0]))


def layer_path(i: int, *, layers: int, fusion_from: int, cross_every: int = 1) -> tuple[str, int, str]:
    """(stack path, index on the stacked axis, path inside it) of HF layer i: `text/layers`, `fusion/layers` then
    `cross` or `rest/j` within a fusion unit."""
    if not 0 <= i < layers:
        raise IndexError(f"layer {i} of {layers}")
    if i < fusion_from:
        return "text/layers", i, ""
    unit, position = divmod(i - fusion_from, cross_every)
    return "fusion/layers", unit, "cross" if position == 0 else f"rest/{position - 1}"


class MLMHead(nnx.Module):
    """BertForMaskedLM's head: dense + GELU + LayerNorm, then the word embeddings (tied) and a bias."""

    def __init__(self, width: int, vocab_size: int, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
                 init_std: float = 0.02):
        self.transform = dense(width, width, rngs=rngs, std=init_std, dtype=dtype)
        self.norm = _norm(width, rngs, dtype)
        self.bias = nnx.Param(jnp.zeros((vocab_size,), jnp.float32))

    def __call__(self, hidden: jax.Array, word_embeddings: nnx.Embed) -> jax.Array:
        h = self.norm(_gelu(self.transform(hidden)))
        return word_embeddings.attend(h).astype(jnp.float32) + self.bias[...]


class ITMHead(nnx.Module):
    """Match / no-match logits of a fused [CLS]: Linear -> 2, or with `hidden` (X2-VLM: 2 x width) Linear,
    LayerNorm (eps 1e-5), GELU, Linear -> 2."""

    def __init__(self, width: int, hidden: int | None = None, *, rngs: nnx.Rngs, dtype: Any = jnp.float32,
                 init_std: float = 0.02):
        self.hidden = None if hidden is None else dense(width, hidden, rngs=rngs, std=init_std, dtype=dtype)
        self.norm = None if hidden is None else nnx.LayerNorm(hidden, epsilon=1e-5, dtype=dtype,
                                                              param_dtype=jnp.float32, rngs=rngs)
        self.out = dense(hidden or width, 2, rngs=rngs, std=init_std, dtype=dtype)

    def __call__(self, cls: jax.Array) -> jax.Array:
        if self.hidden is not None:
            cls = _gelu(self.norm(self.hidden(cls)))
        return self.out(cls).astype(jnp.float32)


class FusionHeads:
    """What a BERT-fusion retrieval model derives from its `text` (a Bert with fusion layers), `itm_head`,
    `mlm_head` (or None) and `pad_id`: text states, ITM logits on the fused [CLS], MLM logits (X-VLM, UIT); and the
    evaluator's encoders from its own image_tokens / image_features / text_features."""

    def encode_image(self, pixels: jax.Array, normalize: bool = True) -> jax.Array:
        del normalize  # ITC features are always normalised
        return self.image_features(self.image_tokens(pixels))

    def encode_text(self, tokens: jax.Array, normalize: bool = True) -> jax.Array:
        del normalize
        return self.text_features(self.text_hidden(tokens))

    def keep(self, tokens: jax.Array) -> jax.Array:
        return tokens != self.pad_id

    def text_hidden(self, tokens: jax.Array) -> jax.Array:
        """(batch, length, width) after the text layers."""
        return self.text.encode_text(tokens, self.keep(tokens))

    def match_logits(self, text_hidden: jax.Array, text_keep: jax.Array, image_tokens: jax.Array) -> jax.Array:
        """(batch, 2) ITM logits (index 1: match) of the fused [CLS]; every image token is attended."""
        return self.itm_head(self.text.fuse(text_hidden, text_keep, image_tokens)[:, 0])

    def mlm_logits(self, masked_tokens: jax.Array, text_keep: jax.Array, image_tokens: jax.Array,
                   positions: jax.Array) -> jax.Array:
        """(batch, masks, vocab) logits at `positions` (batch, masks) of the masked ids fused with the image."""
        hidden = self.text(masked_tokens, text_keep, image_tokens)
        at = jnp.take_along_axis(hidden, positions[..., None].astype(jnp.int32), axis=1)
        return self.mlm_head(at, self.text.embeddings.word)
