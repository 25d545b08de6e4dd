"""BLIP-2's Q-Former and its first-stage retrieval model (ITC + ITM), from the image embeddings of a frozen ViT on.

Read in transformers (models/blip_2/modeling_blip_2.py: `Blip2QFormerModel`, `Blip2QFormerLayer`,
`Blip2TextEmbeddings`, `Blip2ForImageTextRetrieval`) and LAVIS (github:salesforce/LAVIS,
lavis/models/blip2_models/Qformer.py, blip2.py, blip2_qformer.py `Blip2Qformer`):

- The Q-Former is a post-LN BERT (bert-base: width 768, 12 layers, 12 heads, ffn 3072, eps 1e-12, erf GELU) whose
  sequence may begin with `q` learned query embeddings. Its embeddings are word + absolute position of the text only
  (positions count from 0 at the first text token; the queries get none) and no token types; the queries are put in
  front and one LayerNorm normalises the whole sequence (LAVIS `BertEmbeddings.LayerNorm`, transformers'
  `Blip2QFormerModel.layernorm`). Vocabulary: bert-base-uncased's 30522 + BLIP-2's added [DEC] = 30523.
- Every layer self-attends over the whole sequence; layers 0, f, 2f, ... (f = `cross_every`, 2) then cross-attend
  from the query positions only to the `encoder_width`-wide image embeddings (1408 EVA ViT-g, 1024 CLIP ViT-L).
  The query positions go through their own feed-forward (`intermediate_query` / `output_query`), the text positions
  through BERT's (`intermediate` / `output`). With no queries (the text-only ITC path) no layer cross-attends.
- Three uses: `queries` (queries only, reading the image: the ITC image side, `Qformer.bert(query_embeds=...)`),
  `text` (text only: the ITC text side), `fused` (queries then text, self-attention mask ones on the queries and the
  text's own padding, cross-attention to the image from the queries: the ITM path).
- Layers are stacked and scanned in units of `cross_every` layers (the first cross-attends, the others do not, as
  models/bert.py's fusion stack), so parameters read `encoder/layers/{cross,rest/j}/...` with a leading unit axis;
  HF layer i is at the unit and place `bert.layer_path(i, fusion_from=0)` gives. The number of query positions is
  static (a Python int in the scan body).

Retrieval (`Blip2Retrieval`, LAVIS `Blip2Qformer` / `blip2_feature_extractor`): `ln_vision` (LayerNorm eps 1e-5,
computed in fp32) on the ViT's tokens, `query_tokens` (1, q, width) ~ N(0, 0.02), `vision_proj` / `text_proj`
Linear(width, 256), `itm_head` Linear(width, 2), `temp` 0.07. ITC: the q query outputs projected and normalised
against the normalised projection of the text's [CLS]; the image-text score is the max over the queries (LAVIS
`compute_sim_matrix` and its loss; `reduce="first"` takes query 0 only, as the PAB seed's scorer does). ITM: the mean
over the query positions of `itm_head` on the fused output (index 1: match). The ViT itself is not here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxretrieval.models.bert import Embeddings, FusionUnit, ITMHead, Layer, Stack, _gelu, _norm, layer_path
from jaxretrieval.models.clip import l2_normalize
from jaxretrieval.models.layers import dense, layer_norm
from jaxretrieval.models.stacking import relayout

VOCAB_SIZE = 30523  # bert-base-uncased + [DEC]
IGNORED = re.compile(r"(^|\.)position_ids$")  # a buffer in both checkpoints, not a parameter


class QFormerEmbeddings(Embeddings):
    """Word + position embeddings of the text (no token types), the query embeddings in front, one LayerNorm."""

    def __init__(self, vocab_size: int, width: int, max_positions: int, *, rngs: nnx.Rngs, dtype: Any):
        super().__init__(vocab_size, width, max_positions, 1, rngs=rngs, dtype=dtype)
        self.token_type = None  # the Q-Former has none

    def __call__(self, tokens: jax.Array | None = None, queries: jax.Array | None = None) -> jax.Array:
        parts = []
        if queries is not None:
            parts.append(queries.astype(self.word.dtype))
        if tokens is not None:
            parts.append(self.word(tokens) + self.position(jnp.arange(tokens.shape[1])[None]))
        return self.norm(parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1))


def _feed_forward(intermediate: nnx.Linear, output: nnx.Linear, norm: nnx.LayerNorm, x: jax.Array) -> jax.Array:
    return norm(x + output(_gelu(intermediate(x))))


class QFormerLayer(Layer):
    """models/bert.py's Layer (self-attention, optional cross-attention, the text feed-forward) with a second
    feed-forward for the query positions; cross-attention reads the image from those positions only."""

    def __init__(self, width: int, heads: int, ffn_dim: int, *, cross: bool, encoder_width: int, rngs: nnx.Rngs,
                 dtype: Any, attention: str = "xla", init_std: float = 0.02):
        super().__init__(width, heads, ffn_dim, cross=cross, encoder_width=encoder_width, rngs=rngs, dtype=dtype,
                         attention=attention, init_std=init_std)
        self.intermediate_query = dense(width, ffn_dim, rngs=rngs, std=init_std, dtype=dtype)
        self.output_query = dense(ffn_dim, width, rngs=rngs, std=init_std, dtype=dtype)
        self.norm_query = _norm(width, rngs, dtype)

    def __call__(self, x: jax.Array, keep: jax.Array | None, image: jax.Array | None, image_keep: jax.Array | None,
                 queries: int) -> jax.Array:
        """x: (batch, queries + text, width), its first `queries` positions the query tokens."""
        x = self.attention(x, keep)
        if not queries:
            return _feed_forward(self.intermediate, self.output, self.norm, x)
        q = x[:, :queries]
        if self.crossattention is not None:
            if image is None:
                raise ValueError("a cross-attention layer with query tokens needs the image embeddings")
            q = self.crossattention(q, image_keep, context=image)
        q = _feed_forward(self.intermediate_query, self.output_query, self.norm_query, q)
        if x.shape[1] == queries:
            return q
        text = _feed_forward(self.intermediate, self.output, self.norm, x[:, queries:])
        return jnp.concatenate([q, text], axis=1)


class QFormerUnit(FusionUnit):
    """`cross_every` Q-Former layers, the first with cross-attention."""

    def __call__(self, x, keep, image, image_keep, queries):
        x = self.cross(x, keep, image, image_keep, queries)
        for layer in self.rest:
            x = layer(x, keep, image, image_keep, queries)
        return x


class QFormer(nnx.Module):
    """The Q-Former (see the module docstring). Query embeddings come from the caller (Blip2Retrieval holds them,
    as LAVIS's Blip2Qformer and transformers' Blip2Model do), (1 or batch, queries, width)."""

    def __init__(self, *, vocab_size: int = VOCAB_SIZE, width: int = 768, layers: int = 12, heads: int = 12,
                 ffn_dim: int = 3072, max_positions: int = 512, cross_every: int = 2, encoder_width: int = 1408,
                 rngs: nnx.Rngs, dtype: Any = jnp.float32, remat: str = "none", unroll: int = 1,
                 attention: str = "xla", init_std: float = 0.02):
        if cross_every < 1 or layers % cross_every:
            raise ValueError(f"{layers} layers do not split into units of cross_every={cross_every}")
        self.sizes = (("layers", layers), ("cross_every", cross_every))
        self.embeddings = QFormerEmbeddings(vocab_size, width, max_positions, rngs=rngs, dtype=dtype)

        def layer(cross: bool, layer_rngs: nnx.Rngs) -> QFormerLayer:
            return QFormerLayer(width, heads, ffn_dim, cross=cross, encoder_width=encoder_width, rngs=layer_rngs,
                                dtype=dtype, attention=attention, init_std=init_std)

        self.encoder = Stack(lambda r: QFormerUnit(lambda cross: layer(cross, r), cross_every), layers // cross_every,
                             rngs, remat, unroll)

    def layers(self, x: jax.Array, keep: jax.Array | None, image: jax.Array | None = None,
               image_keep: jax.Array | None = None, queries: int = 0) -> jax.Array:
        """Every layer over embedded states x (batch, queries + text, width)."""
        image = None if image is None else image.astype(x.dtype)
        return self.encoder(x, keep, image, image_keep, queries)

    @staticmethod
    def _batched(query_embeds: jax.Array, batch: int) -> jax.Array:
        return jnp.broadcast_to(query_embeds, (batch, *query_embeds.shape[1:]))

    def queries(self, query_embeds: jax.Array, image_embeds: jax.Array,
                image_keep: jax.Array | None = None) -> jax.Array:
        """(batch, queries, width): the queries reading the image embeddings (batch, n, encoder_width); image_keep
        (batch, n) bool, False on padded image tokens (LAVIS passes all ones)."""
        q = self._batched(query_embeds, image_embeds.shape[0])
        return self.layers(self.embeddings(queries=q), None, image_embeds, image_keep, q.shape[1])

    def text(self, tokens: jax.Array, keep: jax.Array | None = None) -> jax.Array:
        """(batch, length, width): the text alone (no queries, no cross-attention); keep False on padding."""
        return self.layers(self.embeddings(tokens), keep)

    def fused(self, query_embeds: jax.Array, tokens: jax.Array, keep: jax.Array | None, image_embeds: jax.Array,
              image_keep: jax.Array | None = None) -> jax.Array:
        """(batch, queries + length, width): queries and text together, the queries cross-attending to the image."""
        batch, length = tokens.shape
        q = self._batched(query_embeds, batch)
        keep = jnp.ones((batch, length), bool) if keep is None else keep.astype(bool)
        keep = jnp.concatenate([jnp.ones((batch, q.shape[1]), bool), keep], axis=1)
        return self.layers(self.embeddings(tokens, q), keep, image_embeds, image_keep, q.shape[1])


class Blip2Retrieval(nnx.Module):
    """BLIP-2's first-stage model without its ViT: image embeddings (after `encode_image_embeds`) in, ITC features
    and ITM logits out. qformer: QFormer keyword arguments."""

    def __init__(self, *, qformer: dict[str, Any] | None = None, query_tokens: int = 32, embed_dim: int = 256,
                 temp: float = 0.07, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        kwargs = dict(qformer or {})
        width = kwargs.get("width", 768)
        std = kwargs.get("init_std", 0.02)
        self.ln_vision = layer_norm(kwargs.get("encoder_width", 1408), rngs=rngs, dtype=jnp.float32)
        self.query_tokens = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (1, query_tokens, width)))
        self.qformer = QFormer(**kwargs, rngs=rngs, dtype=dtype)
        self.vision_proj = dense(width, embed_dim, rngs=rngs, std=std, dtype=dtype)
        self.text_proj = dense(width, embed_dim, rngs=rngs, std=std, dtype=dtype)
        self.itm_head = ITMHead(width, rngs=rngs, dtype=dtype, init_std=std)
        self.temp = nnx.Param(jnp.asarray(temp, jnp.float32))

    def encode_image_embeds(self, vision_tokens: jax.Array) -> jax.Array:
        """`ln_vision` on the ViT's output tokens (batch, n, encoder_width), in fp32 (LAVIS's fp16-safe LayerNorm)."""
        return self.ln_vision(vision_tokens.astype(jnp.float32))

    def queries(self, image_embeds: jax.Array, image_keep: jax.Array | None = None) -> jax.Array:
        return self.qformer.queries(self.query_tokens[...], image_embeds, image_keep)

    def text_hidden(self, tokens: jax.Array, keep: jax.Array | None = None) -> jax.Array:
        return self.qformer.text(tokens, keep)

    def image_features(self, image_embeds: jax.Array, image_keep: jax.Array | None = None) -> jax.Array:
        """(batch, queries, embed_dim) L2-normalised projections of the query outputs."""
        return l2_normalize(self.vision_proj(self.queries(image_embeds, image_keep)).astype(jnp.float32))

    def text_features(self, text_hidden: jax.Array) -> jax.Array:
        """(batch, embed_dim) L2-normalised projection of the text's [CLS] state."""
        return l2_normalize(self.text_proj(text_hidden[:, 0]).astype(jnp.float32))

    @staticmethod
    def itc_scores(image_feats: jax.Array, text_feats: jax.Array, reduce: str = "max") -> jax.Array:
        """(images, texts) cosine scores (no temperature): the max over the queries of each image (BLIP-2) or its
        first query only (`first`, the PAB seed's scorer)."""
        if reduce == "first":
            return image_feats[:, 0] @ text_feats.T
        if reduce != "max":
            raise ValueError(f"reduce must be 'max' or 'first', got {reduce!r}")
        return jnp.max(jnp.einsum("iqd,td->itq", image_feats, text_feats), axis=-1)

    def match_logits(self, tokens: jax.Array, keep: jax.Array | None, image_embeds: jax.Array,
                     image_keep: jax.Array | None = None) -> jax.Array:
        """(batch, 2) ITM logits (index 1: match): itm_head on the fused query positions, averaged over them."""
        fused = self.qformer.fused(self.query_tokens[...], tokens, keep, image_embeds, image_keep)
        return jnp.mean(self.itm_head(fused[:, :self.query_tokens.shape[1]]), axis=1)


