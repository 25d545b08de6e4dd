"""BLIP-2's first-stage retrieval model as LAVIS's `blip2_feature_extractor` / `blip2` (pretrain_vitL) composes it: a
CLIP ViT in LAVIS's `clip_L` form (models/lavis_vit.py: every token after the blocks, no ln_post or projection),
`ln_vision`, and the Q-Former with its 32 query tokens, projections, ITM head and temperature (models/qformer.py).

Read in LAVIS (github:salesforce/LAVIS, lavis/models/blip2_models/blip2_qformer.py, blip2.py, clip_vit.py):
- image side: query outputs of the Q-Former cross-attending to ln_vision(ViT tokens), `vision_proj` per query,
  L2-normalised: (batch, 32, 256). BLIP-2's ITC scores an image by its best query (`max`); the PAB seed's scorer
  (blip2_infer.py) keeps only the first query's feature (`first`). `query_reduce` picks the evaluation's form;
  `encode_image` returns one vector per image for `first` and all 32 for `max` (scored by
  `retrieval.embed.text_image_scores`).
- text side: the Q-Former's text path (no queries, no cross-attention), `text_proj` of [CLS], L2-normalised.
- ITM: the query tokens in front of the text, fused with cross-attention to the image; `itm_head` on the query
  positions, averaged.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxretrieval.models.lavis_vit import depth, vision_tokens
from jaxretrieval.models.qformer import Blip2Retrieval
from jaxretrieval.models.vit import VisionTransformer

QUERY_REDUCE = ("max", "first")


class Blip2(nnx.Module):
    def __init__(self, *, vision: dict[str, Any], qformer: dict[str, Any], query_tokens: int = 32,
                 embed_dim: int = 256, temp: float = 0.07, query_reduce: str = "max", pad_id: int = 0,
                 rngs: nnx.Rngs, dtype: Any = jnp.float32):
        """vision: VisionTransformer keyword arguments (its `layers` all run: LAVIS's 23 for ViT-L/14); qformer:
        QFormer keyword arguments (encoder_width is the vision width)."""
        if query_reduce not in QUERY_REDUCE:
            raise ValueError(f"query_reduce must be one of {QUERY_REDUCE}, got {query_reduce!r}")
        self.pad_id, self.query_reduce = pad_id, query_reduce
        self.vision = VisionTransformer(**vision, rngs=rngs, dtype=dtype)
        self.retrieval = Blip2Retrieval(qformer={**qformer, "encoder_width": vision["width"]},
                                        query_tokens=query_tokens, embed_dim=embed_dim, temp=temp, rngs=rngs,
                                        dtype=dtype)

    @property
    def temp(self) -> nnx.Param:
        return self.retrieval.temp

    def keep(self, tokens: jax.Array) -> jax.Array:
        return tokens != self.pad_id

    def image_tokens(self, pixels: jax.Array) -> jax.Array:
        """(batch, 1 + patches, width): ln_vision of every ViT token (the Q-Former's cross-attention input)."""
        return self.retrieval.encode_image_embeds(vision_tokens(self.vision, pixels, self.vision_layers))

    @property
    def vision_layers(self) -> int:
        return depth(self.vision)

    def image_features(self, image_tokens: jax.Array) -> jax.Array:
        """(batch, queries, embed_dim), L2-normalised."""
        return self.retrieval.image_features(image_tokens)

    def text_hidden(self, tokens: jax.Array) -> jax.Array:
        return self.retrieval.text_hidden(tokens, self.keep(tokens))

    def text_features(self, text_hidden: jax.Array) -> jax.Array:
        return self.retrieval.text_features(text_hidden)

    def reduced(self, image_features: jax.Array) -> jax.Array:
        """The evaluation's image embedding: the first query's feature, or all of them (scored by their max)."""
        return image_features[:, 0] if self.query_reduce == "first" else image_features

    def encode_image(self, pixels: jax.Array, normalize: bool = True) -> jax.Array:
        del normalize  # ITC features are always normalised
        return self.reduced(self.image_features(self.image_tokens(pixels)))

    def encode_text(self, tokens: jax.Array, normalize: bool = True) -> jax.Array:
        del normalize
        return self.text_features(self.text_hidden(tokens))

    def match_logits(self, tokens: jax.Array, keep: jax.Array, image_tokens: jax.Array) -> jax.Array:
        """(batch, 2) ITM logits (index 1: match)."""
        return self.retrieval.match_logits(tokens, keep, image_tokens)

    @staticmethod
    def similarity(image_features: jax.Array, text_features: jax.Array) -> jax.Array:
        """(images, texts) cosine scores of BLIP-2's ITC: each image's best query."""
        return Blip2Retrieval.itc_scores(image_features, text_features, "max")
