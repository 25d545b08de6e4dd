"""Model factory: one call builds any model from its config."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxretrieval.models.clip import CLIP, l2_normalize
from jaxretrieval.models.presets import MODEL_PRESETS

COMPUTE_DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}


def create_model(model_config, *, seed: int = 0, precision: str = "fp32") -> CLIP:
    """Builds the model `model_config` (a ModelConfig) describes, parameters in fp32."""
    return CLIP(model_config, rngs=nnx.Rngs(seed), dtype=COMPUTE_DTYPES[precision])


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


__all__ = ["CLIP", "MODEL_PRESETS", "abstract_model", "create_model", "init_params", "l2_normalize"]
