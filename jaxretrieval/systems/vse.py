"""VSE-infinity (woodfrog/vse_infty; read for facts): GPO-pooled region features and BERT captions in one space,
trained with the hinge triplet loss; the baseline AAHR builds on (`systems/aahr.py`).

The recipe of its released `train_region.sh` (configs/*/vse_infty.yaml): batch 128, AdamW (weight decay 1e-4 on every
parameter, torch's betas and eps), lr 5e-4 with BERT's parameters at 0.1x, x0.1 after epoch 15 of 25, gradient norm
clipped at 2; the loss sums the hinge over every negative in the first epoch (`vse_mean_warmup_epochs 1`) and keeps
the hardest negative per query after it. Data: region drop and caption noise (data/precomp_pipeline.py). Evaluation:
image-text recall on the precomp test split; with eval.folds 5 on COCO's testall both 5K and the 1K x 5 average.

Differences from the original, on purpose: BERT runs without dropout (the original fine-tunes it in train mode,
dropout 0.1); captions are cut to model.text.context_length tokens (the original does not cut); the batch is not
sorted by caption length (the loss is a sum, so the order does not change it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxretrieval.config import Config, ConfigError
from jaxretrieval.config_checks import CAPTION_KINDS, PRECOMP_KINDS, no_layer_recipe
from jaxretrieval.data.pipeline import caption_source, data_root, make_preprocess
from jaxretrieval.data.precomp_pipeline import NoisyCaptionPair, PrecompEncode, precomp_eval_inputs
from jaxretrieval.losses.hinge import vse_hinge_loss
from jaxretrieval.models.vse import VSE
from jaxretrieval.systems import register
from jaxretrieval.systems.base import Check, Evaluator, GradFn, System
from jaxretrieval.tasks import Task, caption_stream_task


@dataclasses.dataclass
class VSESettings:
    region_dim: int = 2048  # the precomputed region features' width (BUTD: 2048)
    region_mlp: bool = True  # the MLP residual beside fc (precomp_enc_type "basic")
    margin: float = 0.2
    # Epochs of the sum over all negatives before the hardest negative takes over (vse_mean_warmup_epochs); needs
    # train.epochs > 0 unless 0.
    hinge_warmup_epochs: float = 1.0
    bert_lr_scale: float = 0.1  # BERT's learning rate relative to train.lr
    region_drop: float = 0.2  # training: the chance each region is dropped
    caption_noise: float = 0.2  # training: the chance each word is masked, replaced or deleted (0: off)
    max_positions: int = 512  # BERT's position table
    # precomp: region features (data.kind precomp / precomp_demo); resnet: raw images (any caption data.kind) through
    # a ResNet whose last feature map gives the grid features (the original's "backbone" option), batch norms frozen,
    # grids dropped at random in training; start it from torchvision weights with `convert ctl` + train.init_from.
    image_source: str = "precomp"
    backbone_layers: tuple[int, int, int, int] = (3, 8, 36, 3)  # ResNet-152 (50: 3 4 6 3, 101: 3 4 23 3)
    backbone_width: int = 64
    backbone_lr_scale: float = 0.01  # the backbone's lr relative to train.lr (backbone_lr_factor)


def warmup_steps(config: Config) -> int:
    """The train step at which the hinge loss turns to the hardest negative."""
    s, train = config.section, config.train
    if not s.hinge_warmup_epochs:
        return 0
    return round(s.hinge_warmup_epochs * train.steps / train.epochs)


def split_state(params: dict, state_keys: tuple[str, ...]) -> tuple[dict, dict]:
    """(the parameters the gradient is taken of, the top-level state entries named in state_keys)."""
    return ({k: v for k, v in params.items() if k not in state_keys},
            {k: v for k, v in params.items() if k in state_keys})


def zero_grads(state: dict) -> dict:
    return jax.tree.map(jnp.zeros_like, state)


def hinge_terms(image: jax.Array, text: jax.Array, margin: float, updates: jax.Array, warmup: int) -> dict:
    """{"loss_hinge": the sum form before `warmup` steps, the hardest-negative form from then on, "max_violation"}."""
    hardest = updates >= warmup
    loss = jax.lax.cond(hardest, lambda: vse_hinge_loss(image, text, margin, max_violation=True),
                        lambda: vse_hinge_loss(image, text, margin, max_violation=False))
    return {"loss_hinge": loss, "max_violation": hardest.astype(jnp.float32)}


class VSEInfinity(System):
    name = "vse_infty"
    summary = "VSE-infinity: BUTD region features + BERT, GPO pooling, hinge triplet loss (AAHR's baseline)"
    families = ("vse",)
    losses = ("hinge",)
    protocols = ("image_text",)
    data_kinds = PRECOMP_KINDS + CAPTION_KINDS
    converters = ("vse_infty",)
    Section = VSESettings
    state_keys: tuple[str, ...] = ("updates",)  # top-level state the train step writes (not trained)

    def check(self, config: Config) -> list[Check]:
        s, text = config.section, config.model.text
        precomp = config.data.kind in PRECOMP_KINDS
        return [
            *no_layer_recipe(config),
            (s.image_source in ("precomp", "resnet"), f"{self.name}.image_source must be precomp or resnet"),
            (precomp == (s.image_source == "precomp"),
             f"{self.name}.image_source {s.image_source} with data.kind {config.data.kind}: region features "
             f"(precomp, precomp_demo) go with image_source precomp, images with image_source resnet"),
            (config.data.tokenizer_kind == "wordpiece" or config.data.tokenizer == "checkpoint",
             f"system {self.name} reads captions with BERT's WordPiece: data.tokenizer_kind: wordpiece"),
            (s.hinge_warmup_epochs == 0 or config.train.epochs > 0,
             f"{self.name}.hinge_warmup_epochs counts epochs: set train.epochs (or "
             f"{self.name}.hinge_warmup_epochs: 0)"),
            (0 <= s.region_drop < 1 and 0 <= s.caption_noise < 1,
             f"{self.name}.region_drop and {self.name}.caption_noise must be in [0, 1)"),
            (text.context_length <= s.max_positions, f"model.text.context_length must be <= {self.name}.max_positions"),
            (config.train.micro_batches == 1, f"system {self.name} trains on whole batches (train.micro_batches: 1)"),
        ]

    def bert(self, config: Config) -> dict[str, Any]:
        text = config.model.text
        return dict(vocab_size=text.vocab_size, width=text.width, layers=text.layers, heads=text.heads,
                    ffn_dim=int(text.mlp_ratio * text.width), max_positions=config.section.max_positions,
                    type_vocab_size=2, remat=text.remat, unroll=config.model.scan_unroll,
                    attention=config.model.attention)

    def build(self, config: Config, *, rngs: nnx.Rngs, dtype: Any) -> VSE:
        s = config.section
        backbone = (dict(layers=tuple(s.backbone_layers), width=s.backbone_width) if s.image_source == "resnet"
                    else None)
        return VSE(region_dim=s.region_dim, embed_dim=config.model.embed_dim, bert=self.bert(config),
                   region_mlp=s.region_mlp, backbone=backbone, rngs=rngs, dtype=dtype)

    def lr_scale(self, config: Config) -> Callable[[str], Any] | None:
        s = config.section
        if s.bert_lr_scale == 1 and (s.image_source != "resnet" or s.backbone_lr_scale == 1):
            return None

        def scale(path: str) -> float:
            if path.startswith("text/bert/"):
                return s.bert_lr_scale
            return s.backbone_lr_scale if path.startswith("backbone/") else 1.0

        return scale

    def image_inputs(self, batch: dict) -> Any:
        """What `encode_image` takes from a training batch: regions with their lengths, or pixels."""
        return {"regions": batch["image"], "lengths": batch["image_lengths"]} if "image_lengths" in batch \
            else batch["image"]

    def before_loss(self, config: Config, graphdef: nnx.GraphDef, trainable: dict, state: dict, batch: dict,
                    key: jax.Array) -> tuple[dict, Any]:
        """(the state the loss reads, what the loss needs besides the batch), made before the gradient (AAHR: its
        momentum copies' update and features, its prototypes); VSE-infinity: the state as it is, nothing."""
        return state, None

    def losses_of(self, config: Config, model: Any, batch: dict, key: jax.Array, extra: Any) -> tuple[jax.Array, dict]:
        """(loss, logged terms) of one batch, the model in train mode (its batch norms update in place)."""
        image = model.encode_image(self.image_inputs(batch), train=True, drop_key=key)
        text = model.encode_text(batch["text"])
        terms = hinge_terms(image, text, config.section.margin, model.updates[...], warmup_steps(config))
        return terms["loss_hinge"], terms

    def written_state(self, config: Config, state: dict, extra: Any, batch: dict) -> dict:
        """The state the step writes besides the batch statistics: the step count (AAHR adds its own)."""
        return {"updates": state["updates"] + 1}

    def grad_fn(self, config: Config, graphdef: nnx.GraphDef, mesh: Any) -> GradFn:
        def loss_fn(trainable: dict, state: dict, batch: dict, key: jax.Array, extra: Any) -> tuple[jax.Array, tuple]:
            model = nnx.merge(graphdef, {**trainable, **state})
            loss, terms = self.losses_of(config, model, batch, key, extra)
            return loss, (terms, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))

        def fn(params: dict, batch: dict, key: jax.Array) -> tuple[Any, dict, Any, Any]:
            trainable, state = split_state(params, self.state_keys)
            state, extra = self.before_loss(config, graphdef, trainable, state, batch, key)
            (loss, (terms, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, state, batch, key,
                                                                                      extra)
            written = {**stats, **self.written_state(config, state, extra, batch)}
            return loss, terms, {**grads, **zero_grads(state)}, written

        return fn

    def task(self, config: Config, init_meta: dict) -> Task:
        def encode(config: Config, root: Any, tokenizer: Any, source: Any) -> Any:
            s = config.section
            if s.image_source == "resnet":
                return NoisyCaptionPair(make_preprocess(config, train=True), tokenizer, flip=config.data.flip,
                                        skip_bad=config.data.skip_bad_records, files=source.paths,
                                        where=source.where, caption_noise=s.caption_noise)
            self.check_source(config, source)
            return PrecompEncode(source, tokenizer, region_drop=s.region_drop, caption_noise=s.caption_noise,
                                 globals_=self.globals_of(config, source))

        return caption_stream_task(config, init_meta, self, encode)

    def check_source(self, config: Config, source: Any) -> None:
        dim = source.features.shape[2]
        if dim != config.section.region_dim:
            raise ConfigError(f"{source.features_path} holds {dim}-wide region features but "
                              f"{self.name}.region_dim is {config.section.region_dim}")

    def globals_of(self, config: Config, source: Any) -> Any:
        """The CLIP global features the system reads beside the regions (AAHR's); None: none."""
        return None

    def evaluator(self, config: Config, tokenizer: Any, source: Any = None) -> Evaluator:
        from jaxretrieval.evaluate import evaluate_retrieval

        if config.section.image_source == "resnet":
            return super().evaluator(config, tokenizer, source)
        source = source or caption_source(config, data_root(config), config.eval.split)
        self.check_source(config, source)
        inputs = precomp_eval_inputs(source, tokenizer, self.globals_of(config, source))

        def evaluate(graphdef: nnx.GraphDef, params: Any, mesh: Any) -> dict[str, Any]:
            e = config.eval
            return evaluate_retrieval(graphdef, params, inputs, mesh, e.batch_size, "image_text", e.folds)

        return evaluate

    def init_from(self, config: Config, path: str, meta: dict, abstract: Any, fresh: Callable[[], Any]) -> Any:
        """A `convert bert` checkpoint (BERT-base, as the original starts from) into the text encoder's BERT, or a
        converted / trained VSE-infinity or AAHR checkpoint; what it lacks starts fresh."""
        from jaxretrieval import checkpoint

        params = fresh()
        if meta.get("component") == "bert":
            width = config.model.text.width  # the pooler, which VSE-infinity never uses, is read and dropped
            pooler = {"kernel": jnp.zeros((width, width), jnp.float32), "bias": jnp.zeros((width,), jnp.float32)}
            loaded, _ = checkpoint.load_model(path, {"bert": {**params["text"]["bert"], "pooler": pooler}},
                                              partial=True)
            bert = {k: v for k, v in loaded["bert"].items() if k != "pooler"}
            return {**params, "text": {**params["text"], "bert": bert}}
        return checkpoint.load_model(path, params, partial=True)[0]

    def inference(self, config: Config, meta: dict) -> tuple[Any, Any]:
        """(regions (K, D) -> float32 array, or the image transform of raw-image mode; the tokenizer)."""
        from jaxretrieval.data.tokenizers import build_tokenizer

        if config.section.image_source == "resnet":
            return super().inference(config, meta)
        return (lambda regions: np.asarray(regions, np.float32)), build_tokenizer(meta["tokenizer"])


register(VSEInfinity())
__all__ = ["VSEInfinity", "VSESettings", "hinge_terms", "split_state", "warmup_steps", "zero_grads"]
