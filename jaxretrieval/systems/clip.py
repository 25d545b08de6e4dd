"""CLIP (and SigLIP): an image tower and a text tower trained with InfoNCE or the sigmoid loss, as open_clip does.

Converted OpenAI / open_clip / Hugging Face weights (`python -m convert clip`) start it; `clip-export` writes
them back. Evaluated by image-text recall, or text-to-image ranking (PAB)."""

from __future__ import annotations

from typing import Any

from flax import nnx

from jaxretrieval.config import Config
from jaxretrieval.config_checks import CAPTION_KINDS, dual_encoder_checks, no_layer_recipe
from jaxretrieval.gradients import contrastive_grad_fn
from jaxretrieval.losses import training_loss
from jaxretrieval.models.clip import CLIP
from jaxretrieval.systems import register
from jaxretrieval.systems.base import Check, GradFn, System


class DualEncoder(System):
    """What every CLIP-style system shares: caption data, the contrastive losses over the mesh (with gradient
    caching), image-text evaluation."""

    losses = ("contrastive", "sigmoid")
    protocols = ("image_text", "text_to_image")
    data_kinds = CAPTION_KINDS

    def check(self, config: Config) -> list[Check]:
        return [*dual_encoder_checks(config),
                ((config.train.loss == "sigmoid") == (config.model.init_logit_bias is not None),
                 "train.loss=sigmoid needs model.init_logit_bias (SigLIP: -10), and only it has a logit bias")]

    def grad_fn(self, config: Config, graphdef: nnx.GraphDef, mesh: Any) -> GradFn:
        train = config.train
        return contrastive_grad_fn(graphdef, train.micro_batches, train.accumulation,
                                   training_loss(train.loss, train.loss_variant, mesh))


class Clip(DualEncoder):
    name = "clip"
    summary = "CLIP / SigLIP dual encoder (open_clip's recipe): ViT image tower, text transformer"
    families = ("clip",)
    converters = ("clip", "clip-export")

    def check(self, config: Config) -> list[Check]:
        return super().check(config) + no_layer_recipe(config)

    def build(self, config: Config, *, rngs: nnx.Rngs, dtype: Any) -> CLIP:
        return CLIP(config.model, rngs=rngs, dtype=dtype)


register(Clip())
