"""What CLIP weights do not say (attention heads, activation, preprocessing), read from each release's config
JSON and checked against the weights; and the config JSONs that `clip-export` writes."""

from __future__ import annotations

import dataclasses
from typing import Any

from convert import ConvertError
from jaxretrieval.config import Config

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class Settings:
    activation: str
    image_heads: int
    text_heads: int
    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD


def config_kind(raw: dict[str, Any]) -> str | None:
    if "model_cfg" in raw or "vision_cfg" in raw:
        return "open_clip"
    if "vision_config" in raw or "text_config" in raw or raw.get("model_type") == "clip":
        return "hf"
    return None


def _check(declared: list[tuple[str, Any, Any]], where: str) -> None:
    """declared: (name in the config, value the config gives, value the weights have)."""
    wrong = [f"{name}={said!r} but the weights have {found!r}" for name, said, found in declared if said != found]
    if wrong:
        raise ConvertError(f"{where} disagrees with the weights: {'; '.join(wrong)}")


def _hidden(width: int, ratio: float) -> int:
    return int(width * ratio)


def openai_settings(sizes: dict[str, Any]) -> Settings:
    for tower in ("image", "text"):
        width = sizes[tower]["width"]
        if width % 64:
            raise ConvertError(f"without a config, heads are read as width // 64 (OpenAI's 64-wide heads), but the "
                               f"{tower} width is {width}; pass --config with the model's config JSON")
    return Settings("quick_gelu", sizes["image"]["width"] // 64, sizes["text"]["width"] // 64)


# open_clip's CLIPVisionCfg / CLIPTextCfg defaults, for keys a model config leaves out.
OPEN_CLIP_VISION = {"layers": 12, "width": 768, "head_width": 64, "mlp_ratio": 4.0, "patch_size": 16,
                    "image_size": 224}
OPEN_CLIP_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12,
                  "mlp_ratio": 4.0}
# open_clip options our CLIP does not implement, with the values that leave the plain CLIP tower.
_SCALED = {key: (False,) for key in ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner",
                                     "scale_attn", "scale_fc")}
_PLAIN = {"ls_init_value": (None,), "final_ln_after_pool": (False,), "act_kwargs": (None,), "norm_kwargs": (None,),
          "block_type": (None, "default"), **_SCALED}
UNSUPPORTED: dict[str, dict[str, tuple[Any, ...]]] = {
    "": {"custom_text": (False,), "init_logit_bias": (None,), "nonscalar_logit_scale": (False,)},
    "vision_cfg": {**_PLAIN, "attentional_pool": (False,), "no_ln_pre": (False,), "pos_embed_type": ("learnable",),
                   "pool_type": ("tok",), "timm_model_name": (None,), "input_patchnorm": (False,),
                   "global_average_pool": (False,)},
    "text_cfg": {**_PLAIN, "hf_model_name": (None,), "embed_cls": (False,), "no_causal_mask": (False,),
                 "pool_type": ("argmax",), "proj_bias": (False,), "proj_type": ("linear",)},
}


def open_clip_settings(raw: dict[str, Any], sizes: dict[str, Any], where: str) -> Settings:
    """From open_clip's model config, bare or inside a hub-style {"model_cfg", "preprocess_cfg"}."""
    cfg = raw.get("model_cfg", raw)
    vision = {**OPEN_CLIP_VISION, **(cfg.get("vision_cfg") or {})}
    text = {**OPEN_CLIP_TEXT, **(cfg.get("text_cfg") or {})}
    for section, values in (("", cfg), ("vision_cfg", vision), ("text_cfg", text)):
        for key, allowed in UNSUPPORTED[section].items():
            if values.get(key, allowed[0]) not in allowed:
                name = f"{section}.{key}" if section else key
                raise ConvertError(f"{where}: {name}={values[key]!r} is an open_clip option jaxretrieval's CLIP "
                                   f"does not implement")
    image_size = vision["image_size"]
    if isinstance(image_size, (list, tuple)):
        if len(set(image_size)) != 1:
            raise ConvertError(f"{where}: vision_cfg.image_size={image_size} is not square")
        image_size = image_size[0]
    image, txt = sizes["image"], sizes["text"]
    _check([
        ("embed_dim", cfg.get("embed_dim", sizes["embed_dim"]), sizes["embed_dim"]),
        ("vision_cfg.image_size", image_size, image["image_size"]),
        ("vision_cfg.patch_size", vision["patch_size"], image["patch_size"]),
        ("vision_cfg.width", vision["width"], image["width"]),
        ("vision_cfg.layers", vision["layers"], image["layers"]),
        ("vision_cfg.mlp_ratio (MLP width)", _hidden(vision["width"], vision["mlp_ratio"]),
         _hidden(image["width"], image["mlp_ratio"])),
        ("text_cfg.context_length", text["context_length"], txt["context_length"]),
        ("text_cfg.vocab_size", text["vocab_size"], txt["vocab_size"]),
        ("text_cfg.width", text["width"], txt["width"]),
        ("text_cfg.layers", text["layers"], txt["layers"]),
        ("text_cfg.mlp_ratio (MLP width)", _hidden(text["width"], text["mlp_ratio"]),
         _hidden(txt["width"], txt["mlp_ratio"])),
    ], where)
    if vision["width"] % vision["head_width"]:
        raise ConvertError(f"{where}: vision_cfg.head_width={vision['head_width']} does not divide the width")
    preprocess = raw.get("preprocess_cfg") or cfg.get("preprocess_cfg") or {}
    return Settings(
        activation="quick_gelu" if cfg.get("quick_gelu", False) else "gelu",
        image_heads=vision["width"] // vision["head_width"],
        text_heads=int(text["heads"]),
        mean=tuple(preprocess.get("mean", OPENAI_MEAN)),
        std=tuple(preprocess.get("std", OPENAI_STD)),
    )


