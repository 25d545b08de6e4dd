"""UIT: the PAB seed's unified image-text model (the CMP baseline) as a system: Swin + BERT fusion trained with ITC,
ITM, MLM and MIM, evaluated by ITC with each query's top k re-scored by the ITM head (github:AIVIETNAM-Hub/Hybrid-
Unified-and-Iterative-A-Novel-Framework-for-Text-based-Person-Anomaly-Retrieval, uit/cmp: models/cmp.py,
models/model_search.py, train.py, optim.py, scheduler.py, dataset/, configs/cmp.yaml; read for facts).

Per training pair (an image and one caption; `group` = its image_id), with v / t the ITC features (models/uit.py):
- ITC(v, t): the symmetric soft-target InfoNCE over the global batch at 1 / temp, targets spread over same-id pairs
  and smoothed: 0.8 x those + 0.2 / batch (`label_smooth` 0.2).
- ITM(v, t): one hard negative per side from softmax(similarity) + 1e-5 with same-id pairs excluded, drawn within the
  batch; the fused [CLS] of the positives and the 2 x batch negatives through the ITM head; cross entropy.
- The EDA copy of the caption (eda_p 1: always; one of EDA's four one-operation sentences) gives t' and adds
  0.8 x ITC(v, t') and 0.8 x ITM(v, t').
- MLM: the caption masked (whole words, p 0.25, at most 10, 80/10/10; the whole padded row is the candidate set, as
  the original hands the generator its max_length row) fused with the image tokens.
- MIM: SimMIM on the same augmented image, one 32-px block mask (ratio 0.5) per step, the L1 error on masked pixels.
  The original sums the per-image error over its per-GPU batch (84 images in cmp.yaml) instead of averaging it:
  loss_mim here is the mean over the global batch times `mim_images` (84), so the term weighs what it weighed there.
Loss = ITC + ITM + MLM + 0.1356 x MIM. Training views: Resize((224, 224)) bicubic, flip, ALBEF's RandomAugment(2, 7,
10 ops), normalise (CUHK-PEDES mean / std), Random Erasing p 0.6 with 0. Optimiser: AdamW (0.9, 0.98), lr 1e-4,
weight decay 0.01, lr x 2 for the Swin's last two stages, BERT layers 4, 5, 10, 11, the heads and projections;
X-VLM's step schedule (train.schedule xvlm_step).

Differences from the original, on purpose: the projections' batch norm sees the global batch (SyncBatchNorm) where
the original normalises per GPU; BERT dropout is not applied; weight decay spares every vector (the original decays
the projection norms' gains, `temp` and the mask token); draws come from per-record and per-step seeds.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxretrieval.config import Config
from jaxretrieval.config_checks import CAPTION_KINDS, no_layer_recipe
from jaxretrieval.data import eda
from jaxretrieval.data.masking import WholeWordMasking, masked_positions
from jaxretrieval.data.person_views import RandomErasing
from jaxretrieval.data.randaugment import UIT_OPS, RandomAugment
from jaxretrieval.data.sources import CaptionRecord, DataError
from jaxretrieval.data.transforms import _normalise, _squash, load_image
from jaxretrieval.losses.contrastive import contrastive_loss
from jaxretrieval.losses.matching import hard_negatives, itm_loss, matching_batch, mlm_loss
from jaxretrieval.models.uit import UIT, block_mask
from jaxretrieval.retrieval.rerank import CrossEncoder, fusion_cross_encoder
from jaxretrieval.systems import register
from jaxretrieval.systems.base import Check, GradFn, System
from jaxretrieval.tasks import Task, caption_stream_task

CUHK_MEAN, CUHK_STD = (0.38901278, 0.3651612, 0.34836376), (0.24344306, 0.23738699, 0.23368555)


@dataclasses.dataclass
class UITSettings:
    # The Swin tower (model.image: image_size, patch_size 4, width = the embedding width 128): Swin-B by default.
    swin_depths: list[int] = dataclasses.field(default_factory=lambda: [2, 2, 18, 2])
    swin_heads: list[int] = dataclasses.field(default_factory=lambda: [4, 8, 16, 32])
    swin_window: int = 7
    drop_path: float = 0.1
    fusion_from: int = 6  # the first BERT layer that cross-attends to the image tokens
    max_positions: int = 512
    type_vocab_size: int = 2
    itm_hidden: int = 0  # 0: 2 x the text width
    text_init_std: float = 0.02
    chunks: int = 3  # AdaptiveAvgPool1d bins of the ITC features
    proj_dropout: float = 0.5
    temp: float = 0.07
    label_smooth: float = 0.2
    itc_weight: float = 1.0
    itm_weight: float = 1.0
    eda: bool = True  # the EDA caption copy and its ITC / ITM terms
    eda_p: float = 1.0
    eda_weight: float = 0.8
    synonyms: str = "builtin"  # builtin, wordnet (the [wordnet] extra) or a table under data.root, as cfack
    mlm: bool = True
    mask_prob: float = 0.25
    max_masks: int = 10
    mask_whole_row: bool = True  # the original's candidates: the whole padded row (false: [CLS] .. last token)
    mlm_weight: float = 1.0
    mim: bool = True
    mim_block: int = 32
    mim_ratio: float = 0.5
    mim_weight: float = 0.1356
    mim_images: float = 84.0  # the original's per-GPU batch its MIM error is summed over (1: the plain mean)
    erasing_p: float = 0.6
    randaugment: bool = True
    randaugment_ops: int = 2
    randaugment_magnitude: int = 7
    # lr x lr_mult for the Swin stages and BERT layers named here (the original's numbering: Swin `layers.i` holds
    # stage i and the patch merging after it) and for the projections and heads.
    lr_mult: float = 2.0
    fast_swin_stages: list[int] = dataclasses.field(default_factory=lambda: [2, 3])
    fast_bert_layers: list[int] = dataclasses.field(default_factory=lambda: [4, 5, 10, 11])


@dataclasses.dataclass(frozen=True)
class UITView:
    """UIT's training view: squash to (size, size) bicubic, flip p 0.5, RandomAugment, normalise, Random Erasing."""

    image_size: int
    mean: Sequence[float] = CUHK_MEAN
    std: Sequence[float] = CUHK_STD
    augment: RandomAugment | None = None
    erasing_p: float = 0.6

    def __call__(self, image: Any, rng: np.random.Generator) -> np.ndarray:
        squashed = _squash(image.convert("RGB"), self.image_size)
        pixels = np.asarray(squashed)[:, ::-1] if rng.random() < 0.5 else np.asarray(squashed)
        if self.augment is not None:
            pixels = self.augment(np.ascontiguousarray(pixels), rng)
        pixels = _normalise(pixels, self.mean, self.std)
        return RandomErasing(self.erasing_p)(np.ascontiguousarray(pixels), rng)