# ---- weights ------------------------------------------------------------------------------------------------------
Pairs = list[tuple[str, str, bool]]  # (our per-layer path, their key, transposed)


def _linear(ours: str, theirs: str) -> Pairs:
    return [(f"{ours}/kernel", f"{theirs}.weight", True), (f"{ours}/bias", f"{theirs}.bias", False)]


def _layer_norm(ours: str, theirs: str) -> Pairs:
    return [(f"{ours}/scale", f"{theirs}.weight", False), (f"{ours}/bias", f"{theirs}.bias", False)]


def _attention(ours: str, theirs: str, inner: str) -> Pairs:
    pairs = [p for n in ("query", "key", "value") for p in _linear(f"{ours}/{n}", f"{theirs}.{inner}.{n}")]
    return pairs + _linear(f"{ours}/output", f"{theirs}.output.dense") + _layer_norm(f"{ours}/norm",
                                                                                  f"{theirs}.output.LayerNorm")


def _layer_pairs(layers: int, cross_every: int, prefix: str, inner: str, text_ffn: bool = True) -> Pairs:
    """Pairs of every layer; `inner` names the q/k/v module (`attention` in transformers, `self` in LAVIS)."""
    pairs = []
    for i in range(layers):
        _, unit, place = layer_path(i, layers=layers, fusion_from=0, cross_every=cross_every)
        ours, theirs = f"encoder/layers/{unit}/{place}", f"{prefix}encoder.layer.{i}"
        pairs += _attention(f"{ours}/attention", f"{theirs}.attention", inner)
        if place == "cross":
            pairs += _attention(f"{ours}/crossattention", f"{theirs}.crossattention", inner)
        for s in ("_query", "") if text_ffn else ("_query",):
            pairs += _linear(f"{ours}/intermediate{s}", f"{theirs}.intermediate{s}.dense")
            pairs += _linear(f"{ours}/output{s}", f"{theirs}.output{s}.dense")
            pairs += _layer_norm(f"{ours}/norm{s}", f"{theirs}.output{s}.LayerNorm")
    return pairs


