"""Momentum (exponential-moving-average) copies of modules, as ALBEF / X-VLM / CFACK / AAHR keep them: `Momentum`
variables in the model state (checkpointed, sharded like the online parameters, never trained), updated by the train
step to m * copy + (1 - m) * online before the momentum features are computed."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx


class Momentum(nnx.Variable):
    """An exponential-moving-average copy of a parameter: state, not trained."""


def momentum_copy(module: nnx.Module) -> nnx.Module:
    """A new module with `module`'s structure whose parameters are `Momentum` variables holding the same values."""
    graphdef, state = nnx.split(module)
    state = jax.tree.map(lambda v: Momentum(v[...]) if isinstance(v, nnx.Param) else v, state,
                         is_leaf=lambda v: isinstance(v, nnx.Variable))
    return nnx.merge(graphdef, state)


def ema(momentum: Any, online: Any, m: float | jax.Array) -> Any:
    """m * momentum + (1 - m) * online, leaf for leaf (pure dicts; `online` may hold more keys than `momentum`)."""
    if isinstance(momentum, dict):
        return {key: ema(value, online[key], m) for key, value in momentum.items()}
    return m * momentum + (1.0 - m) * online


def momentum_update(params: dict, m: float | jax.Array) -> dict:
    """The new `params["momentum"]` from the online parameters of the same names (the text copy: its layers only)."""
    return {part: ema(params["momentum"][part], params[part], m) for part in params["momentum"]}


__all__ = ["Momentum", "ema", "momentum_copy", "momentum_update"]
