"""ResNet-50 (torchvision's v1.5 layout) and ResNet-50-IBN-a, NHWC, with PyTorch's batch-norm semantics.

Bottleneck blocks put the stride on the 3x3 convolution. `last_stride=1` keeps layer 4 at the resolution of
layer 3 (the re-identification convention). `stem_relu=False` is the Centroids-ReID ResNet, whose stem omits the
ReLU after bn1 (torchvision and IBN-a keep it). With `ibn=True` the first norm of every block in layers 1-3 is
IBN: InstanceNorm (affine) on the first half of the channels, BatchNorm on the rest; layer 4 is plain.

Batch norm follows torch.nn.BatchNorm2d exactly: train mode normalises with the biased batch variance and moves
the running statistics by momentum 0.1 towards the batch mean and the *unbiased* batch variance; eval mode uses
the running statistics. Statistics are kept and computed in float32 whatever the compute dtype.

Synchronised batch norm needs no extra code: under `jax.jit`, with the batch a global array sharded over mesh
axes, the batch mean and variance are reductions over the global batch, which XLA turns into cross-device
all-reduces. A train-mode step on 8 devices therefore gives the outputs and running statistics of one device
seeing the whole batch (PyTorch's SyncBatchNorm, not its per-device default). Under a mesh (`sharding.under_mesh`)
every block's output is pinned batch-sharded.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxretrieval.sharding import constrain

EXPANSION = 4
# Kaiming normal over fan-out (out channels x kernel area), as torchvision and the IBN-a code initialise convs.
CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


class FrozenParam(nnx.Variable):
    """A learned value that training leaves alone (PyTorch's requires_grad=False): saved and restored with the
    model, but not an `nnx.Param`, so optimisers built over `nnx.Param` never see it."""


class BatchNorm(nnx.Module):
    """torch.nn.BatchNorm{1,2}d over the last axis: eps 1e-5, momentum 0.1, affine, running statistics."""

    def __init__(self, features: int, *, momentum: float = 0.1, epsilon: float = 1e-5, frozen_bias: bool = False):
        self.momentum = momentum
        self.epsilon = epsilon
        self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
        self.bias = (FrozenParam if frozen_bias else nnx.Param)(jnp.zeros((features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((features,), jnp.float32))

    def __call__(self, x: jax.Array, *, train: bool, rows: jax.Array | None = None) -> jax.Array:
        """rows (train mode): a bool mask of x's shape without the channel axis; the statistics come from the rows
        where it is True only (what torch sees of a batch cut to its longest member), every row is normalised."""
        y = x.astype(jnp.float32)
        if train:
            axes = tuple(range(x.ndim - 1))
            count = x.size // x.shape[-1]
            if count < 2:
                raise ValueError(f"batch norm in train mode needs more than 1 value per channel, got input {x.shape}")
            if rows is None:
                mean = jnp.mean(y, axis=axes)
                var = jnp.mean(jnp.square(y - mean), axis=axes)
            else:
                weight = rows[..., None].astype(jnp.float32)
                count = jnp.maximum(weight.sum(), 2.0)
                mean = jnp.sum(weight * y, axis=axes) / count
                var = jnp.sum(weight * jnp.square(y - mean), axis=axes) / count
            m = self.momentum
            stats = jax.lax.stop_gradient((mean, var * (count / (count - 1))))
            self.mean[...] = (1 - m) * self.mean[...] + m * stats[0]
            self.var[...] = (1 - m) * self.var[...] + m * stats[1]
        else:
            mean, var = self.mean[...], self.var[...]
        y = (y - mean) * (jax.lax.rsqrt(var + self.epsilon) * self.scale[...]) + self.bias[...]
        return y.astype(x.dtype)


class InstanceNorm(nnx.Module):
    """torch.nn.InstanceNorm2d(affine=True) on NHWC: per sample and channel over H and W, no running statistics."""

    def __init__(self, features: int, *, epsilon: float = 1e-5):
        self.epsilon = epsilon
        self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x.astype(jnp.float32)
        mean = jnp.mean(y, axis=(1, 2), keepdims=True)
        var = jnp.mean(jnp.square(y - mean), axis=(1, 2), keepdims=True)
        y = (y - mean) * jax.lax.rsqrt(var + self.epsilon) * self.scale[...] + self.bias[...]
        return y.astype(x.dtype)


class IBN(nnx.Module):
    """IBN-a's split norm: InstanceNorm on the first planes // 2 channels, BatchNorm on the remaining ones."""

    def __init__(self, planes: int):
        self.half = planes // 2
        self.IN = InstanceNorm(self.half)
        self.BN = BatchNorm(planes - self.half)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        return jnp.concatenate([self.IN(x[..., :self.half]), self.BN(x[..., self.half:], train=train)], axis=-1)


def conv(d_in: int, d_out: int, size: int, stride: int = 1, *, rngs: nnx.Rngs, dtype: Any) -> nnx.Conv:
    pad = size // 2
    return nnx.Conv(d_in, d_out, (size, size), strides=stride, padding=((pad, pad), (pad, pad)), use_bias=False,
                    dtype=dtype, param_dtype=jnp.float32, kernel_init=CONV_INIT, rngs=rngs)


class Downsample(nnx.Module):
    """The projection shortcut: 1x1 conv (with the block's stride) then batch norm."""

    def __init__(self, d_in: int, d_out: int, stride: int, *, rngs: nnx.Rngs, dtype: Any):
        self.conv = conv(d_in, d_out, 1, stride, rngs=rngs, dtype=dtype)
        self.bn = BatchNorm(d_out)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        return self.bn(self.conv(x), train=train)


class Bottleneck(nnx.Module):
    def __init__(self, d_in: int, planes: int, stride: int, *, ibn: bool, rngs: nnx.Rngs, dtype: Any):
        d_out = planes * EXPANSION
        self.conv1 = conv(d_in, planes, 1, rngs=rngs, dtype=dtype)
        self.bn1 = IBN(planes) if ibn else BatchNorm(planes)
        self.conv2 = conv(planes, planes, 3, stride, rngs=rngs, dtype=dtype)
        self.bn2 = BatchNorm(planes)
        self.conv3 = conv(planes, d_out, 1, rngs=rngs, dtype=dtype)
        self.bn3 = BatchNorm(d_out)
        needs_projection = stride != 1 or d_in != d_out
        self.downsample = Downsample(d_in, d_out, stride, rngs=rngs, dtype=dtype) if needs_projection else None

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        y = jax.nn.relu(self.bn1(self.conv1(x), train=train))
        y = jax.nn.relu(self.bn2(self.conv2(y), train=train))
        y = self.bn3(self.conv3(y), train=train)
        shortcut = x if self.downsample is None else self.downsample(x, train=train)
        return constrain(jax.nn.relu(y + shortcut), "batch", None, None, None)


class ResNet(nnx.Module):
    """Stem (7x7/2 conv, bn, optional ReLU, 3x3/2 max pool) and four bottleneck stages; returns the last feature
    map, (batch, height / 16, width / 16, 32 * width) at last_stride 1. Attribute names follow torchvision's keys."""

    def __init__(self, *, layers: tuple[int, ...] = (3, 4, 6, 3), width: int = 64, last_stride: int = 1,
                 stem_relu: bool = False, ibn: bool = False, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if len(layers) != 4:
            raise ValueError(f"a ResNet has 4 stages, got layers={layers}")
        self.stem_relu = stem_relu
        self.dtype = dtype
        self.conv1 = conv(3, width, 7, 2, rngs=rngs, dtype=dtype)
        self.bn1 = BatchNorm(width)
        d_in = width
        for i, blocks in enumerate(layers):
            planes = width * 2**i
            stride = (1, 2, 2, last_stride)[i]
            stage = []
            for j in range(blocks):
                # IBN-a leaves the last stage (planes 8 * width) plain.
                stage.append(Bottleneck(d_in, planes, stride if j == 0 else 1, ibn=ibn and i < 3, rngs=rngs,
                                        dtype=dtype))
                d_in = planes * EXPANSION
            setattr(self, f"layer{i + 1}", nnx.List(stage))
        self.features = d_in

    def stages(self) -> list[nnx.List]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """x: (batch, height, width, 3) normalised pixels."""
        x = self.bn1(self.conv1(x.astype(self.dtype)), train=train)
        if self.stem_relu:
            x = jax.nn.relu(x)
        x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage in self.stages():
            for block in stage:
                x = block(x, train=train)
        return x


__all__ = ["BatchNorm", "Bottleneck", "FrozenParam", "IBN", "InstanceNorm", "ResNet"]
