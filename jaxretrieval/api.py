"""`model, preprocess, tokenizer = jaxretrieval.load(PATH)`, the way open_clip users expect."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxretrieval.data.reid import ReidEvalTransform
from jaxretrieval.data.transforms import Preprocess
from jaxretrieval.evaluate import restore_params, saved_config
from jaxretrieval.sharding import make_mesh
from jaxretrieval.systems import get_system


class RetrievalModel:
    """A restored model with jitted encoders that take numpy or jax arrays."""

    def __init__(self, graphdef: nnx.GraphDef, params: dict):
        self.params = params
        self.module = nnx.merge(graphdef, params)
        self._image = jax.jit(lambda p, x, n: nnx.merge(graphdef, p).encode_image(x, normalize=n),
                              static_argnums=2)
        self._text = jax.jit(lambda p, t, n: nnx.merge(graphdef, p).encode_text(t, normalize=n),
                             static_argnums=2)

    def encode_image(self, pixels: np.ndarray | jax.Array, normalize: bool = False) -> jax.Array:
        """pixels: (batch, height, width, 3) from `preprocess`, stacked."""
        return self._image(self.params, pixels, normalize)

    def encode_text(self, tokens: np.ndarray | jax.Array, normalize: bool = False) -> jax.Array:
        """tokens: (batch, context_length) int ids from `tokenizer`."""
        return self._text(self.params, tokens, normalize)

    @property
    def logit_scale(self) -> float:
        """exp(t), clamped as in training; a model trained with temperatures instead (CUSA) has none."""
        if not hasattr(self.module, "scale"):
            raise AttributeError(f"{type(self.module).__name__} has no logit scale (its losses divide by "
                                 f"temperatures: see model.temperatures)")
        return float(self.module.scale())


def load(path: str | Path) -> tuple[RetrievalModel, Preprocess | ReidEvalTransform, object]:
    """(model, preprocess, tokenizer) from a step folder, a checkpoints folder or a training workdir. A re-id
    model (system ctl) has no text side: its tokenizer is None and `preprocess` resizes to data.input_size."""
    config = saved_config(path)
    graphdef, params, meta = restore_params(config, path, make_mesh(config.mesh))
    preprocess, tokenizer = get_system(config.system).inference(config, meta)
    return RetrievalModel(graphdef, params), preprocess, tokenizer
