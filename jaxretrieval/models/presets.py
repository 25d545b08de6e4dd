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


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # No preset: every size comes from the config (what `convert` writes for sizes no preset names).
    "custom": {},
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
}
