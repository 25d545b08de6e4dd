"""UIT (PAB's CMP baseline) in PyTorch, as models/cmp.py of the original composes it: the train-step benchmark's torch
side and the parity reference of `convert uit` (tests/test_convert_uit.py).

Read in github:AIVIETNAM-Hub/Hybrid-Unified-and-Iterative-A-Novel-Framework-for-Text-based-Person-Anomaly-Retrieval,
uit/cmp (models/cmp.py, models/model_search.py, models/bert.py, models/swin_transformer.py, models/simmim.py, train.py,
configs/cmp.yaml, config_swinB.json, config_bert.json). Built from library parts:
- the Swin is timm's `SwinTransformer` (num_classes 0; the same arithmetic as Microsoft's, whose layout
  `state_dict_cmp` writes and `load_state_dict_cmp` reads); `image_embeds` is CMP's Swin forward: the final-norm
  tokens with their mean in front.
- the BERT is transformers' `BertForMaskedLM` (embeddings, layers, the MLM head tied to the word embeddings) with a
  `crossattention` added to the layers from `fusion_from` on, its key and value reading the Swin's width. The layers
  are run here, not by transformers' forward (whose signature moves between versions): self-attention (additive
  -10000 padding mask, as CMP's BertModel), cross-attention to every image token in fusion layers, feed-forward. The
  modes are CMP's: `text_embeds` runs layers 0 .. fusion_from - 1, `cross_embeds` the rest, MLM all of them.
- `feature_mapping` heads (BatchNorm1d -> Dropout(itc_dp) -> Linear, weights N(0, 1e-5)), `itm_head`, `temp`, SimMIM
  (the mask token replaces masked patch embeddings, a 1x1 conv to stride^2 x 3 channels, PixelShuffle).
- `train_losses` is Search.forward + train.py's sum on one process (no all-gather): ITC with same-id soft targets and
  label smoothing, ITM on hard negatives drawn by torch.multinomial, both again at `eda_weight` on the EDA caption,
  MLM, and SimMIM's loss, which sums the masked L1 over the batch and divides by ONE image's masked-pixel count
  (the original's mask is (1, h, w)). loss = itc + itm + mlm + 0.1356 x mim.

Sizes: `CMPTorch()` is Swin-B 224 + BERT-base with fusion from layer 6 and embed_dim 2048 (cmp.yaml); pass
`swin={...}` / `bert={...}` to override keys of SWIN_B / BERT_BASE, e.g. the tests' tiny model. Inputs are torch
tensors: pixels (B, 3, H, W), token ids and 0/1 attention masks (B, L).
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# configs/config_swinB.json (drop_path_rate 0.1, drop_rate 0) and configs/config_bert.json (+ fusion_layer 6)
SWIN_B = {"image_size": 224, "patch_size": 4, "embed_dim": 128, "depths": (2, 2, 18, 2), "num_heads": (4, 8, 16, 32),
          "window_size": 7, "mlp_ratio": 4.0, "drop_path_rate": 0.1}
BERT_BASE = {"vocab_size": 30522, "width": 768, "layers": 12, "heads": 12, "ffn_dim": 3072, "max_positions": 512,
             "type_vocab_size": 2, "fusion_from": 6, "dropout": 0.1}
MASKED = -10000.0  # CMP's BertModel.get_extended_attention_mask


def feature_mapping(input_dim: int, output_dim: int, dropout_p: float) -> nn.Sequential:
    mlp = nn.Sequential(nn.BatchNorm1d(input_dim), nn.Dropout(p=dropout_p), nn.Linear(input_dim, output_dim))
    nn.init.normal_(mlp[2].weight, std=0.00001)
    nn.init.constant_(mlp[2].bias, 0.0)
    return mlp


def ms_swin_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A timm SwinTransformer's weights in Microsoft's layout (the one CMP's checkpoints hold): each PatchMerging at
    the end of the stage before it, every block's relative_position_index and the shifted blocks' attn_mask."""
    out = {re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", k): v
           for k, v in model.state_dict().items() if not k.startswith("head.")}
    for name, buffer in model.named_buffers():
        if name.endswith(("relative_position_index", "attn_mask")) and buffer is not None:
            out[name] = buffer
    return out


