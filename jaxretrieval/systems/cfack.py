"""CFACK: text-to-person retrieval on X2-VLM with momentum cross-knowledge ITC, ITM on hard negatives, MLM, and ITM
re-ranking at evaluation (github:AIVIETNAMResearch/Pedestrian-Matching, models/model_retrieval.py `CFACKCModel`,
Retrieval.py, dataset/__init__.py; read for facts).

Per training pair (a person image and one of its captions) the batch holds two image views and two captions:
v1 = online towers on the strong view (UniformAugment, flip, random erasing) and t1 on the augmented caption (EDA);
v2 / t2 = the momentum towers on the weak view (flip) and the original caption. With C(a, b) the symmetric soft-target
InfoNCE over the global batch, same person = positive (`losses.contrastive_loss` with person ids):
    ITC = [C(v1,t1) + C(v1,t2) + C(v2,t1) + C(v2,t2) + C(v1,v2) + C(t1,t2) + 0.5 C(v1,cnn)] / 6.5
(/ 6 without the CNN branch; without momentum C(v1,t1) [+ C(v1,cnn), each pair its own group, as the original]).
ITM: one hard negative per side drawn from softmax(v1 t1^T / temp) with same-person pairs excluded, scored by the
fused [CLS] of (t1, image tokens of v1). MLM: the original caption masked (whole words, p 0.5, at most 12) fused with
v1's image tokens. Loss = ITC + ITM + MLM. The temperature is clamped to [0.001, 0.5] before each step.

Differences from the original, on purpose: the ITM text mask is the augmented caption's own (the original passes
the original caption's mask with the augmented caption's states); evaluation images are not randomly flipped (the
original's test transform flips them at random); BERT dropout is not applied.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxretrieval.config import Config
from jaxretrieval.config_checks import no_layer_recipe
from jaxretrieval.data.masking import WholeWordMasking, masked_positions
from jaxretrieval.data.pedes import PEDES_KINDS
from jaxretrieval.data.person_views import CnnView, StrongView, WeakView
from jaxretrieval.data.pipeline import data_root
from jaxretrieval.data.sources import CaptionRecord, DataError
from jaxretrieval.data.transforms import load_image
from jaxretrieval.losses.contrastive import contrastive_loss
from jaxretrieval.losses.matching import hard_negatives, itm_loss, matching_batch, mlm_loss
from jaxretrieval.models.momentum import momentum_update
from jaxretrieval.models.xvlm import XVLM
from jaxretrieval.retrieval.rerank import CrossEncoder, fusion_cross_encoder
from jaxretrieval.systems import register
from jaxretrieval.systems.base import Check, GradFn, System
from jaxretrieval.tasks import Task, caption_stream_task

Pair = tuple[float, float]


@dataclasses.dataclass
class CFACKSettings:
    fusion_from: int = 12  # the first BERT layer that cross-attends to the image tokens (X2-VLM: 12 of 18)
    max_positions: int = 512  # BERT's position table
    type_vocab_size: int = 2
    itm_hidden: int = 0  # the ITM head's hidden width; 0: 2 x the text width (X2-VLM's build_mlp)
    drop_path: float = 0.1  # the vision tower's stochastic depth (X2-VLM's drop_path_rate)
    text_init_std: float = 0.02  # BERT's initializer_range, for weights not read from train.init_from
    temp: float = 0.07
    temp_range: Pair = (0.001, 0.5)
    momentum: float = 0.995  # 0: no momentum towers, ITC = C(v1, t1) (+ C(v1, cnn))
    mlm: bool = True
    mask_prob: float = 0.5
    max_masks: int = 12
    itc_weight: float = 1.0
    itm_weight: float = 1.0
    mlm_weight: float = 1.0
    # The CNN branch: "" (none) or resnet50 (timm's, num_classes = embed_dim), on a 224-px view; its term's weight.
    cnn: str = ""
    cnn_image_size: int = 224
    cnn_width: int = 64  # the ResNet's stem channels (64: ResNet-50; smaller for tests)
    cnn_weight: float = 0.5
    # Training views: random erasing probability of the strong view, and UniformAugment on it.
    erasing_p: float = 0.6
    uniform_augment: bool = True
    # The augmented caption t1: eda (CFACK's text_augment "eda") or none (t1 = the original caption); eda's
    # synonyms: builtin (a small table covering the demo captions), wordnet (needs the [wordnet] extra) or a file
    # under data.root (JSON {word: [synonyms]} or TSV).
    caption_augment: str = "eda"
    synonyms: str = "builtin"


def soft_itc(pairs: list[tuple[jax.Array, jax.Array, float]], ids: jax.Array | None, temp: jax.Array) -> jax.Array:
    """sum(w C(a, b)) / sum(w) over (a, b, w); C the symmetric InfoNCE at 1 / temp, same id = positive."""
    total = sum(w * contrastive_loss(a, b, 1.0 / temp, ids, ids) for a, b, w in pairs)
    return total / sum(w for _, _, w in pairs)


def cfack_itc(v1: jax.Array, t1: jax.Array, ids: jax.Array, temp: jax.Array, v2: jax.Array | None = None,
              t2: jax.Array | None = None, cnn: jax.Array | None = None, cnn_weight: float = 0.5) -> jax.Array:
    """CFACK's ITC (see the module docstring) over L2-normalised (batch, d) features and person ids."""
    if v2 is None:
        loss = contrastive_loss(v1, t1, 1.0 / temp, ids, ids)
        return loss if cnn is None else loss + contrastive_loss(v1, cnn, 1.0 / temp)
    pairs = [(v1, t1, 1.0), (v1, t2, 1.0), (v2, t1, 1.0), (v2, t2, 1.0), (v1, v2, 1.0), (t1, t2, 1.0)]
    return soft_itc(pairs + ([(v1, cnn, cnn_weight)] if cnn is not None else []), ids, temp)


