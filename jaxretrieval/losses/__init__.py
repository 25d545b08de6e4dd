from jaxretrieval.losses.contrastive import contrastive_loss, positive_mask, soft_cross_entropy

__all__ = ["contrastive_loss", "positive_mask", "soft_cross_entropy"]
