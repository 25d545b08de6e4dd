"""Analytic FLOPs of one contrastive train step, counted from the model's shapes (2 FLOPs per multiply-add).

Forward: every matmul of every layer (q, k, v and output projections, the MLP, patch embedding, projections and
heads) plus attention's two matmuls (scores q k^T and the weighted sum of v), which grow with the sequence squared.
Training is three times the forward (the backward pass costs two forwards' matmuls). Norms, activations, softmax,
the loss and the optimizer are left out: they are a few percent at these sizes and run off the matrix units. This
is the count MFU is quoted from (as in PaLM's appendix B, without rematerialisation); XLA's cost analysis misses
library calls (cuBLAS, cuDNN) and counts a scanned layer once, so it cannot stand in for it.
"""

from __future__ import annotations

from typing import Any


def encoder_flops(tokens: int, width: int, hidden: int, layers: int) -> float:
    """Forward FLOPs of `layers` transformer layers over one sequence of `tokens`."""
    projections = 2 * tokens * (4 * width * width + 2 * width * hidden)
    attention = 2 * 2 * tokens * tokens * width
    return layers * (projections + attention)


def forward_flops(model: Any) -> float:
    """Forward FLOPs of one image and one caption through the model a ModelConfig describes (clip or beit3)."""
    image, text = model.image, model.text
    patches = (image.image_size // image.patch_size) ** 2
    patch_embed = 2 * patches * image.patch_size ** 2 * 3
    if model.family == "beit3":  # the image-only and text-only forwards of the one multiway encoder
        m = model.multiway
        heads = 2 * 2 * m.width * m.width
        return (patch_embed * m.width + encoder_flops(patches + 1, m.width, m.ffn_dim, m.layers)
                + encoder_flops(text.context_length, m.width, m.ffn_dim, m.layers) + heads)
    vision = patch_embed * image.width + encoder_flops(patches + 1, image.width, int(image.width * image.mlp_ratio),
                                                       image.layers) + 2 * image.width * model.embed_dim
    language = encoder_flops(text.context_length, text.width, int(text.width * text.mlp_ratio), text.layers) \
        + 2 * text.width * model.embed_dim
    return vision + language


def train_step_flops(model: Any, batch: int) -> float:
    """FLOPs of a train step: forward and backward (3 x forward) over `batch` image-caption pairs."""
    return 3.0 * batch * forward_flops(model)
