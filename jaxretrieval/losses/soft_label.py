"""CUSA's losses (Cross-Modal and Uni-Modal Soft-Label Alignment, AAAI 2024): a hard-label contrastive term
plus KL terms that pull the student's similarity distributions towards a frozen teacher's.

With features L2-normalised, S = image_cross @ text_cross.T, S_ii / S_tt the uni-modal self-similarities and
A_I / A_T the teacher's image-image and text-text cosine similarities:

    contrastive = rate_con   * (CE(S / tau, P) + CE(S.T / tau, P)) / 2             P: same image id
    cross       = rate_cross * (KL(S, A_I) + KL(S.T, A_T)) / 2
    uni         = rate_uni   * (KL(S_ii, A_I) + KL(S_tt, A_T)) / 2
    KL(x, a)    = mean over rows of KL(softmax(a / soft_tau) || softmax(x / tau))      (torch's "batchmean")

In "mean" mode a row's cross entropy is averaged over its N columns instead of summed (so it is 1/N of the
usual InfoNCE), as the original does. Every term is a mean over rows of per-row values; `sharded_cusa_losses`
computes each device's rows against all_gather-ed columns and psums the row sums (see `distributed.py`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from jaxretrieval.losses.contrastive import positive_mask, soft_cross_entropy
from jaxretrieval.sharding import BATCH_AXES

AxisName = str | tuple[str, ...]
TEMPERATURE_KEYS = ("tau", "cross_tau_image", "cross_tau_text", "cross_soft_tau_image", "cross_soft_tau_text",
                    "uni_tau_image", "uni_tau_text", "uni_soft_tau_image", "uni_soft_tau_text")
TERMS = ("contrastive", "cross", "uni")
_MODES = ("mean", "sum")
_USE_LOSSES = ("kl", "contrastive")


@dataclasses.dataclass(frozen=True)
class SoftLabelLossConfig:
    """Which CUSA terms are on, their weights, and how rows are reduced (the original's `loss_config`)."""

    contrastive_on: bool = True
    cross_on: bool = True
    uni_on: bool = True
    rate_con: float = 1.0
    rate_cross: float = 0.1
    rate_uni: float = 0.5
    contrastive_mode: str = "mean"
    cross_use_loss: str = "kl"
    uni_use_loss: str = "kl"
    cross_mode: str = "mean"
    uni_mode: str = "mean"

    def __post_init__(self) -> None:
        for name in ("contrastive_mode", "cross_mode", "uni_mode"):
            _check(name, getattr(self, name), _MODES)
        for name in ("cross_use_loss", "uni_use_loss"):
            _check(name, getattr(self, name), _USE_LOSSES)


def _check(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def clamp_temperatures(temps: dict[str, jax.Array],
                       ranges: dict[str, tuple[float, float]]) -> dict[str, jax.Array]:
    """Clips the temperatures named in `ranges` to [low, high]; others pass through.

    The original clamps its parameters in place before each step, so call this on the parameters and keep the
    result. The clip is straight-through: inside jax.grad the gradient is the one at the clamped value, as in
    the original, rather than zero. (The original clamps a tau shared by image and text to the mean of the image
    and text ranges: give that range to both keys.)
    """
    clamped = dict(temps)
    for key, (low, high) in ranges.items():
        if key in clamped:
            value = jnp.asarray(clamped[key])
            clamped[key] = value + jax.lax.stop_gradient(jnp.clip(value, low, high) - value)
    return clamped


def soft_label_rows(logits: jax.Array, soft: jax.Array, tau: jax.Array, soft_tau: jax.Array, *,
                    use_loss: str = "kl", mode: str = "mean") -> jax.Array:
    """Per-row loss of a block of rows (b, N) against soft targets softmax(soft / soft_tau) over the same columns.

    kl: KL(targets || softmax(logits / tau)); contrastive: the soft-target cross entropy, summed over the row
    ("sum") or averaged over its N columns ("mean"). Mean over all rows gives `soft_label_kl`.
    """
    _check("use_loss", use_loss, _USE_LOSSES)
    _check("mode", mode, _MODES)
    log_targets = jax.nn.log_softmax(soft.astype(jnp.float32) / soft_tau, axis=-1)
    targets = jnp.exp(log_targets)
    if use_loss == "kl":
        log_inputs = jax.nn.log_softmax(logits.astype(jnp.float32) / tau, axis=-1)
        return jnp.sum(targets * (log_targets - log_inputs), axis=-1)
    rows = soft_cross_entropy(logits.astype(jnp.float32) / tau, targets)
    return rows / logits.shape[-1] if mode == "mean" else rows


def soft_label_kl(logits: jax.Array, soft: jax.Array, tau: jax.Array, soft_tau: jax.Array, *,
                  use_loss: str = "kl", mode: str = "mean") -> jax.Array:
    """The original's KLContrastiveSimLoss: `soft_label_rows` averaged over the rows."""
    return soft_label_rows(logits, soft, tau, soft_tau, use_loss=use_loss, mode=mode).mean()


class _Features(NamedTuple):
    """A block of rows: unit-norm float32 features (None where unused), the frozen teacher's, and image ids."""

    image_cross: jax.Array | None
    text_cross: jax.Array | None
    image_uni: jax.Array | None
    text_uni: jax.Array | None
    teacher_image: jax.Array | None
    teacher_text: jax.Array | None
    ids: jax.Array


def _unit(x: jax.Array | None) -> jax.Array | None:
    if x is None:
        return None
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _features(image_cross, text_cross, image_uni, text_uni, teacher_image, teacher_text, image_ids,
              config: SoftLabelLossConfig) -> _Features:
    cross = config.contrastive_on or config.cross_on
    teacher = config.cross_on or config.uni_on
    frozen = lambda x: jax.lax.stop_gradient(_unit(x)) if teacher else None
    on = lambda x, flag: _unit(x) if flag else None
    return _Features(on(image_cross, cross), on(text_cross, cross), on(image_uni, config.uni_on),
                     on(text_uni, config.uni_on), frozen(teacher_image), frozen(teacher_text), image_ids)


def _row_sums(rows: _Features, cols: _Features, temps: dict[str, jax.Array],
              config: SoftLabelLossConfig) -> dict[str, jax.Array]:
    """Each term's per-row values summed over `rows`, scored against all of `cols`; divide by N for the loss."""
    image_to_text = lambda: rows.image_cross @ cols.text_cross.T
    text_to_image = lambda: rows.text_cross @ cols.image_cross.T
    sums = {}
    if config.contrastive_on:
        positives = positive_mask(rows.ids, cols.ids)
        per_row = (soft_cross_entropy(image_to_text() / temps["tau"], positives)
                   + soft_cross_entropy(text_to_image() / temps["tau"], positives))
        if config.contrastive_mode == "mean":
            per_row = per_row / cols.ids.shape[0]
        sums["contrastive"] = 0.5 * config.rate_con * per_row.sum()
    if not (config.cross_on or config.uni_on):
        return sums
    teacher_images = rows.teacher_image @ cols.teacher_image.T
    teacher_texts = rows.teacher_text @ cols.teacher_text.T

    def aligned(term: str, image_logits: jax.Array, text_logits: jax.Array, use_loss: str, mode: str) -> jax.Array:
        image_rows = soft_label_rows(image_logits, teacher_images, temps[f"{term}_tau_image"],
                                     temps[f"{term}_soft_tau_image"], use_loss=use_loss, mode=mode)
        text_rows = soft_label_rows(text_logits, teacher_texts, temps[f"{term}_tau_text"],
                                    temps[f"{term}_soft_tau_text"], use_loss=use_loss, mode=mode)
        return 0.5 * (image_rows.sum() + text_rows.sum())

    if config.cross_on:
        sums["cross"] = config.rate_cross * aligned("cross", image_to_text(), text_to_image(), config.cross_use_loss,
                                                    config.cross_mode)
    if config.uni_on:
        sums["uni"] = config.rate_uni * aligned("uni", rows.image_uni @ cols.image_uni.T,
                                                rows.text_uni @ cols.text_uni.T, config.uni_use_loss, config.uni_mode)
    return sums


def _losses(sums: dict[str, jax.Array], total: int) -> dict[str, jax.Array]:
    losses = {term: sums[term] / total if term in sums else jnp.zeros((), jnp.float32) for term in TERMS}
    losses["total"] = losses["contrastive"] + losses["cross"] + losses["uni"]
    return losses


def cusa_losses(image_cross: jax.Array, text_cross: jax.Array, image_uni: jax.Array | None,
                text_uni: jax.Array | None, teacher_image: jax.Array, teacher_text: jax.Array,
                image_ids: jax.Array | None, temps: dict[str, jax.Array],
                config: SoftLabelLossConfig) -> dict[str, jax.Array]:
    """CUSA's three terms and their sum on one device: {"contrastive", "cross", "uni", "total"} (0.0 when off).

    Features (N, d) are L2-normalised here (gradients flow through the normalisation); row i of each array is
    one image-text pair. Teacher features (N, d_teacher), any width, get no gradient. image_ids (N,) group the
    pairs for the contrastive term (None: each pair its own group). temps: the `TEMPERATURE_KEYS` the terms
    that are on use, already clamped (`clamp_temperatures`); logits are divided by them.
    """
    features = _features(image_cross, text_cross, image_uni, text_uni, teacher_image, teacher_text,
                         jnp.arange(image_cross.shape[0]) if image_ids is None else image_ids, config)
    return _losses(_row_sums(features, features, temps, config), image_cross.shape[0])


def gathered_cusa_losses(image_cross: jax.Array, text_cross: jax.Array, image_uni: jax.Array | None,
                         text_uni: jax.Array | None, teacher_image: jax.Array, teacher_text: jax.Array,
                         image_ids: jax.Array, temps: dict[str, jax.Array], config: SoftLabelLossConfig,
                         axis_name: AxisName = BATCH_AXES) -> dict[str, jax.Array]:
    """`cusa_losses` of the global batch from inside a shard_map: this device's rows against all_gather-ed
    columns (b x N similarities per term), row sums psum-ed; the same values on every device."""
    rows = _features(image_cross, text_cross, image_uni, text_uni, teacher_image, teacher_text, image_ids, config)
    cols = jax.tree.map(lambda a: jax.lax.all_gather(a, axis_name, tiled=True), rows)
    sums = jax.lax.psum(_row_sums(rows, cols, temps, config), axis_name)
    return _losses(sums, cols.ids.shape[0])


def sharded_cusa_losses(mesh: Mesh, axis_name: AxisName = BATCH_AXES,
                        variant: str = "gathered") -> Callable[..., dict[str, jax.Array]]:
    """`cusa_losses` on global arrays whose batch dimension is split over `axis_name` of `mesh`.

    The returned function has `cusa_losses`'s signature, values and gradients (take them outside it); batch
    arrays are taken as P(axis_name), temperatures replicated. Only the "gathered" variant exists.
    """
    if variant != "gathered":
        raise ValueError(f"unknown CUSA loss variant {variant!r}; only 'gathered' is implemented")
    batch, replicated = PartitionSpec(axis_name), PartitionSpec()

    def losses(image_cross: jax.Array, text_cross: jax.Array, image_uni: jax.Array | None,
               text_uni: jax.Array | None, teacher_image: jax.Array, teacher_text: jax.Array,
               image_ids: jax.Array | None, temps: dict[str, jax.Array],
               config: SoftLabelLossConfig) -> dict[str, jax.Array]:
        body = lambda *args: gathered_cusa_losses(*args, config=config, axis_name=axis_name)
        mapped = jax.shard_map(body, mesh=mesh, in_specs=(batch,) * 7 + (replicated,), out_specs=replicated)
        ids = jnp.arange(image_cross.shape[0]) if image_ids is None else image_ids
        temps = {key: jnp.asarray(value, jnp.float32) for key, value in temps.items()}
        return mapped(image_cross, text_cross, image_uni, text_uni, teacher_image, teacher_text, ids, temps)

    losses.__doc__ = f"CUSA losses (gathered) over the mesh's {axis_name} axes; see `sharded_cusa_losses`."
    return losses
