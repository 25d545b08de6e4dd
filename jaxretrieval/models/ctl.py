"""Centroids-ReID's CTL model: a ResNet-50 (or -IBN-a) backbone, global average pooling, a BNNeck and an
identity classifier, plus the class centres of its center loss.

The pooled feature f feeds the triplet and center losses; the BNNeck (BatchNorm1d with a frozen zero bias) gives
bn(f), which feeds the bias-free classifier in training and is the retrieval embedding in evaluation.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxretrieval.models.clip import l2_normalize
from jaxretrieval.models.resnet import BatchNorm, ResNet


class CenterLoss(nnx.Module):
    """Holds the center loss's class centres, standard normal at initialisation as in the original."""

    def __init__(self, num_classes: int, features: int, *, rngs: nnx.Rngs):
        self.centers = nnx.Param(jax.random.normal(rngs.params(), (num_classes, features), jnp.float32))


class CTLModel(nnx.Module):
    def __init__(self, num_classes: int, *, layers: tuple[int, ...] = (3, 4, 6, 3), width: int = 64,
                 last_stride: int = 1, stem_relu: bool | None = None, ibn: bool = False, dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        """stem_relu None: as the original, a stem ReLU with IBN-a only."""
        self.backbone = ResNet(layers=layers, width=width, last_stride=last_stride,
                               stem_relu=ibn if stem_relu is None else stem_relu, ibn=ibn, dtype=dtype, rngs=rngs)
        features = self.backbone.features
        self.neck = BatchNorm(features, frozen_bias=True)
        self.classifier = nnx.Linear(features, num_classes, use_bias=False, param_dtype=jnp.float32,
                                     kernel_init=nnx.initializers.normal(0.001), rngs=rngs)
        self.center_loss = CenterLoss(num_classes, features, rngs=rngs)

    def pool(self, pixels: jax.Array, *, train: bool) -> jax.Array:
        """f: the backbone's last feature map averaged over space, float32 (batch, 32 * width)."""
        return jnp.mean(self.backbone(pixels, train=train).astype(jnp.float32), axis=(1, 2))

    def __call__(self, pixels: jax.Array, *, train: bool) -> dict[str, jax.Array]:
        """pixels (batch, height, width, 3) -> features f, neck bn(f) and logits classifier(bn(f)). In train mode
        every batch norm uses and updates batch statistics."""
        features = self.pool(pixels, train=train)
        neck = self.neck(features, train=train)
        return {"features": features, "neck": neck, "logits": self.classifier(neck)}

    def encode_image(self, pixels: jax.Array, normalize: bool = True) -> jax.Array:
        """The retrieval embedding: eval-mode bn(f), L2-normalised when `normalize`."""
        neck = self.neck(self.pool(pixels, train=False), train=False)
        return l2_normalize(neck) if normalize else neck


__all__ = ["CTLModel", "CenterLoss"]