def _layout(state: dict[str, Any], prefix: str, inner: str) -> tuple[int, int]:
    """(layers, cross_every) read off the keys: the layer count and the spacing of the cross-attention layers."""
    def indices(part: str) -> list[int]:
        pattern = re.compile(rf"{re.escape(prefix)}encoder\.layer\.(\d+)\.{part}\.{inner}\.query\.weight$")
        return sorted({int(m.group(1)) for key in state if (m := pattern.match(key))})

    layers, cross = indices("attention"), indices("crossattention")
    if not layers:
        raise ValueError(f"no Q-Former layers under '{prefix}encoder.layer.' (keys like "
                         f"'{prefix}encoder.layer.0.attention.{inner}.query.weight')")
    every = cross[1] - cross[0] if len(cross) > 1 else len(layers)
    if layers != list(range(len(layers))) or cross != list(range(0, len(layers), every)) or len(layers) % every:
        raise ValueError(f"layers {layers} with cross-attention in {cross}: not a Q-Former of whole units of "
                         f"cross_every layers starting at layer 0")
    return len(layers), every


def _take(state: dict[str, Any], pairs: Pairs, owned: Iterable[str], skip: re.Pattern[str] = IGNORED) -> dict:
    """Our flat {path: array}; their keys that `pairs` lacks but that start with one of `owned` (and do not match
    `skip`), and pairs whose key is missing, are one ValueError."""
    missing = [theirs for _, theirs, _ in pairs if theirs not in state]
    used = {theirs for _, theirs, _ in pairs}
    owned = tuple(owned)
    unplaced = sorted(k for k in state if k.startswith(owned) and k not in used and not skip.search(k))
    if missing or unplaced:
        raise ValueError(f"Q-Former weights do not fit: {len(missing)} missing {missing}; {len(unplaced)} unplaced "
                         f"{unplaced}")
    return {ours: np.asarray(state[theirs]).T if transposed else np.asarray(state[theirs])
            for ours, theirs, transposed in pairs}


