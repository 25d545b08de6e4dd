"""Generalized Pooling Operator (GPO) of VSE-infinity (Chen et al., CVPR 2021; woodfrog/vse_infty,
lib/modules/aggr/gpo.py), with the bidirectional GRU it generates its pooling weights with.

GPO pools a padded set of K feature vectors (B, K, D) with per-row lengths into one (B, D) vector. Each feature
dimension is sorted over the set, largest first, and the sorted values are summed with weights that depend only on
the rank and the set's length:

- every position p < length gets the sine / cosine positional encoding of p (`positional_encoding`, d_pe = 32);
- a one-layer bidirectional GRU (hidden 32) reads the encodings of the valid positions only (the original packs
  them with pack_padded_sequence, so the backward direction starts at each row's last valid position); the two
  directions' outputs are averaged;
- a bias-free linear layer scores each position; positions at or past the length score -10000;
- weights = softmax(scores / 0.1) over the positions, (B, K, 1);
- features: padded positions are filled with -10000, each dimension is sorted in descending order along the set
  axis, the positions past the length are zeroed again, and pooled = sum_p weights[p] * sorted[p] (computed here as
  sum_i weights[rank_i] * x_i from each value's rank, see `descending_ranks`).

The original trims the set to max(lengths) first; here the set keeps its static K, and the positions past every
row's length get weight exactly 0 (exp(-1e5) underflows), so pooled equals the original's and `weights[:, :max]`
its weights. Lengths must be at least 1 (pack_padded_sequence refuses 0). The GRU and the pooling run in float32
(float64 for float64 inputs and parameters, under jax_enable_x64), matrix products at full precision (no TF32 /
bf16 rounding on accelerators).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["BiGRU", "GPO", "GRUDirection", "flat_from_torch", "positional_encoding"]

HIGHEST = jax.lax.Precision.HIGHEST
MASKED_SCORE = -10000.0  # the score of a position past the length, and the fill of padded features before sorting
TEMPERATURE = 0.1


def positional_encoding(length: int, d: int, dtype: Any = jnp.float32) -> jax.Array:
    """(length, d) sine / cosine encodings as vse_infty's positional_encoding_1d(d, length) (float32 there):
    column 2i holds sin(p * w_i) and column 2i + 1 cos(p * w_i), w_i = exp(-2i * ln(10000) / d)."""
    if d % 2:
        raise ValueError(f"sine / cosine positional encoding needs an even width, got {d}")
    frequencies = jnp.exp(jnp.arange(0, d, 2, dtype=dtype) * jnp.asarray(-math.log(10000.0) / d, dtype))
    angles = jnp.arange(length, dtype=dtype)[:, None] * frequencies[None, :]
    return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(length, d)


def _torch_uniform(bound: float):
    """torch's default RNN / Linear initialiser: uniform on [-bound, bound)."""
    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def valid_mask(lengths: jax.Array, size: int) -> jax.Array:
    """(B, size) bool, True at the positions before each row's length."""
    return jnp.arange(size)[None, :] < jnp.asarray(lengths).astype(jnp.int32)[:, None]


