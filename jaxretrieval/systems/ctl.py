"""Centroids-ReID: a ResNet re-id model trained on identity-balanced batches with cross entropy, batch-hard triplet,
center loss (its centres on their own SGD) and the centroid triplet; evaluated on query x gallery against images and
identity centroids. `python -m convert ctl` ports the original's Lightning checkpoints and torchvision weights."""

from __future__ import annotations

import dataclasses
from typing import Any

import optax
from flax import nnx

from jaxretrieval.config import Config
from jaxretrieval.config_checks import REID_KINDS
from jaxretrieval.gradients import make_ctl_grad_fn
from jaxretrieval.losses.metric import CTLLossConfig, center_optimizer
from jaxretrieval.models.ctl import CTLModel
from jaxretrieval.systems import register
from jaxretrieval.systems.base import Check, Evaluator, GradFn, System


@dataclasses.dataclass
class CTLSettings:
    label_smoothing: float = 0.1  # cross entropy's epsilon
    triplet_margin: float = 0.5  # batch-hard and centroid triplet
    center_loss_weight: float = 5e-4  # the centres have their own SGD at center_lr, fed gradients / this weight
    center_lr: float = 0.5
    # Centroids against which queries rank: one per identity, per query camera from the other cameras' images
    # (the original's MODEL.KEEP_CAMID_CENTROIDS); false: one from all of an identity's gallery images.
    per_camera_centroids: bool = True


class CentroidsReID(System):
    name = "ctl"
    summary = "Centroids-ReID: ResNet-50 (IBN-a) re-id, CE + triplet + center + centroid triplet losses"
    families = ("ctl",)
    losses = ("ctl",)
    protocols = ("reid",)
    data_kinds = REID_KINDS
    converters = ("ctl",)
    Section = CTLSettings
    moved_keys = {**{f"train.{key}": f"ctl.{key}" for key in ("label_smoothing", "triplet_margin",
                                                                "center_loss_weight", "center_lr")},
                  "eval.per_camera_centroids": "ctl.per_camera_centroids"}

    def check(self, config: Config) -> list[Check]:
        model, data, train, settings = config.model, config.data, config.train, config.section
        return [
            (data.num_instances >= 2 and train.batch_size % data.num_instances == 0,
             "data.num_instances must be >= 2 and divide train.batch_size (identities x instances)"),
            (train.batch_size // max(data.num_instances, 1) >= 2, "a batch needs at least 2 identities"),
            (train.micro_batches == 1, "train.micro_batches applies to the contrastive losses only"),
            (model.resnet.last_stride in (1, 2), "model.resnet.last_stride must be 1 or 2"),
            (len(model.resnet.layers) == 4 and min(model.resnet.layers) >= 1,
             "model.resnet.layers must be 4 stage depths >= 1"),
            (model.num_classes >= 0, "model.num_classes must be >= 0 (0: the training split's identities)"),
            (0 <= data.random_erasing <= 1, "data.random_erasing is a probability"),
            (min(data.input_size) >= 32, "data.input_size must be (height, width), each >= 32"),
            (settings.center_loss_weight > 0, "ctl.center_loss_weight must be > 0 (its optimiser divides by it)"),
        ]

    def build(self, config: Config, *, rngs: nnx.Rngs, dtype: Any) -> CTLModel:
        model = config.model
        if model.num_classes < 1:
            raise ValueError("model.num_classes must be set (the training split's identity count) to build a CTL "
                             "model")
        r = model.resnet
        return CTLModel(model.num_classes, layers=tuple(r.layers), width=r.width, last_stride=r.last_stride,
                        stem_relu=r.stem_relu, ibn=r.ibn, dtype=dtype, rngs=rngs)

    def param_role(self, name: str) -> str:
        return "center" if "center" in name else "param"  # as the original gives every *center* parameter

    def role_optimizers(self, config: Config) -> dict[str, optax.GradientTransformation]:
        return {"center": center_optimizer(config.section.center_lr, config.section.center_loss_weight)}

    def grad_fn(self, config: Config, graphdef: nnx.GraphDef, mesh: Any) -> GradFn:
        settings = config.section
        return make_ctl_grad_fn(graphdef, CTLLossConfig(
            num_instances=config.data.num_instances, margin=settings.triplet_margin,
            label_smoothing=settings.label_smoothing, center_weight=settings.center_loss_weight))

    def task(self, config: Config, init_meta: dict) -> Any:
        from jaxretrieval.tasks import reid_task

        return reid_task(config, self)

    def evaluator(self, config: Config, tokenizer: Any, source: Any = None) -> Evaluator:
        from jaxretrieval.tasks import reid_evaluator

        return reid_evaluator(config)

    def inference(self, config: Config, meta: dict) -> tuple[Any, None]:
        from jaxretrieval.data.reid import ReidEvalTransform

        data = config.data
        return ReidEvalTransform(tuple(data.input_size), data.mean, data.std), None


register(CentroidsReID())
