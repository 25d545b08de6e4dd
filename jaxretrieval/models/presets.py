"""Named model sizes. A preset fills `model.*`; keys set in a config file or override win over it."""

from __future__ import annotations

from typing import Any


def _clip(embed: int, image: tuple[int, int, int, int, int], text: tuple[int, int, int], **extra: Any) -> dict:
    image_size, patch, width, layers, heads = image
    t_width, t_layers, t_heads = text
    return {
        "embed_dim": embed,
        "image": {"image_size": image_size, "patch_size": patch, "width": width, "layers": layers, "heads": heads},
        "text": {"context_length": 77, "vocab_size": 49408, "width": t_width, "layers": t_layers,
                 "heads": t_heads},
        **extra,
    }


def _beit3(layers: int, width: int, heads: int, image_size: int) -> dict:
    """unilm's BEiT-3 sizes: patch 16, FFN 4x, XLM-R vocabulary (64010), captions of at most 64 tokens."""
    return {
        "family": "beit3",
        "embed_dim": width,
        "image": {"image_size": image_size, "patch_size": 16},
        "text": {"context_length": 64, "vocab_size": 64010},
        "multiway": {"layers": layers, "width": width, "heads": heads, "ffn_dim": 4 * width,
                     "max_text_positions": 1024, "pad_id": 1},
    }


def _xvlm(image_size: int, width: int, layers: int, heads: int, text_layers: int, context: int) -> dict:
    """X2-VLM (CFACK): a BEiT-2 tower (patch 16) and a BERT (bert-base-uncased vocabulary), ITC width 256."""
    return {
        "family": "xvlm",
        "embed_dim": 256,
        "image": {"image_size": image_size, "patch_size": 16, "width": width, "layers": layers, "heads": heads},
        "text": {"context_length": context, "vocab_size": 30522, "width": width, "layers": text_layers,
                 "heads": heads},
    }


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # No preset: every size comes from the config (what `convert` writes for sizes no preset names).
    "custom": {},
    # X2-VLM-base as CFACK fine-tunes it: BEiT-2 B/16 at 384, BERT 18 layers (cross-attention from 12), 40 tokens.
    "x2vlm_base": _xvlm(384, 768, 12, 12, 18, 40),
    # X2-VLM at test / CPU-demo size: 32-px images, the text-person demo's WordPiece vocabulary (cfack.fusion_from 2).
    "xvlm_tiny": {**_xvlm(32, 64, 2, 2, 3, 32), "embed_dim": 32,
                  "image": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "heads": 2},
                  "text": {"context_length": 32, "vocab_size": 160, "width": 64, "layers": 3, "heads": 2}},
    # UIT (PAB's CMP baseline): Swin-B at 224 (stage sizes in the uit section) + BERT-base, 56 tokens, ITC width 2048.
    "uit_swinb": {"family": "uit", "embed_dim": 2048,
                  "image": {"image_size": 224, "patch_size": 4, "width": 128},
                  "text": {"context_length": 56, "vocab_size": 30522, "width": 768, "layers": 12, "heads": 12}},
    # UIT at test / CPU-demo size: 64-px images, a two-stage Swin (uit.swin_depths [1, 1]), 4 BERT layers.
    "uit_tiny": {"family": "uit", "embed_dim": 32,
                 "image": {"image_size": 64, "patch_size": 4, "width": 16},
                 "text": {"context_length": 32, "vocab_size": 160, "width": 32, "layers": 4, "heads": 2}},
    # BLIP-2 pretrain_vitL: LAVIS's clip_L (ViT-L/14 at 224, 23 of its 24 blocks, QuickGELU) + the Q-Former (BERT-base
    # with [DEC]: 30523 ids, cross-attention every other layer, 32 queries), ITC width 256, 32 tokens (max_txt_len).
    "blip2_pretrain_vitl": {"family": "blip2", "embed_dim": 256, "activation": "quick_gelu",
                            "image": {"image_size": 224, "patch_size": 14, "width": 1024, "layers": 23, "heads": 16},
                            "text": {"context_length": 32, "vocab_size": 30523, "width": 768, "layers": 12,
                                     "heads": 12}},
    # BLIP-2 at test / CPU-demo size, the text-person demo's WordPiece vocabulary.
    "blip2_tiny": {"family": "blip2", "embed_dim": 32, "activation": "quick_gelu",
                   "image": {"image_size": 32, "patch_size": 8, "width": 48, "layers": 2, "heads": 2},
                   "text": {"context_length": 32, "vocab_size": 160, "width": 32, "layers": 4, "heads": 2}},
    # VSE-infinity / AAHR: BERT-base captions (64 tokens) into a 1024-wide space; the region side is the vse / aahr
    # section's region_dim.
    "vse_bert_base": {"family": "vse", "embed_dim": 1024,
                      "text": {"context_length": 64, "vocab_size": 30522, "width": 768, "layers": 12, "heads": 12}},
    # At test / CPU-demo size, for the generated precomp set (data.kind precomp_demo: 64-wide regions).
    "vse_tiny": {"family": "vse", "embed_dim": 32,
                 "text": {"context_length": 16, "vocab_size": 64, "width": 32, "layers": 2, "heads": 2}},
    # Small enough for the test suite and the CPU demo; the text side follows the demo tokenizer.
    "tiny": {
        "embed_dim": 64,
        "image": {"image_size": 32, "patch_size": 4, "width": 96, "layers": 3, "heads": 4},
        "text": {"context_length": 32, "vocab_size": 128, "width": 96, "layers": 3, "heads": 4},
    },
    "vit_b32": _clip(512, (224, 32, 768, 12, 12), (512, 12, 8)),
    "vit_b16": _clip(512, (224, 16, 768, 12, 12), (512, 12, 8)),
    "vit_l14": _clip(768, (224, 14, 1024, 24, 16), (768, 12, 12)),
    "vit_l14_336": _clip(768, (336, 14, 1024, 24, 16), (768, 12, 12)),
    # The multiway encoder at test and CPU-demo size; pad id 0 follows the demo's word tokenizer.
    "beit3_tiny": {
        "family": "beit3",
        "embed_dim": 96,
        "image": {"image_size": 32, "patch_size": 4},
        "text": {"context_length": 32, "vocab_size": 128},
        "multiway": {"layers": 3, "width": 96, "heads": 4, "ffn_dim": 192, "max_text_positions": 34, "pad_id": 0},
    },
    "beit3_base_patch16_224": _beit3(12, 768, 12, 224),
    "beit3_base_patch16_384": _beit3(12, 768, 12, 384),
    "beit3_large_patch16_224": _beit3(24, 1024, 16, 224),
    "beit3_large_patch16_384": _beit3(24, 1024, 16, 384),
    # Centroids-ReID: ResNet-50 (or -IBN-a), last stride 1, 2048-d features; a tiny one for tests and the CPU demo.
    "resnet50_ctl": {"family": "ctl", "resnet": {"layers": [3, 4, 6, 3], "width": 64, "ibn": False}},
    "resnet50_ibn_a_ctl": {"family": "ctl", "resnet": {"layers": [3, 4, 6, 3], "width": 64, "ibn": True}},
    "resnet_tiny_ctl": {"family": "ctl", "resnet": {"layers": [1, 1, 1, 1], "width": 16, "ibn": False}},
}