def eda_caption(caption: str, rng: np.random.Generator, *, synonyms: eda.Synonyms, p: float, max_words: int) -> str:
    """UIT's EDA copy (`pre_caption(cap, max_words, True, eda_p)`): with probability p one of EDA's four sentences
    (one per operation, alpha 0.1), then cut to max_words words; a caption without letters stays as it is."""
    if rng.random() < p and eda.get_only_chars(caption).strip():
        chosen = eda.eda(caption, rng, synonyms=synonyms, num_aug=1)[0]
        caption = chosen if chosen.strip() else caption
    return " ".join(caption.split()[:max_words])


class UITEncode(grain.transforms.RandomMap):
    """CaptionRecord -> the view, the caption's token rows (original, EDA copy, masked) and its group; every draw
    from grain's per-element rng. None for an unreadable image when skipping is allowed."""

    def __init__(self, view: UITView, tokenizer: Any, masking: WholeWordMasking | None,
                 synonyms: eda.Synonyms | None, settings: UITSettings, max_words: int,
                 where: Callable[[CaptionRecord], str], skip_bad: bool):
        self.view, self.tokenizer, self.masking, self.synonyms = view, tokenizer, masking, synonyms
        self.settings, self.max_words, self.where, self.skip_bad = settings, max_words, where, skip_bad

    def random_map(self, record: CaptionRecord, rng: np.random.Generator) -> dict[str, np.ndarray] | None:
        try:
            image = load_image(record.image)
        except DataError as e:
            if not self.skip_bad:
                raise DataError(f"{self.where(record)}: {e}") from None
            return None
        caption = " ".join(record.caption.split()[:self.max_words])
        tokens = self.tokenizer(caption)[0]
        out = {"image": self.view(image, rng), "text": tokens, "group": np.int32(record.group),
               "origin": np.array([record.file, record.line], np.int32)}
        if self.synonyms is not None:
            copy = eda_caption(record.caption, rng, synonyms=self.synonyms, p=self.settings.eda_p,
                               max_words=self.max_words)
            out["text_eda"] = self.tokenizer(copy)[0]
        if self.masking is not None:
            masked, labels = self.masking(tokens[None], seed=int(rng.integers(2**31)), step=0, records=[0])
            positions, ids = masked_positions(labels, self.masking.max_masks)
            out.update(mlm_tokens=masked[0], mlm_positions=positions[0], mlm_labels=ids[0])
        return out


def uit_itc(v: jax.Array, t: jax.Array, ids: jax.Array, temp: jax.Array, smoothing: float) -> jax.Array:
    return contrastive_loss(v, t, 1.0 / temp, ids, ids, label_smoothing=smoothing)