class CFACKEncode(grain.transforms.RandomMap):
    """CaptionRecord -> the views and token rows of one training pair; every draw from grain's per-element rng, so
    a resumed run sees what an uninterrupted one would. None for an unreadable image when skipping is allowed."""

    def __init__(self, weak: WeakView, strong: StrongView, cnn: CnnView | None, tokenizer: Any,
                 masking: WholeWordMasking | None, augment: Callable[[str, np.random.Generator], str] | None,
                 where: Callable[[CaptionRecord], str], skip_bad: bool):
        self.weak, self.strong, self.cnn = weak, strong, cnn
        self.tokenizer, self.masking, self.augment = tokenizer, masking, augment
        self.where, self.skip_bad = where, skip_bad

    def random_map(self, record: CaptionRecord, rng: np.random.Generator) -> dict[str, np.ndarray] | None:
        try:
            image = load_image(record.image)
        except DataError as e:
            if not self.skip_bad:
                raise DataError(f"{self.where(record)}: {e}") from None
            return None
        original = self.tokenizer(record.caption)[0]
        augmented = self.augment(record.caption, rng) if self.augment is not None else record.caption
        out = {"image": self.strong(image, rng), "image_momentum": self.weak(image, rng),
               "text": self.tokenizer(augmented)[0], "text_momentum": original, "group": np.int32(record.group),
               "origin": np.array([record.file, record.line], np.int32)}
        if self.cnn is not None:
            out["image_cnn"] = self.cnn(image)
        if self.masking is not None:
            masked, labels = self.masking(original[None], seed=int(rng.integers(2**31)), step=0, records=[0])
            positions, ids = masked_positions(labels, self.masking.max_masks)
            out.update(mlm_tokens=masked[0], mlm_positions=positions[0], mlm_labels=ids[0])
        return out


