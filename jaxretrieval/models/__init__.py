"""Model factory: one call builds any model from its config."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxretrieval.models import beit3
from jaxretrieval.models.beit3 import BEiT3Retrieval
from jaxretrieval.models.clip import CLIP, l2_normalize
from jaxretrieval.models.ctl import CTLModel
from jaxretrieval.models.presets import MODEL_PRESETS
from jaxretrieval.sharding import path_name

COMPUTE_DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}


def _ctl(config, *, rngs: nnx.Rngs, dtype) -> CTLModel:
    if config.num_classes < 1:
        raise ValueError("model.num_classes must be set (the training split's identity count) to build a CTL model")
    r = config.resnet
    return CTLModel(config.num_classes, layers=tuple(r.layers), width=r.width, last_stride=r.last_stride,
                    stem_relu=r.stem_relu, ibn=r.ibn, dtype=dtype, rngs=rngs)


# The dual encoders share one interface: __call__(pixels, tokens, *, rngs) -> (normalised image embeddings,
# normalised text embeddings, logit scale), encode_image / encode_text(x, normalize), scale(), loss_scalars().
# ctl (re-id) has __call__(pixels, *, train) -> {"features", "neck", "logits"} and encode_image.
FAMILIES = {"clip": CLIP, "beit3": BEiT3Retrieval, "ctl": _ctl}


def create_model(model_config, *, seed: int = 0, precision: str = "fp32") -> CLIP | BEiT3Retrieval | CTLModel:
    """Builds the model `model_config` (a ModelConfig) describes, parameters in fp32."""
    return FAMILIES[model_config.family](model_config, rngs=nnx.Rngs(seed), dtype=COMPUTE_DTYPES[precision])


def parameter_roles(model_config) -> dict:
    """The model's state tree with a role per leaf: "param" (the optimiser's), "center" (the center loss's
    centres, their own optimiser, as Centroids-ReID gives every parameter named *center*), "state" (batch-norm
    statistics and frozen values, which the optimiser leaves alone)."""
    abstract = nnx.eval_shape(lambda: create_model(model_config))
    trainable = {path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(
        nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))}

    def role(path: tuple, _) -> str:
        name = path_name(path)
        return ("center" if "center" in name else "param") if name in trainable else "state"

    return jax.tree_util.tree_map_with_path(role, nnx.to_pure_dict(nnx.state(abstract)))


def layer_depth(model_config) -> tuple[Callable[[str], int], int] | None:
    """(parameter path -> depth, the top depth) for layer-wise lr decay; None where the family defines none."""
    if model_config.family == "beit3":
        layers = model_config.multiway.layers
        return functools.partial(beit3.layer_depth, layers=layers), layers + 1
    return None


def abstract_model(model_config, *, precision: str = "fp32") -> tuple[nnx.GraphDef, dict]:
    """(graph definition, parameter shapes as ShapeDtypeStructs) without allocating anything."""
    abstract = nnx.eval_shape(lambda: create_model(model_config, precision=precision))
    graphdef, state = nnx.split(abstract)
    return graphdef, nnx.to_pure_dict(state)


def init_params(model_config, *, seed: int, precision: str, shardings=None) -> dict:
    """Freshly initialised parameters, created directly in their shardings when given."""
    init = jax.jit(lambda: nnx.to_pure_dict(nnx.state(create_model(model_config, seed=seed, precision=precision))),
                   out_shardings=shardings)
    return init()


__all__ = ["CLIP", "FAMILIES", "MODEL_PRESETS", "BEiT3Retrieval", "CTLModel", "abstract_model", "create_model",
           "init_params", "layer_depth", "l2_normalize", "parameter_roles"]