def fast_layer_scale(s: UITSettings, text_layers: int) -> Callable[[str], Any]:
    """Parameter path -> lr factor of UIT's lr_mult groups (one per layer for a stacked BERT stack)."""
    def per_layer(indices: range, index: str | None) -> Any:
        factors = np.array([s.lr_mult if i in s.fast_bert_layers else 1.0 for i in indices])
        return factors if index is None else factors[int(index)]

    def scale(name: str) -> Any:
        if name.split("/")[0] in ("vision_proj", "text_proj", "itm_head", "mlm_head"):
            return s.lr_mult
        if stage := re.match(r"vision/stages/(\d+)/(blocks|downsample)", name):
            original = int(stage[1]) - (stage[2] == "downsample")  # merging closes the original's previous stage
            return s.lr_mult if original in s.fast_swin_stages else 1.0
        if layer := re.match(r"text/(text|fusion)/layers/(\d+/)?", name):
            indices = range(s.fusion_from) if layer[1] == "text" else range(s.fusion_from, text_layers)
            return per_layer(indices, layer[2] and layer[2][:-1])
        return 1.0

    return scale


class UITSystem(System):
    name = "uit"
    summary = "UIT (PAB's CMP baseline): Swin + BERT fusion, ITC + ITM + MLM + MIM with an EDA copy, ITM re-ranking"
    families = ("uit",)
    losses = ("uit",)
    protocols = ("text_to_image",)
    data_kinds = CAPTION_KINDS
    converters = ("uit", "swin")
    Section = UITSettings
    reranks = True

    def check(self, config: Config) -> list[Check]:
        s, model = config.section, config.model
        image = model.image
        return [
            *no_layer_recipe(config),
            (len(s.swin_depths) == len(s.swin_heads) >= 1, "uit.swin_depths and uit.swin_heads need one entry per "
                                                            "stage"),
            (0 <= s.fusion_from <= model.text.layers, "uit.fusion_from must be within 0..model.text.layers"),
            (model.text.context_length <= s.max_positions, "model.text.context_length must be <= uit.max_positions"),
            (config.data.tokenizer_kind == "wordpiece" or config.data.tokenizer == "checkpoint",
             "system uit reads captions with BERT's WordPiece: data.tokenizer_kind: wordpiece (data.tokenizer a "
             "vocab.txt), or data.tokenizer: checkpoint"),
            (not s.mim or image.image_size % s.mim_block == 0 and s.mim_block % image.patch_size == 0,
             "uit.mim_block must divide model.image.image_size and be a multiple of model.image.patch_size"),
            (not s.mim or image.image_size // image.patch_size // 2 ** (len(s.swin_depths) - 1) > 0,
             "model.image.image_size is too small for the Swin stages"),
            (0 <= s.label_smooth < 1 and 0 <= s.proj_dropout < 1, "uit.label_smooth and uit.proj_dropout must be in "
                                                                   "[0, 1)"),
            (0 < s.mask_prob <= 1 and s.max_masks >= 1, "uit.mask_prob must be in (0, 1] and max_masks >= 1"),
            (config.train.micro_batches == 1, "system uit trains on whole batches (train.micro_batches: 1)"),
        ]

    def build(self, config: Config, *, rngs: nnx.Rngs, dtype: Any) -> UIT:
        s, image, text = config.section or UITSettings(), config.model.image, config.model.text
        vision = dict(image_size=image.image_size, patch_size=image.patch_size, embed_dim=image.width,
                      depths=tuple(s.swin_depths), num_heads=tuple(s.swin_heads), window_size=s.swin_window,
                      mlp_ratio=image.mlp_ratio, drop_path_rate=s.drop_path, remat=image.remat,
                      scan=config.model.scan_layers, unroll=config.model.scan_unroll)
        bert = dict(vocab_size=text.vocab_size, width=text.width, layers=text.layers, heads=text.heads,
                    ffn_dim=int(text.mlp_ratio * text.width), max_positions=s.max_positions,
                    type_vocab_size=s.type_vocab_size, fusion_from=s.fusion_from, remat=text.remat,
                    unroll=config.model.scan_unroll, attention=config.model.attention, init_std=s.text_init_std)
        return UIT(vision=vision, text=bert, embed_dim=config.model.embed_dim, chunks=s.chunks,
                   proj_dropout=s.proj_dropout, temp=s.temp, itm_hidden=s.itm_hidden or 2 * text.width, mlm=s.mlm,
                   mim=s.mim, rngs=rngs, dtype=dtype)

    def lr_scale(self, config: Config) -> Callable[[str], Any] | None:
        s = config.section
        return fast_layer_scale(s, config.model.text.layers) if s.lr_mult != 1 else None

    def grad_fn(self, config: Config, graphdef: nnx.GraphDef, mesh: Any) -> GradFn:
        s, image = config.section, config.model.image

        def matching(model: UIT, key: jax.Array, v: jax.Array, t: jax.Array, image_tokens: jax.Array,
                     text_hidden: jax.Array, tokens: jax.Array, ids: jax.Array, temp: jax.Array) -> jax.Array:
            negatives = hard_negatives(key, v, t, 1.0 / temp, ids, ids)
            pairs = matching_batch(image_tokens, (text_hidden, model.keep(tokens)), negatives)
            return itm_loss(model.match_logits(*pairs.texts, pairs.images), pairs.labels, pairs.weights)

        def losses(params: Any, batch: dict, key: jax.Array) -> tuple[jax.Array, tuple[dict, Any]]:
            model = nnx.merge(graphdef, params)
            keys = iter(jax.random.split(key, 9))
            ids, temp = batch["group"], model.temp[...]
            image_tokens = model.image_tokens(batch["image"], nnx.Rngs(dropout=next(keys)))
            text_hidden = model.text_hidden(batch["text"])
            v = model.image_features(image_tokens, train=True, key=next(keys))
            t = model.text_features(text_hidden, train=True, key=next(keys))
            itc = uit_itc(v, t, ids, temp, s.label_smooth)
            itm = matching(model, next(keys), v, t, image_tokens, text_hidden, batch["text"], ids, temp)
            if s.eda:
                hidden_eda = model.text_hidden(batch["text_eda"])
                t_eda = model.text_features(hidden_eda, train=True, key=next(keys))
                itc += s.eda_weight * uit_itc(v, t_eda, ids, temp, s.label_smooth)
                itm += s.eda_weight * matching(model, next(keys), v, t_eda, image_tokens, hidden_eda,
                                               batch["text_eda"], ids, temp)
            terms = {"loss_itc": itc, "loss_itm": itm}
            weights = {"loss_itc": s.itc_weight, "loss_itm": s.itm_weight}
            if model.mlm_head is not None:
                logits = model.mlm_logits(batch["mlm_tokens"], model.keep(batch["text"]), image_tokens,
                                          batch["mlm_positions"])
                terms["loss_mlm"], weights["loss_mlm"] = mlm_loss(logits, batch["mlm_labels"]), s.mlm_weight
            if model.mask_token is not None:
                masked = block_mask(next(keys), image.image_size, image.patch_size, s.mim_block, s.mim_ratio)
                error = model.mim_error(batch["image"], masked, nnx.Rngs(dropout=next(keys)))
                terms["loss_mim"], weights["loss_mim"] = s.mim_images * jnp.mean(error), s.mim_weight
            total = sum(weights[k] * v for k, v in terms.items())
            return total, ({**terms, "temp": temp}, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))

        def fn(params: Any, batch: dict, key: jax.Array) -> tuple[Any, dict, Any, Any]:
            (loss, (metrics, stats)), grads = jax.value_and_grad(losses, has_aux=True)(params, batch, key)
            return loss, metrics, grads, stats

        return fn

    def task(self, config: Config, init_meta: dict) -> Task:
        def encode(config: Config, root: Any, tokenizer: Any, source: Any) -> UITEncode:
            s, data = config.section, config.data
            augment = RandomAugment(s.randaugment_ops, s.randaugment_magnitude, UIT_OPS) if s.randaugment else None
            view = UITView(config.model.image.image_size, data.mean, data.std, augment, s.erasing_p)
            masking = (WholeWordMasking.for_tokenizer(tokenizer, s.mask_prob, s.max_masks,
                                                      whole_row=s.mask_whole_row) if s.mlm else None)
            synonyms = eda.synonyms_source(s.synonyms, root) if s.eda else None
            return UITEncode(view, tokenizer, masking, synonyms, s, data.max_words, source.where,
                             data.skip_bad_records)

        return caption_stream_task(config, init_meta, self, encode)

    def init_from(self, config: Config, path: str, meta: dict, abstract: Any, fresh: Callable[[], Any]) -> Any:
        """A converted UIT / Swin / BERT checkpoint (or a trained one) over fresh parameters: what it lacks starts
        fresh."""
        from jaxretrieval import checkpoint

        return checkpoint.load_model(path, fresh(), partial=True)[0]

    def cross_encoder(self, config: Config, graphdef: nnx.GraphDef, mesh: Any) -> CrossEncoder:
        return fusion_cross_encoder(graphdef, mesh)


register(UITSystem())
__all__ = ["UITSettings", "UITSystem", "UITView", "eda_caption", "fast_layer_scale", "uit_itc"]
