from jaxretrieval.losses.contrastive import contrastive_loss, positive_mask, soft_cross_entropy
from jaxretrieval.losses.distributed import (
    gathered_contrastive_loss,
    gathered_sigmoid_loss,
    ring_contrastive_loss,
    ring_sigmoid_loss,
    sharded_loss,
    sigmoid_loss,
    training_loss,
)

__all__ = [
    "contrastive_loss",
    "gathered_contrastive_loss",
    "gathered_sigmoid_loss",
    "positive_mask",
    "ring_contrastive_loss",
    "ring_sigmoid_loss",
    "sharded_loss",
    "sigmoid_loss",
    "soft_cross_entropy",
    "training_loss",
]