class GRUDirection(nnx.Module):
    """One direction of a torch.nn.GRU layer. The kernels are torch's weight_ih / weight_hh transposed, gate blocks
    in torch's r | z | n order:

        r = sigmoid(x W_ir + b_ir + h W_hr + b_hr)
        z = sigmoid(x W_iz + b_iz + h W_hz + b_hz)
        n = tanh(x W_in + b_in + r * (h W_hn + b_hn))
        h' = (1 - z) * n + z * h
    """

    def __init__(self, d_in: int, d_hidden: int, *, rngs: nnx.Rngs):
        init = _torch_uniform(1.0 / math.sqrt(d_hidden))
        self.d_hidden = d_hidden
        self.input_kernel = nnx.Param(init(rngs.params(), (d_in, 3 * d_hidden)))
        self.hidden_kernel = nnx.Param(init(rngs.params(), (d_hidden, 3 * d_hidden)))
        self.input_bias = nnx.Param(init(rngs.params(), (3 * d_hidden,)))
        self.hidden_bias = nnx.Param(init(rngs.params(), (3 * d_hidden,)))

    def __call__(self, x: jax.Array, valid: jax.Array, *, reverse: bool) -> tuple[jax.Array, jax.Array]:
        """x (B, T, I), valid (B, T) bool with the valid positions first -> (outputs (B, T, H), zero where not
        valid; final state (B, H)). The state starts at zero and holds still over the invalid positions, so the
        reverse direction starts at each row's last valid position and the forward one ends there."""
        h_dim = self.d_hidden
        w_hh, b_hh = self.hidden_kernel[...], self.hidden_bias[...]
        # The input projections of every step at once; only the recurrent product stays in the loop.
        projected = jnp.matmul(x, self.input_kernel[...], precision=HIGHEST) + self.input_bias[...]

        def step(h: jax.Array, inputs: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
            gi, keep = inputs
            gh = jnp.matmul(h, w_hh, precision=HIGHEST) + b_hh
            r = jax.nn.sigmoid(gi[:, :h_dim] + gh[:, :h_dim])
            z = jax.nn.sigmoid(gi[:, h_dim:2 * h_dim] + gh[:, h_dim:2 * h_dim])
            n = jnp.tanh(gi[:, 2 * h_dim:] + r * gh[:, 2 * h_dim:])
            h_new = jnp.where(keep[:, None], (1.0 - z) * n + z * h, h)
            return h_new, jnp.where(keep[:, None], h_new, 0.0)

        h0 = jnp.zeros((x.shape[0], h_dim), projected.dtype)
        final, outputs = jax.lax.scan(step, h0, (jnp.swapaxes(projected, 0, 1), jnp.swapaxes(valid, 0, 1)),
                                      reverse=reverse)
        return jnp.swapaxes(outputs, 0, 1), final


class BiGRU(nnx.Module):
    """One-layer bidirectional batch-first GRU over variable-length rows, as torch.nn.GRU(bidirectional=True) over
    a pack_padded_sequence and back through pad_packed_sequence."""

    def __init__(self, d_in: int, d_hidden: int, *, rngs: nnx.Rngs):
        self.forward = GRUDirection(d_in, d_hidden, rngs=rngs)
        self.backward = GRUDirection(d_in, d_hidden, rngs=rngs)

    def __call__(self, x: jax.Array, lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x (B, T, I), lengths (B,) in [1, T] -> (outputs (B, T, 2H): [forward | backward], zero past each length;
        h_n (2, B, H): the forward state after the last valid step, the backward state after position 0)."""
        x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        valid = valid_mask(lengths, x.shape[1])
        ahead, h_ahead = self.forward(x, valid, reverse=False)
        behind, h_behind = self.backward(x, valid, reverse=True)
        return jnp.concatenate([ahead, behind], axis=-1), jnp.stack([h_ahead, h_behind])


class GPO(nnx.Module):
    """VSE-infinity's Generalized Pooling Operator (see the module docstring)."""

    def __init__(self, d_pe: int = 32, d_hidden: int = 32, *, rngs: nnx.Rngs):
        self.d_pe = d_pe
        self.gru = BiGRU(d_pe, d_hidden, rngs=rngs)
        self.linear = nnx.Linear(d_hidden, 1, use_bias=False, param_dtype=jnp.float32,
                                 kernel_init=_torch_uniform(1.0 / math.sqrt(d_hidden)), rngs=rngs)

    def pool_weights(self, lengths: jax.Array, size: int, dtype: Any = jnp.float32) -> jax.Array:
        """(B, size, 1) softmax weights over the positions; 0 past each row's length."""
        valid = valid_mask(lengths, size)[..., None]
        encodings = jnp.where(valid, positional_encoding(size, self.d_pe, dtype)[None], 0.0)
        outputs, _ = self.gru(encodings, lengths)
        half = outputs.shape[-1] // 2
        averaged = (outputs[..., :half] + outputs[..., half:]) / 2
        scores = jnp.matmul(averaged, self.linear.kernel[...], precision=HIGHEST)
        scores = jnp.where(valid, scores, MASKED_SCORE)
        return jax.nn.softmax(scores / TEMPERATURE, axis=1)

    def __call__(self, features: jax.Array, lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
        """features (B, K, D), lengths (B,) in [1, K] -> (pooled (B, D), weights (B, K, 1)), in float32 (float64
        for float64 features, given float64 parameters too)."""
        dtype = jnp.promote_types(features.dtype, jnp.float32)
        weights = self.pool_weights(lengths, features.shape[1], dtype)
        valid = valid_mask(lengths, features.shape[1])[..., None]
        x = features.astype(dtype)
        rank = descending_ranks(jnp.where(valid, x, MASKED_SCORE))
        # sum_p weights[p] * sorted[p] = sum_i weights[rank_i] * x_i: no sort, and the gradient reaches x_i as the
        # sort's does (weights[rank_i]); a set of a few dozen ranks this way faster than XLA sorts it
        picked = jnp.take_along_axis(jnp.broadcast_to(weights, x.shape), rank, axis=1)
        return jnp.sum(jnp.where(valid, x * picked, 0.0), axis=1), weights


def descending_ranks(x: jax.Array) -> jax.Array:
    """(B, K, D) int32: the position each value takes when its dimension is sorted descending along K, ties in
    index order (a stable sort's); computed by counting the values that come before it, without gradient."""
    x = jax.lax.stop_gradient(x)
    index = jnp.arange(x.shape[1])
    earlier = (index[None, :] < index[:, None])[None, :, :, None]  # [i, j]: j precedes i
    before = (x[:, None] > x[:, :, None]) | ((x[:, None] == x[:, :, None]) & earlier)
    return jnp.sum(before, axis=2, dtype=jnp.int32)


def _numpy(value: Any, dtype: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().double().numpy()
    return np.asarray(value, dtype)


# vse_infty GPO key -> (our path, transpose?)
_TORCH_NAMES = {
    "gru.weight_ih_l0": ("gru/forward/input_kernel", True),
    "gru.weight_hh_l0": ("gru/forward/hidden_kernel", True),
    "gru.bias_ih_l0": ("gru/forward/input_bias", False),
    "gru.bias_hh_l0": ("gru/forward/hidden_bias", False),
    "gru.weight_ih_l0_reverse": ("gru/backward/input_kernel", True),
    "gru.weight_hh_l0_reverse": ("gru/backward/hidden_kernel", True),
    "gru.bias_ih_l0_reverse": ("gru/backward/input_bias", False),
    "gru.bias_hh_l0_reverse": ("gru/backward/hidden_bias", False),
    "linear.weight": ("linear/kernel", True),
}


def flat_from_torch(state_dict: Mapping[str, Any], prefix: str = "", dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """vse_infty GPO state dict (numpy arrays or torch tensors) -> {our path: array of `dtype`}, e.g.
    `gru/backward/hidden_kernel`; weights are transposed to (in, out). `prefix`: where the GPO sits in the dict
    (`img_enc.gpool.` / `txt_enc.gpool.` in a VSE-infinity checkpoint, with `module.` inserted by DataParallel).
    A missing or unplaced key is a ValueError listing them. Place the result into a model with
    `jaxretrieval.models.stacking.relayout(flat, nnx.to_pure_dict(nnx.state(gpo)))` and
    `nnx.replace_by_pure_dict`."""
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    missing = sorted(k for k in _TORCH_NAMES if k not in sd)
    extra = sorted(k for k in sd if k not in _TORCH_NAMES)
    if missing or extra:
        raise ValueError("GPO state dict does not fit: " + "; ".join(
            f"{what} keys: {', '.join(keys)}" for what, keys in (("missing", missing), ("unplaced", extra)) if keys))
    flat = {}
    for theirs, (ours, transpose) in _TORCH_NAMES.items():
        value = _numpy(sd[theirs], dtype)
        flat[ours] = value.T.copy() if transpose else value
    return flat