def caption_augmenter(config: Config) -> Callable[[str, np.random.Generator], str] | None:
    s = config.section
    if s.caption_augment == "none":
        return None
    from jaxretrieval.data import eda

    synonyms = eda.synonyms_source(s.synonyms, data_root(config))
    return functools.partial(eda.augment_caption, synonyms=synonyms, max_words=config.data.max_words)


class CFACK(System):
    name = "cfack"
    summary = "CFACK: X2-VLM text-to-person retrieval, momentum cross-knowledge ITC + ITM + MLM, ITM re-ranking"
    families = ("xvlm",)
    losses = ("cfack",)
    protocols = ("text_to_image",)
    data_kinds = PEDES_KINDS
    converters = ("xvlm",)
    Section = CFACKSettings
    reranks = True

    def check(self, config: Config) -> list[Check]:
        s, model = config.section, config.model
        low, high = s.temp_range
        return [
            *no_layer_recipe(config),
            (0 <= s.fusion_from <= model.text.layers, "cfack.fusion_from must be within 0..model.text.layers"),
            (model.text.context_length <= s.max_positions, "model.text.context_length must be <= cfack.max_positions"),
            (config.data.tokenizer_kind == "wordpiece" or config.data.tokenizer == "checkpoint",
             "system cfack reads captions with BERT's WordPiece: data.tokenizer_kind: wordpiece (data.tokenizer a "
             "vocab.txt), or data.tokenizer: checkpoint (the one `convert xvlm --vocab` stored)"),
            (0 < low <= s.temp <= high, "cfack.temp must lie in cfack.temp_range, whose low end is > 0"),
            (0 <= s.momentum < 1, "cfack.momentum must be in [0, 1) (0: no momentum towers)"),
            (s.cnn in ("", "resnet50"), "cfack.cnn must be empty (no CNN branch) or resnet50"),
            (s.caption_augment in ("eda", "none"), "cfack.caption_augment must be eda or none"),
            (0 < s.mask_prob <= 1 and s.max_masks >= 1, "cfack.mask_prob must be in (0, 1] and max_masks >= 1"),
            (config.train.micro_batches == 1, "system cfack trains on whole batches (train.micro_batches: 1)"),
        ]

    def build(self, config: Config, *, rngs: nnx.Rngs, dtype: Any) -> XVLM:
        s, image, text = config.section or CFACKSettings(), config.model.image, config.model.text
        vision = dict(image_size=image.image_size, patch_size=image.patch_size, width=image.width, layers=image.layers,
                      heads=image.heads, mlp_ratio=image.mlp_ratio, drop_path_rate=s.drop_path, remat=image.remat,
                      scan=config.model.scan_layers, unroll=config.model.scan_unroll, attention=config.model.attention)
        bert = dict(vocab_size=text.vocab_size, width=text.width, layers=text.layers, heads=text.heads,
                    ffn_dim=int(text.mlp_ratio * text.width), max_positions=s.max_positions,
                    type_vocab_size=s.type_vocab_size, fusion_from=s.fusion_from, remat=text.remat,
                    unroll=config.model.scan_unroll, attention=config.model.attention, init_std=s.text_init_std)
        return XVLM(vision=vision, text=bert, embed_dim=config.model.embed_dim, temp=s.temp,
                    itm_hidden=s.itm_hidden or 2 * text.width, mlm=s.mlm, momentum=s.momentum > 0,
                    cnn_layers=(3, 4, 6, 3) if s.cnn == "resnet50" else None, cnn_width=s.cnn_width, rngs=rngs,
                    dtype=dtype)

    def before_step(self, config: Config) -> Callable[[Any], Any]:
        low, high = config.section.temp_range
        return lambda params: {**params, "temp": jnp.clip(params["temp"], low, high)}

    def grad_fn(self, config: Config, graphdef: nnx.GraphDef, mesh: Any) -> GradFn:
        s = config.section

        def losses(online: dict, momentum: dict | None, batch: dict, key: jax.Array) -> tuple[jax.Array, dict]:
            model = nnx.merge(graphdef, {**online, **({"momentum": momentum} if momentum is not None else {})})
            drop_key, itm_key = jax.random.split(key)
            rngs = nnx.Rngs(dropout=drop_key)
            ids, temp = batch["group"], model.temp[...]
            image_tokens = model.image_tokens(batch["image"], rngs)
            text_hidden = model.text_hidden(batch["text"])
            v1, t1 = model.image_features(image_tokens), model.text_features(text_hidden)
            v2 = t2 = None
            if momentum is not None:
                v2, t2 = model.momentum_features(batch["image_momentum"], batch["text_momentum"], rngs)
            cnn = model.cnn_features(batch["image_cnn"]) if model.cnn is not None else None
            terms = {"loss_itc": cfack_itc(v1, t1, ids, temp, v2, t2, cnn, s.cnn_weight)}
            negatives = hard_negatives(itm_key, v1, t1, 1.0 / temp, ids, ids)
            pairs = matching_batch(image_tokens, (text_hidden, model.keep(batch["text"])), negatives)
            logits = model.match_logits(*pairs.texts, pairs.images)
            terms["loss_itm"] = itm_loss(logits, pairs.labels, pairs.weights)
            weights = {"loss_itc": s.itc_weight, "loss_itm": s.itm_weight}
            if model.mlm_head is not None:
                tokens = batch["mlm_tokens"]
                logits = model.mlm_logits(tokens, model.keep(tokens), image_tokens, batch["mlm_positions"])
                terms["loss_mlm"], weights["loss_mlm"] = mlm_loss(logits, batch["mlm_labels"]), s.mlm_weight
            return sum(weights[k] * v for k, v in terms.items()), {**terms, "temp": temp}

        def fn(params: Any, batch: dict, key: jax.Array) -> tuple[Any, dict, Any, Any]:
            online = {k: v for k, v in params.items() if k != "momentum"}
            momentum = momentum_update(params, s.momentum) if "momentum" in params else None
            (loss, metrics), grads = jax.value_and_grad(losses, has_aux=True)(online, momentum, batch, key)
            if momentum is None:
                return loss, metrics, grads, None
            return loss, metrics, {**grads, "momentum": jax.tree.map(jnp.zeros_like, momentum)}, {"momentum": momentum}

        return fn

    def task(self, config: Config, init_meta: dict) -> Task:
        def encode(config: Config, root: Any, tokenizer: Any, source: Any) -> CFACKEncode:
            s, data, size = config.section, config.data, config.model.image.image_size
            masking = WholeWordMasking.for_tokenizer(tokenizer, s.mask_prob, s.max_masks) if s.mlm else None
            return CFACKEncode(WeakView(size, data.mean, data.std),
                               StrongView(size, data.mean, data.std, erasing_p=s.erasing_p,
                                          uniform_augment=s.uniform_augment),
                               CnnView(s.cnn_image_size) if s.cnn else None, tokenizer, masking,
                               caption_augmenter(config), source.where, data.skip_bad_records)

        return caption_stream_task(config, init_meta, self, encode)

    def init_from(self, config: Config, path: str, meta: dict, abstract: Any, fresh: Callable[[], Any]) -> Any:
        """A converted X-VLM / X2-VLM / CFACK checkpoint (or a trained one) over fresh parameters: what it lacks (a
        CNN branch, an MLM head, the momentum copies) starts fresh; momentum copies it lacks are set to its online
        weights, as the original's copy_params does."""
        from jaxretrieval import checkpoint

        params, _ = checkpoint.load_model(path, fresh(), partial=True)
        if "momentum" in params and "momentum" not in checkpoint.saved_parts(path):
            params = {**params, "momentum": momentum_update(params, 0.0)}
        return params

    def cross_encoder(self, config: Config, graphdef: nnx.GraphDef, mesh: Any) -> CrossEncoder:
        return fusion_cross_encoder(graphdef, mesh)


register(CFACK())
__all__ = ["CFACK", "CFACKSettings", "cfack_itc", "soft_itc"]
