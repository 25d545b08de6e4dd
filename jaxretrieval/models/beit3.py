"""BEiT-3 multiway encoder (torchscale's arrangement) and unilm's dual-encoder retrieval heads.

Every sequence is [vision tokens][text tokens]; `split` counts the vision tokens. Vision tokens go through
expert A of each multiway layer (norms, q/k/v/out projections, FFN) and text tokens through expert B, while
attention itself mixes the whole sequence. Layers are pre-LN with sub-LN: one LayerNorm on the attention
output before out_proj and one on the FFN hidden state before fc2.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from jaxretrieval.models.clip import l2_normalize
from jaxretrieval.models.layers import LogitScalars, attend, attention_implementation, dense, layer_norm
from jaxretrieval.models.stacking import rematerialised, scan_stack, stack_modules
from jaxretrieval.sharding import constrain

# torchscale (like fairseq) numbers positions from 2, so rows 0 and 1 of both position tables are never read.
POSITION_OFFSET = 2


class Multiway(nnx.Module):
    """Two copies of a token-wise module: A for the first `split` tokens (vision), B for the rest (text)."""

    def __init__(self, make: Callable[[], nnx.Module]):
        self.A = make()
        self.B = make()

    def __call__(self, x: jax.Array, split: int) -> jax.Array:
        if split >= x.shape[1]:
            return self.A(x)
        if split <= 0:
            return self.B(x)
        return jnp.concatenate([self.A(x[:, :split]), self.B(x[:, split:])], axis=1)


def drop_path(x: jax.Array, rate: jax.Array, key: jax.Array | None) -> jax.Array:
    """Stochastic depth: each sample's residual branch dropped with probability `rate`, survivors scaled by
    1 / (1 - rate); `key` None (evaluation) keeps everything."""
    if key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, (x.shape[0], 1, 1))
    return jnp.where(keep, x / (1.0 - rate).astype(x.dtype), jnp.zeros((), x.dtype))


class FeedForward(nnx.Module):
    def __init__(self, width: int, hidden: int, *, rngs: nnx.Rngs, dtype: Any):
        self.fc1 = dense(width, hidden, rngs=rngs, std=0.02, dtype=dtype)
        self.ffn_layernorm = layer_norm(hidden, rngs=rngs, dtype=dtype)
        self.fc2 = dense(hidden, width, rngs=rngs, std=0.02, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.gelu(self.fc1(x).astype(jnp.float32), approximate=False).astype(x.dtype)
        h = constrain(h, "batch", None, "mlp")
        return self.fc2(self.ffn_layernorm(h))


class MultiwayAttention(nnx.Module):
    def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs, dtype: Any, attention: str = "xla"):
        self.heads = heads
        self.implementation = attention_implementation(attention, dtype, width // heads)

        def proj() -> Multiway:
            return Multiway(lambda: dense(width, width, rngs=rngs, std=0.02, dtype=dtype))

        self.q_proj, self.k_proj, self.v_proj, self.out_proj = proj(), proj(), proj(), proj()
        self.inner_attn_ln = Multiway(lambda: layer_norm(width, rngs=rngs, dtype=dtype))

    def __call__(self, x: jax.Array, split: int, keep: jax.Array | None) -> jax.Array:
        """keep: (batch, length) bool, False on padding keys; None attends everywhere."""
        batch, length, width = x.shape

        def heads(t: jax.Array) -> jax.Array:
            return constrain(t.reshape(batch, length, self.heads, width // self.heads), "batch", None, "heads", None)

        q, k, v = (heads(p(x, split)) for p in (self.q_proj, self.k_proj, self.v_proj))
        # attend scales q by head_dim ** -0.5, as torchscale does before q @ k.
        y = attend(q, k, v, keep=keep, implementation=self.implementation).reshape(batch, length, width)
        return self.out_proj(self.inner_attn_ln(y, split), split)


class EncoderLayer(nnx.Module):
    def __init__(self, width: int, heads: int, ffn_dim: int, *, rngs: nnx.Rngs, dtype: Any, attention: str = "xla"):
        self.self_attn_layer_norm = Multiway(lambda: layer_norm(width, rngs=rngs, dtype=dtype))
        self.self_attn = MultiwayAttention(width, heads, rngs=rngs, dtype=dtype, attention=attention)
        self.final_layer_norm = Multiway(lambda: layer_norm(width, rngs=rngs, dtype=dtype))
        self.ffn = Multiway(lambda: FeedForward(width, ffn_dim, rngs=rngs, dtype=dtype))

    def __call__(self, x: jax.Array, split: int, keep: jax.Array | None, rate: jax.Array,
                 key: jax.Array | None) -> jax.Array:
        """rate: this layer's drop-path rate; key: its randomness (None: no dropping)."""
        keys = (None, None) if key is None else tuple(jax.random.split(key))
        x = x + drop_path(self.self_attn(self.self_attn_layer_norm(x, split), split, keep), rate, keys[0])
        x = constrain(x, "batch", None, None)
        x = x + drop_path(self.ffn(self.final_layer_norm(x, split), split), rate, keys[1])
        return constrain(x, "batch", None, None)


