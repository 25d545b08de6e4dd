"""BEiT-3 retrieval as PAB's LHP model trains it: one multiway encoder for both modalities, InfoNCE, layer-wise lr
decay, stochastic depth, hybrid global/local views (data.hybrid_views). `python -m convert beit3` ports unilm's
checkpoints."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from flax import nnx

from jaxretrieval.config import Config
from jaxretrieval.models import beit3
from jaxretrieval.systems import register
from jaxretrieval.systems.base import Check
from jaxretrieval.systems.clip import DualEncoder


class BEiT3LHP(DualEncoder):
    name = "beit3"
    summary = "BEiT-3 multiway retrieval (PAB's LHP): one encoder, layer-wise lr decay, hybrid views"
    families = ("beit3",)
    converters = ("beit3",)

    def check(self, config: Config) -> list[Check]:
        model = config.model
        multiway = model.multiway
        return [*super().check(config),
                (multiway.heads > 0 and multiway.width % multiway.heads == 0,
                 "model.multiway.width must divide by heads (> 0)"),
                (model.text.context_length <= multiway.max_text_positions - 2,
                 "model.text.context_length must be <= model.multiway.max_text_positions - 2")]

    def build(self, config: Config, *, rngs: nnx.Rngs, dtype: Any) -> beit3.BEiT3Retrieval:
        return beit3.BEiT3Retrieval(config.model, rngs=rngs, dtype=dtype)

    def layer_depth(self, config: Config) -> tuple[Callable[[str], int], int]:
        layers = config.model.multiway.layers
        return functools.partial(beit3.layer_depth, layers=layers), layers + 1


register(BEiT3LHP())
