"""VSE-infinity's encoders in PyTorch, composed here from vse_infty's formulation (lib/encoders.py EncoderImageAggr and
EncoderText, lib/modules/mlp.py MLP, lib/modules/aggr/gpo.py GPO, lib/loss.py ContrastiveLoss) with transformers'
BertModel: the reference that tests/test_vse_model.py compares models/vse.py with and benchmarks/vse_step.py times.

Module and parameter names follow the original's, so `state_dict()` is the layout of a released checkpoint's
`model` = [img_enc state dict, txt_enc state dict] (`mlp.bns.1` included, which the forward never uses). The GPO is
tests/test_gpo.py's reference, made device-aware (the positional encodings and masks follow the features' device;
pack_padded_sequence takes its lengths on the CPU, as the original passes them).
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from test_gpo import RefGPO, ref_bigru, ref_encoding
from torch import nn


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """x / (||x|| + 1e-8) along the last axis."""
    return x / (x.pow(2).sum(dim=-1, keepdim=True).sqrt() + 1e-8)


class GPO(RefGPO):
    """tests/test_gpo.py's RefGPO (the original's pooling) on any device."""

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device, cpu_lengths = features.device, lengths.detach().long().cpu()
        longest = int(cpu_lengths.max())
        keep = (torch.arange(longest)[None, :] < cpu_lengths[:, None])[..., None].to(device)
        table = ref_encoding(self.d_pe, longest).to(device=device, dtype=self.linear.weight.dtype)
        encodings = table[None].repeat(len(cpu_lengths), 1, 1).masked_fill(~keep, 0)
        out, _ = ref_bigru(self.gru, encodings, cpu_lengths)
        half = out.size(2) // 2
        scores = self.linear((out[..., :half] + out[..., half:]) / 2)
        scores = scores.masked_fill(~keep, -10000)
        weights = torch.softmax(scores / 0.1, 1)
        ranked = features[:, :longest].masked_fill(~keep, -10000).sort(dim=1, descending=True)[0]
        ranked = ranked.masked_fill(~keep, 0)
        return (ranked * weights.to(ranked.dtype)).sum(1), weights


class MLP(nn.Module):
    """The original's MLP(d_in, hidden, d_out, 2): Linear, BatchNorm1d over the B * N rows, ReLU, Linear. It builds a
    batch norm per layer; the last one (`bns.1`) is never applied."""

    def __init__(self, d_in: int, hidden: int, d_out: int):
        super().__init__()
        self.d_out = d_out
        self.layers = nn.ModuleList([nn.Linear(d_in, hidden), nn.Linear(hidden, d_out)])
        self.bns = nn.ModuleList([nn.BatchNorm1d(hidden), nn.BatchNorm1d(d_out)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        rows = torch.relu(self.bns[0](self.layers[0](x.reshape(b * n, d))))
        return self.layers[1](rows).view(b, n, self.d_out)


class ImageEncoder(nn.Module):
    """EncoderImageAggr, precomp_enc_type 'basic': fc (Xavier-uniform, zero bias) plus the MLP residual, GPO over
    the regions, l2norm. `images` is (B, max length, region_dim), zero past each length (the original's collate)."""

    def __init__(self, region_dim: int, embed_dim: int):
        super().__init__()
        self.fc = nn.Linear(region_dim, embed_dim)
        self.mlp = MLP(region_dim, embed_dim // 2, embed_dim)
        self.gpool = GPO(32, 32)
        bound = (6.0 / (region_dim + embed_dim)) ** 0.5
        with torch.no_grad():
            self.fc.weight.uniform_(-bound, bound)
            self.fc.bias.zero_()

    def forward(self, images: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        features = self.mlp(images) + self.fc(images)
        return l2norm(self.gpool(features, lengths)[0])


def bert_config(vocab_size: int, width: int, layers: int, heads: int, ffn_dim: int, dropout: float = 0.1,
                attention: str = "eager") -> transformers.BertConfig:
    """bert-base-uncased's config at other sizes (512 positions, 2 token types, GELU, LayerNorm eps 1e-12)."""
    return transformers.BertConfig(vocab_size=vocab_size, hidden_size=width, num_hidden_layers=layers,
                                   num_attention_heads=heads, intermediate_size=ffn_dim, max_position_embeddings=512,
                                   type_vocab_size=2, hidden_act="gelu", layer_norm_eps=1e-12,
                                   hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                                   attn_implementation=attention)


class TextEncoder(nn.Module):
    """EncoderText: BertModel's last hidden states (mask: id != 0) -> Linear -> GPO over the caption's tokens ->
    l2norm. The pooler exists (bert-base-uncased has one) but is not used."""

    def __init__(self, config: transformers.BertConfig, embed_dim: int):
        super().__init__()
        self.bert = transformers.BertModel(config)
        self.linear = nn.Linear(config.hidden_size, embed_dim)
        self.gpool = GPO(32, 32)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(tokens, (tokens != 0).float())[0]
        return l2norm(self.gpool(self.linear(hidden), lengths)[0])


def hinge(im: torch.Tensor, s: torch.Tensor, margin: float = 0.2, max_violation: bool = True) -> torch.Tensor:
    """ContrastiveLoss: both directions' clamped costs, diagonals cleared, summed (or each query's largest)."""
    scores = im.mm(s.t())
    diagonal = scores.diag().view(-1, 1)
    eye = torch.eye(scores.size(0), dtype=torch.bool, device=scores.device)
    cost_s = (margin + scores - diagonal).clamp(min=0).masked_fill(eye, 0)
    cost_im = (margin + scores - diagonal.t()).clamp(min=0).masked_fill(eye, 0)
    if max_violation:
        cost_s, cost_im = cost_s.max(1)[0], cost_im.max(0)[0]
    return cost_s.sum() + cost_im.sum()


def randomise(module: nn.Module, seed: int) -> nn.Module:
    """Every parameter random (matrices at std 1 / sqrt(fan-in), norm gains about 1, other vectors at std 0.2), the
    batch-norm running statistics too, so no term is trivially 0 or 1 and evaluation mode is told apart from
    training mode."""
    generator = torch.Generator().manual_seed(seed)

    def rand(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=generator, dtype=t.dtype)

    with torch.no_grad():
        for name, p in module.named_parameters():
            is_gain = name.endswith("weight") and ("LayerNorm" in name or ".bns." in name)
            p.copy_(1.0 + 0.2 * rand(p) if is_gain else rand(p) / p[0].numel() ** 0.5 if p.ndim > 1 else 0.2 * rand(p))
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.5 * rand(b))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=generator))
            elif name.endswith("num_batches_tracked"):
                b.fill_(7)
    return module


def checkpoint_state(image: ImageEncoder, text: TextEncoder, **extra: Any) -> dict[str, Any]:
    """What vse_infty's train.py saves: {'model': [img_enc state, txt_enc state], ...extra}."""
    return {"model": [image.state_dict(), text.state_dict()], **extra}


__all__ = ["GPO", "MLP", "ImageEncoder", "TextEncoder", "bert_config", "checkpoint_state", "hinge", "l2norm",
           "randomise"]