# transformers' CLIPVisionConfig / CLIPTextConfig defaults, for keys a config.json leaves out.
HF_VISION = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
             "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
             "num_channels": 3}
HF_TEXT = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
           "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
           "layer_norm_eps": 1e-5, "eos_token_id": 49407}


def hf_settings(raw: dict[str, Any], preprocessor: dict[str, Any], sizes: dict[str, Any], where: str) -> Settings:
    vision = {**HF_VISION, **(raw.get("vision_config") or raw.get("vision_config_dict") or {})}
    text = {**HF_TEXT, **(raw.get("text_config") or raw.get("text_config_dict") or {})}
    activations = {vision["hidden_act"], text["hidden_act"]}
    if len(activations) != 1 or not activations <= {"quick_gelu", "gelu"}:
        raise ConvertError(f"{where}: hidden_act {sorted(activations)} is not supported (one of quick_gelu, gelu, "
                           f"the same for both towers)")
    if vision["layer_norm_eps"] != 1e-5 or text["layer_norm_eps"] != 1e-5 or vision["num_channels"] != 3:
        raise ConvertError(f"{where}: only layer_norm_eps=1e-5 and num_channels=3 are supported")
    image, txt = sizes["image"], sizes["text"]
    # Ours pools at the largest token id. HF pools at the first eos_token_id, or at the argmax when it is 2
    # (configs written before transformers#24773); both agree when eos is the largest id.
    if text["eos_token_id"] not in (2, txt["vocab_size"] - 1):
        raise ConvertError(f"{where}: text_config.eos_token_id={text['eos_token_id']!r}; the text tower pools at "
                           f"the largest token id, so it must be vocab_size - 1 = {txt['vocab_size'] - 1}")
    _check([
        ("projection_dim", raw.get("projection_dim", 512), sizes["embed_dim"]),
        ("vision_config.image_size", vision["image_size"], image["image_size"]),
        ("vision_config.patch_size", vision["patch_size"], image["patch_size"]),
        ("vision_config.hidden_size", vision["hidden_size"], image["width"]),
        ("vision_config.num_hidden_layers", vision["num_hidden_layers"], image["layers"]),
        ("vision_config.intermediate_size", vision["intermediate_size"], _hidden(image["width"], image["mlp_ratio"])),
        ("text_config.vocab_size", text["vocab_size"], txt["vocab_size"]),
        ("text_config.max_position_embeddings", text["max_position_embeddings"], txt["context_length"]),
        ("text_config.hidden_size", text["hidden_size"], txt["width"]),
        ("text_config.num_hidden_layers", text["num_hidden_layers"], txt["layers"]),
        ("text_config.intermediate_size", text["intermediate_size"], _hidden(txt["width"], txt["mlp_ratio"])),
    ], where)
    return Settings(
        activation=activations.pop(),
        image_heads=int(vision["num_attention_heads"]),
        text_heads=int(text["num_attention_heads"]),
        mean=tuple(preprocessor.get("image_mean", OPENAI_MEAN)),
        std=tuple(preprocessor.get("image_std", OPENAI_STD)),
    )


def open_clip_config(config: Config) -> dict[str, Any]:
    """open_clip_config.json, the layout `open_clip.create_model("local-dir:...")` and the HF hub read."""
    m = config.model
    return {
        "model_cfg": {
            "embed_dim": m.embed_dim,
            "quick_gelu": m.activation == "quick_gelu",
            "vision_cfg": {"image_size": m.image.image_size, "layers": m.image.layers, "width": m.image.width,
                           "head_width": m.image.width // m.image.heads, "mlp_ratio": m.image.mlp_ratio,
                           "patch_size": m.image.patch_size},
            "text_cfg": {"context_length": m.text.context_length, "vocab_size": m.text.vocab_size,
                         "width": m.text.width, "heads": m.text.heads, "layers": m.text.layers,
                         "mlp_ratio": m.text.mlp_ratio},
        },
        "preprocess_cfg": {"mean": list(config.data.mean), "std": list(config.data.std)},
    }


def hf_config(config: Config) -> dict[str, Any]:
    m = config.model
    tower = {"projection_dim": m.embed_dim, "hidden_act": m.activation, "layer_norm_eps": 1e-5}
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": m.embed_dim,
        "logit_scale_init_value": m.init_logit_scale,
        "text_config": {
            **tower, "model_type": "clip_text_model", "vocab_size": m.text.vocab_size, "hidden_size": m.text.width,
            "intermediate_size": _hidden(m.text.width, m.text.mlp_ratio), "num_hidden_layers": m.text.layers,
            "num_attention_heads": m.text.heads, "max_position_embeddings": m.text.context_length,
            # CLIP's layout, start and end of text the two largest ids; pooling uses eos.
            "bos_token_id": m.text.vocab_size - 2, "eos_token_id": m.text.vocab_size - 1,
        },
        "vision_config": {
            **tower, "model_type": "clip_vision_model", "hidden_size": m.image.width,
            "intermediate_size": _hidden(m.image.width, m.image.mlp_ratio), "num_hidden_layers": m.image.layers,
            "num_attention_heads": m.image.heads, "image_size": m.image.image_size,
            "patch_size": m.image.patch_size, "num_channels": 3,
        },
    }


def hf_preprocessor_config(config: Config) -> dict[str, Any]:
    size = config.model.image.image_size
    return {
        "image_processor_type": "CLIPImageProcessor", "do_convert_rgb": True, "do_resize": True,
        "size": {"shortest_edge": size}, "resample": 3, "do_center_crop": True,
        "crop_size": {"height": size, "width": size}, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(config.data.mean), "image_std": list(config.data.std),
    }