class BEiT3(nnx.Module):
    """The multiway encoder: embeddings, layers, final multiway LayerNorm. Returns the whole sequence."""

    def __init__(self, *, layers: int, width: int, heads: int, ffn_dim: int, image_size: int, patch_size: int,
                 vocab_size: int, max_text_positions: int, drop_path_rate: float = 0.0, rngs: nnx.Rngs,
                 dtype: Any = jnp.float32, remat: str = "none", scan: bool = True, unroll: int = 1,
                 attention: str = "xla"):
        self.patch_size = patch_size
        self.dtype = dtype
        patches = (image_size // patch_size) ** 2
        self.text_embed = nnx.Embed(vocab_size, width, dtype=dtype, param_dtype=jnp.float32,
                                    embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        # The stride-p patch convolution (with bias) as a matmul over flattened (ph, pw, c) patches.
        self.patch_embed = dense(patch_size * patch_size * 3, width, rngs=rngs, std=0.02, dtype=dtype)
        self.cls_token = nnx.Param(0.02 * jax.random.normal(rngs.params(), (width,)))
        self.mask_token = nnx.Param(0.02 * jax.random.normal(rngs.params(), (width,)))
        self.vision_positions = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (patches + 1 + POSITION_OFFSET, width)))
        self.text_positions = nnx.Param(0.02 * jax.random.normal(rngs.params(), (max_text_positions, width)))
        # Rising linearly to the last layer.
        self.drop_path_rates = tuple(float(rate) for rate in np.linspace(0.0, drop_path_rate, layers))

        def make(layer_rngs: nnx.Rngs) -> EncoderLayer:
            return EncoderLayer(width, heads, ffn_dim, rngs=layer_rngs, dtype=dtype, attention=attention)

        self.layers = stack_modules(make, layers, rngs) if scan else nnx.List([make(rngs) for _ in range(layers)])
        self.layer_norm = Multiway(lambda: layer_norm(width, rngs=rngs, dtype=dtype))
        self.remat = remat
        self.scan = scan
        self.unroll = unroll

    def embed_image(self, pixels: jax.Array, masked: jax.Array | None = None) -> jax.Array:
        """pixels (batch, height, width, 3) -> [cls, patches] + vision positions. masked: (batch, patches) bool."""
        p = self.patch_size
        x = self.patch_embed(rearrange(pixels.astype(self.dtype), "b (h ph) (w pw) c -> b (h w) (ph pw c)",
                                       ph=p, pw=p))
        if masked is not None:
            x = jnp.where(masked[..., None], self.mask_token[...].astype(x.dtype), x)
        cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)
        return x + self.vision_positions[POSITION_OFFSET:POSITION_OFFSET + x.shape[1]].astype(x.dtype)

    def embed_text(self, tokens: jax.Array) -> jax.Array:
        x = self.text_embed(tokens)
        return x + self.text_positions[POSITION_OFFSET:POSITION_OFFSET + x.shape[1]].astype(x.dtype)

    def __call__(self, pixels: jax.Array | None = None, tokens: jax.Array | None = None,
                 padding_mask: jax.Array | None = None, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Either or both inputs; padding_mask (batch, text length) is 1 on pads. Dropping paths needs rngs
        (None is the deterministic, evaluation forward)."""
        parts, pads = [], []
        if pixels is not None:
            parts.append(self.embed_image(pixels))
            pads.append(jnp.zeros(parts[-1].shape[:2], bool))
        split = parts[0].shape[1] if parts else 0
        if tokens is not None:
            parts.append(self.embed_text(tokens))
            pads.append(jnp.zeros(tokens.shape, bool) if padding_mask is None else padding_mask.astype(bool))
        if not parts:
            raise ValueError("BEiT3 needs pixels, tokens or both")
        x = jnp.concatenate(parts, axis=1)
        pad = jnp.concatenate(pads, axis=1)
        keep = None if tokens is None or padding_mask is None else ~pad
        x = jnp.where(pad[..., None], jnp.zeros((), x.dtype), x)
        rates = jnp.asarray(self.drop_path_rates, jnp.float32)
        dropping = rngs is not None and self.drop_path_rates[-1] > 0
        keys = jax.random.split(rngs.dropout(), len(rates)) if dropping else None
        if self.scan:
            if keys is None:
                x = scan_stack(self.layers, x, lambda layer, y, r: layer(y, split, keep, r, None), self.remat, rates,
                               unroll=self.unroll)
            else:
                x = scan_stack(self.layers, x, lambda layer, y, r, k: layer(y, split, keep, r, k), self.remat,
                               rates, keys, unroll=self.unroll)
        else:
            run = rematerialised(lambda layer, y, r, k: layer(y, split, keep, r, k), self.remat)
            for i, layer in enumerate(self.layers):
                x = run(layer, x, rates[i], None if keys is None else keys[i])
        return self.layer_norm(x, split)


class BEiT3Retrieval(nnx.Module, LogitScalars):
    """unilm's BEiT3ForRetrieval: CLS of a vision-only / text-only forward through a bias-free head."""

    def __init__(self, config, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        """config: a `jaxretrieval.config.ModelConfig` with family beit3."""
        multiway = config.multiway
        self.beit3 = BEiT3(layers=multiway.layers, width=multiway.width, heads=multiway.heads,
                           ffn_dim=multiway.ffn_dim, image_size=config.image.image_size,
                           patch_size=config.image.patch_size, vocab_size=config.text.vocab_size,
                           max_text_positions=multiway.max_text_positions, drop_path_rate=config.drop_path,
                           rngs=rngs, dtype=dtype, remat=multiway.remat, scan=config.scan_layers,
                           unroll=config.scan_unroll, attention=config.attention)
        self.pad_id = multiway.pad_id
        width = multiway.width
        self.vision_head = dense(width, width, rngs=rngs, std=0.02, dtype=dtype, use_bias=False)
        self.language_head = dense(width, width, rngs=rngs, std=0.02, dtype=dtype, use_bias=False)
        self.init_logit_scalars(config)  # unclamped, as unilm

    def image_features(self, pixels: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        """The encoder's vision CLS, before the head."""
        return self.beit3(pixels=pixels, rngs=rngs)[:, 0]

    def text_features(self, tokens: jax.Array, padding_mask: jax.Array | None = None, *,
                      rngs: nnx.Rngs | None = None) -> jax.Array:
        """The encoder's first text token ([bos]), before the head. padding_mask: 1 on pads (default: the
        positions holding the pad id)."""
        if padding_mask is None:
            padding_mask = tokens == self.pad_id
        return self.beit3(tokens=tokens, padding_mask=padding_mask, rngs=rngs)[:, 0]

    def encode_image(self, pixels: jax.Array, normalize: bool = False, *, rngs: nnx.Rngs | None = None) -> jax.Array:
        features = self.vision_head(self.image_features(pixels, rngs=rngs)).astype(jnp.float32)
        return l2_normalize(features) if normalize else features

    def encode_text(self, tokens: jax.Array, normalize: bool = False, *, padding_mask: jax.Array | None = None,
                    rngs: nnx.Rngs | None = None) -> jax.Array:
        features = self.language_head(self.text_features(tokens, padding_mask, rngs=rngs)).astype(jnp.float32)
        return l2_normalize(features) if normalize else features

    def __call__(self, pixels: jax.Array, tokens: jax.Array, *, rngs: nnx.Rngs | None = None
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Normalised image and text embeddings and the logit scale exp(t); rngs drop paths (training)."""
        return (self.encode_image(pixels, normalize=True, rngs=rngs),
                self.encode_text(tokens, normalize=True, rngs=rngs), self.scale())


def layer_depth(path: str, layers: int) -> int | np.ndarray:
    """unilm's layer id for layer-wise lr decay: embeddings 0, encoder layer i -> i + 1, the rest (final norm,
    heads, logit scale) layers + 1. `path` is a "/"-joined parameter path; a stacked layer parameter gets the ids
    of its layers, 1 ... layers, along its first axis."""
    found = re.search(r"(?:^|/)layers/(\d+)/", path)
    if found:
        return int(found.group(1)) + 1
    if re.search(r"(?:^|/)layers/", path):
        return np.arange(1, layers + 1)
    if re.search(r"(?:^|/)(text_embed|patch_embed|cls_token|mask_token|vision_positions|text_positions)(?:/|$)",
                 path):
        return 0
    return layers + 1


def _linear(sd: Mapping[str, np.ndarray], name: str, bias: bool = True) -> dict[str, np.ndarray]:
    out = {"kernel": np.asarray(sd[f"{name}.weight"]).T}
    if bias:
        out["bias"] = np.asarray(sd[f"{name}.bias"])
    return out


def _norm(sd: Mapping[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    return {"scale": np.asarray(sd[f"{name}.weight"]), "bias": np.asarray(sd[f"{name}.bias"])}


def _multiway(convert: Callable[[str], dict], name: str) -> dict[str, dict]:
    return {"A": convert(f"{name}.A"), "B": convert(f"{name}.B")}


def params_from_torchscale(state_dict: Mapping[str, Any], prefix: str = "beit3.") -> dict[str, Any]:
    """unilm BEiT3ForRetrieval / torchscale BEiT3 state dict (numpy or torch tensors) -> BEiT3Retrieval params.

    `prefix` is where the torchscale BEiT3 sits in the dict ("" for a bare torchscale model, whose result then
    has no heads or logit_scale)."""
    sd = {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v, np.float32)
          for k, v in state_dict.items()}
    p = prefix

    def linear(name: str) -> dict:
        return _linear(sd, name)

    def norm(name: str) -> dict:
        return _norm(sd, name)

    conv = sd[f"{p}vision_embed.proj.weight"]
    layers, i = {}, 0
    while f"{p}encoder.layers.{i}.self_attn.q_proj.A.weight" in sd:
        base = f"{p}encoder.layers.{i}"
        attn = {proj: _multiway(linear, f"{base}.self_attn.{proj}")
                for proj in ("q_proj", "k_proj", "v_proj", "out_proj")}
        attn["inner_attn_ln"] = _multiway(norm, f"{base}.self_attn.inner_attn_ln")
        layers[i] = {
            "self_attn_layer_norm": _multiway(norm, f"{base}.self_attn_layer_norm"),
            "self_attn": attn,
            "final_layer_norm": _multiway(norm, f"{base}.final_layer_norm"),
            "ffn": _multiway(lambda n: {"fc1": linear(f"{n}.fc1"), "ffn_layernorm": norm(f"{n}.ffn_layernorm"),
                                        "fc2": linear(f"{n}.fc2")}, f"{base}.ffn"),
        }
        i += 1
    beit3 = {
        "text_embed": {"embedding": sd[f"{p}text_embed.weight"]},
        # (out, c, ph, pw) -> rows in the (ph, pw, c) order embed_image flattens patches in.
        "patch_embed": {"kernel": conv.transpose(2, 3, 1, 0).reshape(-1, conv.shape[0]),
                        "bias": sd[f"{p}vision_embed.proj.bias"]},
        "cls_token": sd[f"{p}vision_embed.cls_token"].reshape(-1),
        "mask_token": sd[f"{p}vision_embed.mask_token"].reshape(-1),
        "vision_positions": sd[f"{p}encoder.embed_positions.A.weight"],
        "text_positions": sd[f"{p}encoder.embed_positions.B.weight"],
        "layers": layers,
        "layer_norm": _multiway(norm, f"{p}encoder.layer_norm"),
    }
    if "vision_head.weight" not in sd:
        return {"beit3": beit3}
    return {"beit3": beit3, "vision_head": _linear(sd, "vision_head", bias=False),
            "language_head": _linear(sd, "language_head", bias=False),
            "logit_scale": np.asarray(sd["logit_scale"]).reshape(())}