def hf_pairs(layers: int, cross_every: int, prefix: str = "", *, embeddings: str | None = None,
             text_ffn: bool = True) -> Pairs:
    pairs = _layer_norm("embeddings/norm", f"{prefix}layernorm")
    if embeddings is not None:
        pairs += [("embeddings/word/embedding", f"{embeddings}word_embeddings.weight", False),
                  ("embeddings/position/embedding", f"{embeddings}position_embeddings.weight", False)]
    return pairs + _layer_pairs(layers, cross_every, prefix, "attention", text_ffn)


def flat_from_hf(state: dict[str, Any], prefix: str = "", *, embeddings: str | None = None,
                 text_ffn: bool = True) -> dict[str, np.ndarray]:
    """QFormer's per-layer flat parameters from transformers' `Blip2QFormerModel` state under `prefix` ("" for the
    model itself, "qformer." inside Blip2Model / Blip2ForImageTextRetrieval). That model takes its input embedded:
    the word / position tables are mapped only from `embeddings` (Blip2ForImageTextRetrieval's "embeddings.", a
    `Blip2TextEmbeddings`); without, the result lacks them. text_ffn=False: the state has no text feed-forward
    (`use_qformer_text_input` off, as in the captioning models); the result then lacks it too."""
    layers, every = _layout(state, prefix, "attention")
    pairs = hf_pairs(layers, every, prefix, embeddings=embeddings, text_ffn=text_ffn)
    return _take(state, pairs, [prefix] + ([embeddings] if embeddings else []))


