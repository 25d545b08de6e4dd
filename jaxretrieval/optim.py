"""Optimiser: AdamW with linear warmup and cosine decay, decay masked to matrices, global-norm clipping."""

from __future__ import annotations

from typing import Any

import jax
import optax

from jaxretrieval.config import TrainConfig


def learning_rate(config: TrainConfig) -> optax.Schedule:
    warmup = min(config.warmup_steps, config.steps)
    return optax.warmup_cosine_decay_schedule(0.0, config.lr, warmup, max(config.steps, warmup + 1),
                                              config.end_lr)


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices and embeddings only: no biases, norm gains, class token or logit scale."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(learning_rate(config), b1=config.b1, b2=config.b2, eps=config.eps,
                        weight_decay=config.weight_decay, mask=decay_mask)
    if config.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)
    return adamw
