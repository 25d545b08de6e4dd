"""Optimiser: AdamW with linear warmup and cosine decay, decay masked to matrices, global-norm clipping, and
layer-wise learning-rate decay where the system defines layer depths."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxretrieval.config import TrainConfig
from jaxretrieval.sharding import is_stacked, path_name

# (parameter path -> depth, the depth of the top): what layer-wise lr decay needs from a system.
LayerDepth = tuple[Callable[[str], int], int]


def learning_rate(config: TrainConfig) -> optax.Schedule:
    if config.schedule == "multistep":
        return multistep_by_epoch(config)
    if config.schedule == "xvlm_step":
        return xvlm_step(config)
    warmup = min(config.warmup_steps, config.steps)
    return optax.warmup_cosine_decay_schedule(0.0, config.lr, warmup, max(config.steps, warmup + 1),
                                              config.end_lr)


def multistep_by_epoch(config: TrainConfig) -> optax.Schedule:
    """Centroids-ReID's per-epoch staircase: lr x min(1, (epoch + 1) / warmup_epochs) x gamma ** (milestones
    passed), epoch = the update's index x epochs / steps (steps = epochs x batches per epoch)."""
    milestones = jnp.asarray(list(config.milestones) or [config.epochs + 1], jnp.float32)
    decays = jnp.asarray(config.gamma, jnp.float32) ** jnp.arange(1, milestones.size + 1, dtype=jnp.float32)

    def schedule(count: jax.Array) -> jax.Array:
        epoch = jnp.floor(count * config.epochs / config.steps)
        warm = jnp.minimum(1.0, (epoch + 1) / config.warmup_epochs) if config.warmup_epochs else 1.0
        passed = jnp.sum(epoch >= milestones)
        return config.lr * warm * jnp.where(passed > 0, decays[jnp.maximum(passed - 1, 0)], 1.0)

    return schedule


def xvlm_step(config: TrainConfig) -> optax.Schedule:
    """X-VLM's (and UIT's) 'step' schedule: linear warmup over warmup_steps W, then lr x f x (steps - t) / (steps -
    W), f = 1 until 4W, 0.5 until 7W, 0.2 after."""
    warmup, total = config.warmup_steps, config.steps

    def schedule(count: jax.Array) -> jax.Array:
        t = jnp.asarray(count, jnp.float32)
        factor = jnp.where(t < 4 * warmup, 1.0, jnp.where(t < 7 * warmup, 0.5, 0.2))
        decay = jnp.maximum(0.0, (total - t) / max(1, total - warmup))
        return config.lr * jnp.where(t < warmup, t / max(1, warmup), factor * decay)

    return schedule


def decay_mask(params: Any, exclude: Sequence[str] = (), vectors: bool = False) -> Any:
    """Weight decay on matrices and embeddings only (no biases, norm gains, class token or logit scale; with
    `vectors` on every parameter, as torch's AdamW with one weight_decay for all groups), and not on parameters whose
    path matches a regex in `exclude`. A stacked layer parameter is judged per layer (its leading layer axis does not
    count)."""
    def decays(path: tuple, p: Any) -> bool:
        name = path_name(path)
        rank = np.ndim(p) - (1 if is_stacked(name) else 0)
        return (vectors or rank >= 2) and not any(re.search(pattern, name) for pattern in exclude)

    return jax.tree_util.tree_map_with_path(decays, params)


def path_scales(params: Any, scale_of: Callable[[str], Any]) -> Any:
    """scale_of(path) per parameter: a number, or for a stacked layer parameter one number per layer, shaped to
    broadcast along its first axis."""
    def scale(path: tuple, leaf: Any) -> Any:
        factor = np.asarray(scale_of(path_name(path)), np.float64)
        if factor.ndim:
            return factor.reshape(-1, *[1] * (np.ndim(leaf) - 1)).astype(np.float32)
        return float(factor)

    return jax.tree_util.tree_map_with_path(scale, params)


def layer_lr_scales(params: Any, depth: LayerDepth, decay: float) -> Any:
    """decay ** (top - depth) per parameter: the top (heads) learns at the full rate, embeddings slowest."""
    depth_of, top = depth
    return path_scales(params, lambda name: decay ** (top - np.asarray(depth_of(name), np.float64)))


def scale_updates(scales: Callable[[Any], Any]) -> optax.GradientTransformation:
    """Updates times `scales(updates)` leaf by leaf. Scaling the whole AdamW update scales the rate its decoupled
    weight decay is applied at as well, which is what torch's per-group lr does (unilm's layer-decay groups, X-VLM's
    lr_mult groups)."""
    def scale(updates: Any, params: Any = None) -> Any:
        return jax.tree.map(lambda u, s: u * s, updates, scales(updates))

    return optax.stateless(scale)


def make_optimizer(config: TrainConfig, depth: LayerDepth | None = None, roles: Any = None,
                   role_optimizers: dict[str, optax.GradientTransformation] | None = None,
                   lr_scale: Callable[[str], Any] | None = None) -> optax.GradientTransformation:
    """The model's optimiser for the "param" leaves of `roles` (models.parameter_roles); "state" leaves get no update
    and any other role its optimiser in `role_optimizers` (a system's, e.g. Centroids-ReID's centres). `lr_scale`
    (parameter path -> a learning-rate factor, per layer for a stack) is a system's per-parameter lr multiplier."""
    lr = learning_rate(config)
    if config.optimizer == "adam":  # torch.optim.Adam: L2 weight decay on every parameter, added to the gradient
        adam = optax.chain(optax.add_decayed_weights(config.weight_decay),
                           optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps),
                           optax.scale_by_learning_rate(lr))
    else:
        adam = optax.adamw(lr, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay,
                           mask=lambda p: decay_mask(p, config.no_decay, config.decay_vectors))
    parts = [optax.clip_by_global_norm(config.grad_clip)] if config.grad_clip > 0 else []
    parts.append(adam)
    if config.layer_decay < 1:
        if depth is None:
            raise ValueError("train.layer_decay < 1 needs a system that defines layer depths (beit3)")
        parts.append(scale_updates(lambda u: layer_lr_scales(u, depth, config.layer_decay)))
    if lr_scale is not None:
        parts.append(scale_updates(lambda u: path_scales(u, lr_scale)))
    main = parts[0] if len(parts) == 1 else optax.chain(*parts)
    if roles is None or set(jax.tree.leaves(roles)) == {"param"}:
        return main
    transforms = {"param": main, "state": optax.set_to_zero(), **(role_optimizers or {})}
    missing = set(jax.tree.leaves(roles)) - transforms.keys()
    if missing:
        raise ValueError(f"no optimiser for the parameter roles {sorted(missing)}")
    return optax.multi_transform(transforms, roles)