def lavis_pairs(layers: int, cross_every: int) -> Pairs:
    """Pairs of LAVIS `Blip2Qformer` (paths of Blip2Retrieval: `qformer/...`, `query_tokens`, ...)."""
    bert = "Qformer.bert."
    qformer = [("embeddings/word/embedding", f"{bert}embeddings.word_embeddings.weight", False),
               ("embeddings/position/embedding", f"{bert}embeddings.position_embeddings.weight", False),
               *_layer_norm("embeddings/norm", f"{bert}embeddings.LayerNorm"),
               *_layer_pairs(layers, cross_every, bert, "self")]
    heads = [("query_tokens", "query_tokens", False), ("temp", "temp", False), *_layer_norm("ln_vision", "ln_vision"),
             *_linear("vision_proj", "vision_proj"), *_linear("text_proj", "text_proj"),
             *_linear("itm_head/out", "itm_head")]
    return [(f"qformer/{ours}", theirs, t) for ours, theirs, t in qformer] + heads


def flat_from_lavis(state: dict[str, Any]) -> dict[str, np.ndarray]:
    """Blip2Retrieval's per-layer flat parameters from a LAVIS `blip2` / `blip2_feature_extractor` state dict
    (checkpoint["model"]). The ViT (`visual_encoder.*`) and the captioning head (`Qformer.cls.*`) are not ours and
    are passed over; any other key not placed, or one missing, is a ValueError listing them all."""
    layers, every = _layout(state, "Qformer.bert.", "self")
    owned = ("Qformer.", "query_tokens", "temp", "ln_vision.", "vision_proj.", "text_proj.", "itm_head.")
    skip = re.compile(rf"{IGNORED.pattern}|^Qformer\.cls\.")
    return _take(state, lavis_pairs(layers, every), owned, skip)


def load_flat(module: nnx.Module, flat: dict[str, Any]) -> None:
    """Put per-layer flat parameters into `module` (its layers stacked); every parameter must be given."""
    template = nnx.to_pure_dict(nnx.state(module, nnx.Param))
    nnx.update(module, relayout({k: jnp.asarray(v) for k, v in flat.items()}, template))


__all__ = ["Blip2Retrieval", "QFormer", "QFormerLayer", "flat_from_hf", "flat_from_lavis", "hf_pairs",
           "lavis_pairs", "load_flat"]