class CMPTorch(nn.Module):
    """CMP / UIT (see the module docstring). Attribute names are the original's, so `state_dict_cmp()` is a CMP
    checkpoint's state dict."""

    def __init__(self, swin: dict[str, Any] | None = None, bert: dict[str, Any] | None = None, *,
                 embed_dim: int = 2048, chunks: int = 3, itc_dropout: float = 0.5, temp: float = 0.07,
                 label_smooth: float = 0.2, mim: bool = True, mim_block: int = 32, mim_ratio: float = 0.5,
                 mim_weight: float = 0.1356, eda_weight: float = 0.8, loop_negatives: bool = False):
        """loop_negatives: draw the ITM negatives one torch.multinomial(row, 1).item() at a time, as CMP's loop
        (a host sync per row); False draws every row in one torch.multinomial call (same distribution)."""
        super().__init__()
        import timm.models.swin_transformer as timm_swin
        import transformers

        s, b = {**SWIN_B, **(swin or {})}, {**BERT_BASE, **(bert or {})}
        self.swin_sizes, self.bert_sizes = s, b
        self.vision_encoder = timm_swin.SwinTransformer(
            img_size=s["image_size"], patch_size=s["patch_size"], in_chans=3, num_classes=0,
            embed_dim=s["embed_dim"], depths=tuple(s["depths"]), num_heads=tuple(s["num_heads"]),
            window_size=s["window_size"], mlp_ratio=s["mlp_ratio"], qkv_bias=True, drop_rate=0.0,
            drop_path_rate=s["drop_path_rate"])
        vision_width = s["embed_dim"] * 2 ** (len(s["depths"]) - 1)
        self.vision_width, self.text_width = vision_width, b["width"]
        self.text_heads, self.fusion_from, self.attn_dropout = b["heads"], b["fusion_from"], b["dropout"]
        config = transformers.BertConfig(
            vocab_size=b["vocab_size"], hidden_size=b["width"], num_hidden_layers=b["layers"],
            num_attention_heads=b["heads"], intermediate_size=b["ffn_dim"], max_position_embeddings=b["max_positions"],
            type_vocab_size=b["type_vocab_size"], hidden_act="gelu", hidden_dropout_prob=b["dropout"],
            attention_probs_dropout_prob=b["dropout"], layer_norm_eps=1e-12, pad_token_id=0)
        self.text_encoder = transformers.BertForMaskedLM(config)
        for layer in self.text_encoder.bert.encoder.layer[b["fusion_from"]:]:
            cross = copy.deepcopy(layer.attention)
            cross.self.key = nn.Linear(vision_width, b["width"])
            cross.self.value = nn.Linear(vision_width, b["width"])
            for module in cross.modules():
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=0.02)
                    nn.init.zeros_(module.bias)
            layer.crossattention = cross
        self.embed_dim, self.chunks = embed_dim, chunks
        self.vision_proj = feature_mapping(chunks * vision_width, embed_dim, itc_dropout)
        self.text_proj = feature_mapping((chunks + 1) * b["width"], embed_dim, itc_dropout)
        self.temp = nn.Parameter(torch.ones([]) * temp)
        self.itm_head = nn.Sequential(nn.Linear(b["width"], 2 * b["width"]), nn.LayerNorm(2 * b["width"]), nn.GELU(),
                                      nn.Linear(2 * b["width"], 2))
        self.epsilon, self.mim_weight, self.eda_weight = label_smooth, mim_weight, eda_weight
        self.loop_negatives = loop_negatives
        self.patch_size, self.image_size = s["patch_size"], s["image_size"]
        self.mim_stride = s["patch_size"] * 2 ** (len(s["depths"]) - 1)  # 32 for Swin-B, CMP's encoder_stride
        self.mim_block, self.mim_ratio = mim_block, mim_ratio
        if mim:
            self.mask_token = nn.Parameter(torch.zeros(1, 1, s["embed_dim"]))
            nn.init.trunc_normal_(self.mask_token, std=0.02)
            self.mim_decoder = nn.Sequential(nn.Conv2d(vision_width, self.mim_stride**2 * 3, kernel_size=1),
                                             nn.PixelShuffle(self.mim_stride))
        else:
            self.mask_token = self.mim_decoder = None

    # ---- towers --------------------------------------------------------------------------------------------------
    def image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 1 + h * w, width): CMP's Swin forward, the final-norm tokens with their mean in front."""
        tokens = self.vision_encoder.forward_features(pixels).flatten(1, 2)
        return torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)

    def _attend(self, attention: nn.Module, x: torch.Tensor, mask: torch.Tensor | None,
                source: torch.Tensor | None = None) -> torch.Tensor:
        s, (b, n, w) = attention.self, x.shape
        kv = x if source is None else source
        q = s.query(x).view(b, n, self.text_heads, -1).transpose(1, 2)
        k = s.key(kv).view(b, kv.shape[1], self.text_heads, -1).transpose(1, 2)
        v = s.value(kv).view(b, kv.shape[1], self.text_heads, -1).transpose(1, 2)
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask.to(q.dtype),
                                                 dropout_p=self.attn_dropout if self.training else 0.0)
        return attention.output(context.transpose(1, 2).reshape(b, n, w), x)

    def _layers(self, x: torch.Tensor, atts: torch.Tensor, start: int, stop: int,
                image: torch.Tensor | None = None) -> torch.Tensor:
        mask = (1.0 - atts[:, None, None, :].to(torch.float32)) * MASKED
        for i in range(start, stop):
            layer = self.text_encoder.bert.encoder.layer[i]
            x = self._attend(layer.attention, x, mask)
            if i >= self.fusion_from:
                x = self._attend(layer.crossattention, x, None, image)  # every image token attended
            x = layer.output(layer.intermediate(x), x)
        return x

    def text_embeds(self, ids: torch.Tensor, atts: torch.Tensor) -> torch.Tensor:
        """CMP.get_text_embeds (mode 'text'): embeddings and layers 0 .. fusion_from - 1."""
        return self._layers(self.text_encoder.bert.embeddings(input_ids=ids), atts, 0, self.fusion_from)

    def cross_embeds(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                     atts: torch.Tensor) -> torch.Tensor:
        """CMP.get_cross_embeds (mode 'fusion'): the layers from fusion_from on over the text states."""
        return self._layers(text_embeds, atts, self.fusion_from, len(self.text_encoder.bert.encoder.layer),
                            image_embeds)

    # ---- heads ---------------------------------------------------------------------------------------------------
    def _chunks(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        pooled = F.adaptive_avg_pool1d(tokens.transpose(1, 2), self.chunks).transpose(1, 2)
        return [pooled[:, i] for i in range(self.chunks)]

    def image_feat(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """CMP.get_image_feat: the projection of the chunk means of the patch tokens (not normalised)."""
        return self.vision_proj(torch.cat(self._chunks(image_embeds[:, 1:]), dim=1))

    def text_feat(self, text_embeds: torch.Tensor) -> torch.Tensor:
        """CMP.get_text_feat: [CLS] and the chunk means of every later position, projected (not normalised)."""
        return self.text_proj(torch.cat([text_embeds[:, 0], *self._chunks(text_embeds[:, 1:])], dim=1))

    def itm_logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, atts: torch.Tensor) -> torch.Tensor:
        """(B, 2): the ITM head on the fused [CLS]."""
        return self.itm_head(self.cross_embeds(image_embeds, text_embeds, atts)[:, 0])

    def mlm_logits(self, ids: torch.Tensor, atts: torch.Tensor, image_embeds: torch.Tensor,
                   masked_pos: torch.Tensor | None = None) -> torch.Tensor:
        """(B, masks or L, vocab): BertForMaskedLM over every layer (mode 'multi_modal'), gathered at masked_pos."""
        bert = self.text_encoder.bert
        hidden = self._layers(bert.embeddings(input_ids=ids), atts, 0, len(bert.encoder.layer), image_embeds)
        if masked_pos is not None:
            hidden = torch.gather(hidden, 1, masked_pos.unsqueeze(2).expand(-1, -1, hidden.shape[-1]))
        return self.text_encoder.cls(hidden)

    def mim_reconstruction(self, pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W): SimMIM's decoder output with the patches where `mask` (1 or B, h, w) is 1 masked."""
        x = self.vision_encoder.patch_embed(pixels)  # (B, h, w, C), timm's NHWC
        w = mask.unsqueeze(-1).to(x.dtype)
        x = x * (1.0 - w) + self.mask_token.view(1, 1, 1, -1).to(x.dtype) * w
        x = self.vision_encoder.norm(self.vision_encoder.layers(x))
        return self.mim_decoder(x.permute(0, 3, 1, 2))

    def mim_loss(self, pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """SimMIM.forward: the L1 error on masked pixels summed over the batch, over one mask's count."""
        reconstruction = self.mim_reconstruction(pixels, mask)
        up = mask.repeat_interleave(self.patch_size, 1).repeat_interleave(self.patch_size, 2).unsqueeze(1)
        loss = F.l1_loss(pixels, reconstruction, reduction="none")
        return (loss * up).sum() / (up.sum() + 1e-5) / pixels.shape[1]

    def mask_generator(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """CMP's MaskGenerator (ratio mim_ratio of the mim_block-px blocks, on the patch grid) as (1, h, w) float."""
        side, scale = self.image_size // self.mim_block, self.mim_block // self.patch_size
        count = int(math.ceil(side * side * self.mim_ratio))
        mask = torch.zeros(side * side, device=device)
        mask[torch.randperm(side * side, device=device)[:count]] = 1.0
        return mask.view(side, side).repeat_interleave(scale, 0).repeat_interleave(scale, 1)[None]

    # ---- losses --------------------------------------------------------------------------------------------------
    def contrastive_loss(self, image_feat: torch.Tensor, text_feat: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        image_feat, text_feat = F.normalize(image_feat, dim=-1), F.normalize(text_feat, dim=-1)
        logits = image_feat @ text_feat.t() / self.temp
        idx = idx.view(-1, 1)
        pos_idx = torch.eq(idx, idx.t()).float()
        labels = pos_idx / pos_idx.sum(1, keepdim=True)
        if 0 < self.epsilon < 1:
            labels = (1 - self.epsilon) * labels + self.epsilon / logits.shape[1]
        loss_i2t = -torch.sum(F.log_softmax(logits, dim=1) * labels, dim=1).mean()
        loss_t2i = -torch.sum(F.log_softmax(logits.t(), dim=1) * labels, dim=1).mean()
        return (loss_i2t + loss_t2i) / 2

    def _draw(self, weights: torch.Tensor) -> torch.Tensor:
        if self.loop_negatives:
            return torch.tensor([torch.multinomial(row, 1).item() for row in weights], device=weights.device)
        return torch.multinomial(weights, 1)[:, 0]

    def matching_loss(self, image_embeds: torch.Tensor, image_feat: torch.Tensor, text_embeds: torch.Tensor,
                      text_atts: torch.Tensor, text_feat: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """CMP.get_matching_loss: one hard negative per image and per text, 3 x B fused pairs, cross entropy."""
        bs = image_embeds.shape[0]
        image_feat, text_feat = F.normalize(image_feat, dim=-1), F.normalize(text_feat, dim=-1)
        with torch.no_grad():
            sim_i2t = image_feat @ text_feat.t() / self.temp
            sim_t2i = text_feat @ image_feat.t() / self.temp
            weights_i2t = F.softmax(sim_i2t.float(), dim=1) + 1e-5
            weights_t2i = F.softmax(sim_t2i.float(), dim=1) + 1e-5
            mask = torch.eq(idx.view(-1, 1), idx.view(1, -1))
            weights_i2t.masked_fill_(mask, 0)
            weights_t2i.masked_fill_(mask, 0)
        image_neg = image_embeds[self._draw(weights_t2i)]
        chosen = self._draw(weights_i2t)
        text_neg, atts_neg = text_embeds[chosen], text_atts[chosen]
        text_all = torch.cat([text_embeds, text_neg], dim=0)
        atts_all = torch.cat([text_atts, atts_neg], dim=0)
        image_all = torch.cat([image_neg, image_embeds], dim=0)
        cross_pos = self.cross_embeds(image_embeds, text_embeds, text_atts)[:, 0]
        cross_neg = self.cross_embeds(image_all, text_all, atts_all)[:, 0]
        output = self.itm_head(torch.cat([cross_pos, cross_neg], dim=0))
        labels = torch.cat([torch.ones(bs, dtype=torch.long), torch.zeros(2 * bs, dtype=torch.long)]).to(output.device)
        return F.cross_entropy(output, labels)

    def train_losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Search.forward and train.py's total on one process. batch: image (B, 3, H, W); text_ids, text_atts,
        text_ids_eda, text_atts_eda, text_ids_masked (B, L); masked_pos, masked_ids (B, max_masks; ids -100 where
        unused); idx (B,) the person ids; optionally mim_mask (1, h, w) (default: a fresh `mask_generator()`).
        Returns {loss_itc, loss_itm, loss_mlm, loss_mim, loss}; without MIM loss_mim is 0."""
        image, ids, atts, idx = batch["image"], batch["text_ids"], batch["text_atts"], batch["idx"]
        image_embeds = self.image_embeds(image)
        text_embeds = self.text_embeds(ids, atts)
        image_feat, text_feat = self.image_feat(image_embeds), self.text_feat(text_embeds)
        loss_itc = self.contrastive_loss(image_feat, text_feat, idx)
        loss_itm = self.matching_loss(image_embeds, image_feat, text_embeds, atts, text_feat, idx)
        if self.mim_decoder is not None:
            mask = batch.get("mim_mask")
            loss_mim = self.mim_loss(image, self.mask_generator(image.device) if mask is None else mask)
        else:
            loss_mim = image.new_zeros(())
        eda_embeds = self.text_embeds(batch["text_ids_eda"], batch["text_atts_eda"])
        eda_feat = self.text_feat(eda_embeds)
        loss_itc = loss_itc + self.eda_weight * self.contrastive_loss(image_feat, eda_feat, idx)
        loss_itm = loss_itm + self.eda_weight * self.matching_loss(image_embeds, image_feat, eda_embeds,
                                                                   batch["text_atts_eda"], eda_feat, idx)
        scores = self.mlm_logits(batch["text_ids_masked"], atts, image_embeds, batch["masked_pos"])
        loss_mlm = F.cross_entropy(scores.reshape(-1, scores.shape[-1]).float(), batch["masked_ids"].reshape(-1))
        loss = loss_itc + loss_itm + loss_mlm + loss_mim * self.mim_weight
        return {"loss_itc": loss_itc, "loss_itm": loss_itm, "loss_mlm": loss_mlm, "loss_mim": loss_mim, "loss": loss}

    # ---- the original's checkpoint layout ----------------------------------------------------------------------
    def state_dict_cmp(self) -> dict[str, torch.Tensor]:
        """The state dict under CMP's names: `vision_encoder.*` in Microsoft's Swin layout with its buffers,
        `text_encoder.{bert,cls}.*` (position_ids and the tied decoder included), `vision_proj.{0,2}.*`,
        `text_proj.*`, `itm_head.{0,1,3}.*`, `temp`, and SimMIM's `simmim.encoder.mask_token`, `simmim.decoder.0.*`
        and `simmim.encoder.encoder.*` (the vision encoder again: one module shared)."""
        swin = ms_swin_state(self.vision_encoder)
        out = {f"vision_encoder.{k}": v for k, v in swin.items()}
        out.update({f"text_encoder.{k}": v for k, v in self.text_encoder.state_dict().items()})
        out["text_encoder.bert.embeddings.position_ids"] = torch.arange(self.bert_sizes["max_positions"])[None]
        for name in ("vision_proj", "text_proj", "itm_head"):
            out.update({f"{name}.{k}": v for k, v in getattr(self, name).state_dict().items()})
        out["temp"] = self.temp
        if self.mim_decoder is not None:
            out["simmim.encoder.mask_token"] = self.mask_token
            out.update({f"simmim.decoder.0.{k}": v for k, v in self.mim_decoder[0].state_dict().items()})
            out.update({f"simmim.encoder.encoder.{k}": v for k, v in swin.items()})
        return {k: v.detach().clone() for k, v in out.items()}

    def load_state_dict_cmp(self, state: dict[str, Any]) -> Any:
        """Loads a CMP checkpoint's state dict (a released UIT's, or `state_dict_cmp()`'s; Microsoft's or timm's Swin
        layout), strictly: buffers, SimMIM's copy of the vision encoder and BERT's position_ids are left out."""
        microsoft = "vision_encoder.layers.0.downsample.reduction.weight" in state
        ours = {}
        for key, value in state.items():
            if key.startswith("simmim.encoder.encoder.") or key.endswith(("relative_position_index", "attn_mask")) \
                    or key.endswith("embeddings.position_ids"):
                continue
            if microsoft:
                key = re.sub(r"^vision_encoder\.layers\.(\d+)\.downsample\.",
                             lambda m: f"vision_encoder.layers.{int(m.group(1)) + 1}.downsample.", key)
            key = "mask_token" if key == "simmim.encoder.mask_token" else re.sub(r"^simmim\.decoder\.", "mim_decoder.",
                                                                                 key)
            ours[key] = torch.as_tensor(value)
        return self.load_state_dict(ours, strict=True)


__all__ = ["BERT_BASE", "SWIN_B", "CMPTorch", "feature_mapping", "ms_swin_state"]
