"""BLIP-2 (pretrain_vitL): the PAB seed's third scorer, and a retrieval model to fine-tune with BLIP-2's recipe
(github:salesforce/LAVIS, lavis/models/blip2_models/blip2_qformer.py `Blip2Qformer.forward`; read for facts).

Per training pair (an image and a caption; `group` its image id), with V the (batch, 32, 256) query features and t
the text feature:
- ITC over the global batch: s(i, j) = max over the queries of V_i t_j / temp (one matrix serves both directions);
  targets spread over same-id pairs and smoothed, 0.9 x those + 0.1 / batch (LAVIS with image ids).
- ITM: one hard negative per side drawn from softmax(s) with same-id pairs excluded; the query tokens and the text
  fused with cross-attention to the image; itm_head on the query positions, averaged; cross entropy.
Loss = ITC + ITM; the temperature is clamped to [0.001, 0.5] before each step. The ViT trains with the rest, as
LAVIS's retrieval fine-tuning (freeze_vit: False); the seed itself scores with the released weights, untuned.

Evaluation: text_to_image (PAB) or image_text (COCO, Flickr30K: the whole score matrix, as the images carry 32
vectors) by `blip2.query_reduce` (max: BLIP-2's ITC; first: the seed's scorer, the first query's feature);
text_to_image optionally re-scores each query's top k by the ITM logit (eval.rerank_k).

Left out, for now: BLIP-2's image-grounded text generation loss (ITG, the [DEC] token), which its retrieval
fine-tuning adds; ITM re-ranking for image_text; freezing the ViT.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxretrieval.config import Config
from jaxretrieval.config_checks import CAPTION_KINDS, no_layer_recipe
from jaxretrieval.losses.contrastive import positive_mask, soft_cross_entropy
from jaxretrieval.losses.matching import HardNegatives, itm_loss, matching_batch, sample_negatives
from jaxretrieval.models.blip2 import QUERY_REDUCE, Blip2
from jaxretrieval.retrieval.rerank import CrossEncoder
from jaxretrieval.sharding import under_mesh
from jaxretrieval.systems import register
from jaxretrieval.systems.base import Check, GradFn, System


@dataclasses.dataclass
class Blip2Settings:
    query_tokens: int = 32
    cross_every: int = 2  # the Q-Former's cross-attention frequency
    max_positions: int = 512
    text_init_std: float = 0.02
    temp: float = 0.07
    temp_range: tuple[float, float] = (0.001, 0.5)
    label_smooth: float = 0.1
    query_reduce: str = "max"  # evaluation: max (BLIP-2's ITC) or first (the PAB seed's scorer)
    itc_weight: float = 1.0
    itm_weight: float = 1.0


def blip2_itc(similarity: jax.Array, ids: jax.Array, temp: jax.Array, smoothing: float) -> jax.Array:
    """LAVIS's ITC with image ids over an (images, texts) cosine matrix (each image's best query)."""
    logits = similarity / temp
    positives = positive_mask(ids, ids)
    i2t = soft_cross_entropy(logits, positives, smoothing).mean()
    t2i = soft_cross_entropy(logits.T, positives.T, smoothing).mean()
    return 0.5 * (i2t + t2i)


def blip2_negatives(key: jax.Array, similarity: jax.Array, ids: jax.Array, temp: jax.Array) -> HardNegatives:
    """One negative text per image and image per text, drawn from softmax(s / temp) of the max-over-queries
    similarity, same-id pairs excluded (X2-VLM's sampler, as LAVIS's)."""
    scaled = jax.lax.stop_gradient(similarity / temp)
    image_key, text_key = jax.random.split(key)
    text_for_image, text_valid = sample_negatives(image_key, scaled, ids, ids)
    image_for_text, image_valid = sample_negatives(text_key, scaled.T, ids, ids)
    return HardNegatives(text_for_image, image_for_text, text_valid, image_valid)


def blip2_cross_encoder(graphdef: nnx.GraphDef, mesh: Any) -> CrossEncoder:
    def image(params: Any, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        model = nnx.merge(graphdef, params)
        tokens = model.image_tokens(pixels)
        return model.reduced(model.image_features(tokens)), tokens

    def text(params: Any, tokens: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        model = nnx.merge(graphdef, params)
        return model.text_features(model.text_hidden(tokens)), (tokens, model.keep(tokens))

    def pair_scores(params: Any, texts: tuple[jax.Array, jax.Array], images: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, params).match_logits(*texts, images)[:, 1]

    jit = lambda fn: jax.jit(under_mesh(fn, mesh))  # noqa: E731
    return CrossEncoder(jit(image), jit(text), jit(pair_scores))


class Blip2System(System):
    name = "blip2"
    summary = "BLIP-2 (pretrain_vitL): CLIP ViT-L + Q-Former, ITC (max over queries) + ITM; the PAB seed's scorer"
    families = ("blip2",)
    losses = ("blip2",)
    protocols = ("text_to_image", "image_text")
    data_kinds = CAPTION_KINDS
    Section = Blip2Settings
    reranks = True

    def check(self, config: Config) -> list[Check]:
        s, model = config.section, config.model
        low, high = s.temp_range
        return [
            *no_layer_recipe(config),
            (s.query_reduce in QUERY_REDUCE, f"blip2.query_reduce must be one of {', '.join(QUERY_REDUCE)}"),
            (model.text.layers % s.cross_every == 0, "model.text.layers must be a multiple of blip2.cross_every"),
            (model.text.context_length <= s.max_positions, "model.text.context_length must be <= "
                                                           "blip2.max_positions"),
            (config.data.tokenizer_kind == "wordpiece" or config.data.tokenizer == "checkpoint",
             "system blip2 reads captions with BERT's WordPiece: data.tokenizer_kind: wordpiece (data.tokenizer a "
             "vocab.txt), or data.tokenizer: checkpoint"),
            (0 < low <= s.temp <= high, "blip2.temp must lie in blip2.temp_range, whose low end is > 0"),
            (config.train.micro_batches == 1, "system blip2 trains on whole batches (train.micro_batches: 1)"),
        ]

    def build(self, config: Config, *, rngs: nnx.Rngs, dtype: Any) -> Blip2:
        s, image, text = config.section or Blip2Settings(), config.model.image, config.model.text
        vision = dict(image_size=image.image_size, patch_size=image.patch_size, width=image.width,
                      layers=image.layers, heads=image.heads, mlp_ratio=image.mlp_ratio,
                      embed_dim=config.model.embed_dim, activation=config.model.activation, remat=image.remat,
                      scan=config.model.scan_layers, unroll=config.model.scan_unroll)
        qformer = dict(vocab_size=text.vocab_size, width=text.width, layers=text.layers, heads=text.heads,
                       ffn_dim=int(text.mlp_ratio * text.width), max_positions=s.max_positions,
                       cross_every=s.cross_every, remat=text.remat, unroll=config.model.scan_unroll,
                       init_std=s.text_init_std)
        return Blip2(vision=vision, qformer=qformer, query_tokens=s.query_tokens, embed_dim=config.model.embed_dim,
                     temp=s.temp, query_reduce=s.query_reduce, rngs=rngs, dtype=dtype)

    def before_step(self, config: Config) -> Callable[[Any], Any]:
        low, high = config.section.temp_range

        def clamp(params: Any) -> Any:
            retrieval = params["retrieval"]
            return {**params, "retrieval": {**retrieval, "temp": jnp.clip(retrieval["temp"], low, high)}}

        return clamp

    def grad_fn(self, config: Config, graphdef: nnx.GraphDef, mesh: Any) -> GradFn:
        s = config.section

        def losses(params: Any, batch: dict, key: jax.Array) -> tuple[jax.Array, dict]:
            model = nnx.merge(graphdef, params)
            ids, temp = batch["group"], model.temp[...]
            image_tokens = model.image_tokens(batch["image"])
            similarity = model.similarity(model.image_features(image_tokens),
                                          model.text_features(model.text_hidden(batch["text"])))
            terms = {"loss_itc": blip2_itc(similarity, ids, temp, s.label_smooth)}
            pairs = matching_batch(image_tokens, (batch["text"], model.keep(batch["text"])),
                                   blip2_negatives(key, similarity, ids, temp))
            terms["loss_itm"] = itm_loss(model.match_logits(*pairs.texts, pairs.images), pairs.labels, pairs.weights)
            total = s.itc_weight * terms["loss_itc"] + s.itm_weight * terms["loss_itm"]
            return total, {**terms, "temp": temp}

        def fn(params: Any, batch: dict, key: jax.Array) -> tuple[Any, dict, Any, Any]:
            (loss, metrics), grads = jax.value_and_grad(losses, has_aux=True)(params, batch, key)
            return loss, metrics, grads, None

        return fn

    def cross_encoder(self, config: Config, graphdef: nnx.GraphDef, mesh: Any) -> CrossEncoder:
        return blip2_cross_encoder(graphdef, mesh)


register(Blip2System())
__all__ = ["Blip2Settings", "Blip2System", "blip2_itc", "blip2_negatives"]
