"""Model factory: one call builds any model from its config."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxretrieval.models.beit3 import BEiT3Retrieval
from jaxretrieval.models.clip import CLIP, l2_normalize
from jaxretrieval.models.ctl import CTLModel
from jaxretrieval.models.presets import MODEL_PRESETS
from jaxretrieval.sharding import path_name
from jaxretrieval.systems import get_system

if TYPE_CHECKING:  # config imports the presets of this package
    from jaxretrieval.config import Config, ModelConfig

COMPUTE_DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}


def _full_config(config: Config | ModelConfig) -> Config:
    """A Config; a bare ModelConfig (the older call form) gets the system named like its model.family."""
    from jaxretrieval.config import Config, ModelConfig

    if isinstance(config, ModelConfig):
        return Config(system=config.family, model=config)
    return config


def create_model(config: Config | ModelConfig, *, seed: int = 0, precision: str = "fp32") -> nnx.Module:
    """Builds the model of `config.system` (see jaxretrieval.systems), parameters in fp32."""
    config = _full_config(config)
    return get_system(config.system).build(config, rngs=nnx.Rngs(seed), dtype=COMPUTE_DTYPES[precision])


def parameter_roles(config: Config | ModelConfig) -> dict:
    """The model's state tree with a role per leaf: trainable parameters get the system's role ("param", or e.g.
    "center" for Centroids-ReID's centres, which have their own optimiser); batch-norm statistics and frozen values
    are "state", which the optimiser leaves alone."""
    config = _full_config(config)
    system = get_system(config.system)
    abstract = nnx.eval_shape(lambda: create_model(config))
    trainable = {path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(
        nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))}

    def role(path: tuple, _) -> str:
        name = path_name(path)
        return system.param_role(name) if name in trainable else "state"

    return jax.tree_util.tree_map_with_path(role, nnx.to_pure_dict(nnx.state(abstract)))


def layer_depth(config: Config | ModelConfig) -> tuple[Callable[[str], int], int] | None:
    """(parameter path -> depth, the top depth) for layer-wise lr decay; None where the system defines none."""
    config = _full_config(config)
    return get_system(config.system).layer_depth(config)


def abstract_model(config: Config | ModelConfig, *, precision: str = "fp32") -> tuple[nnx.GraphDef, dict]:
    """(graph definition, parameter shapes as ShapeDtypeStructs) without allocating anything."""
    abstract = nnx.eval_shape(lambda: create_model(config, precision=precision))
    graphdef, state = nnx.split(abstract)
    return graphdef, nnx.to_pure_dict(state)


def init_params(config: Config | ModelConfig, *, seed: int, precision: str, shardings=None) -> dict:
    """Freshly initialised parameters, created directly in their shardings when given."""
    init = jax.jit(lambda: nnx.to_pure_dict(nnx.state(create_model(config, seed=seed, precision=precision))),
                   out_shardings=shardings)
    return run_once(init)


def run_once(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) for a jitted function called once (an init): on CPU compiled with LLVM's lighter optimisation, which
    halves the compile time of random initialisers (one code path per parameter shape) and runs as fast."""
    options = {"xla_backend_optimization_level": 1} if jax.default_backend() == "cpu" else {}
    return fn.lower(*args).compile(options)(*args)


__all__ = ["CLIP", "MODEL_PRESETS", "BEiT3Retrieval", "CTLModel", "abstract_model", "create_model",
           "init_params", "layer_depth", "l2_normalize", "parameter_roles"]
