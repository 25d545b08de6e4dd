"""One table between our CLIP parameter paths and PyTorch state-dict keys, read in both directions.

Two PyTorch layouts: OpenAI's (which open_clip keeps) and Hugging Face's `CLIPModel`. Each table row names one
of our parameters ("/"-joined path in the `nnx.to_pure_dict` tree), the PyTorch key or keys that store it, and
the transform between the two; `to_ours` and `to_theirs` both walk the same rows, so a row written once serves
import and export alike.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from convert import ConvertError

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Transform:
    to_ours: Callable[[list[np.ndarray]], np.ndarray]
    to_theirs: Callable[[np.ndarray], list[np.ndarray]]
    theirs_shapes: Callable[[Shape], list[Shape]]


def _patch_side(rows: int) -> int:
    return math.isqrt(rows // 3)


SAME = Transform(lambda a: a[0], lambda x: [x], lambda s: [s])
# torch Linear weights are (out, in); our kernels are (in, out).
TRANSPOSED = Transform(lambda a: a[0].T, lambda x: [x.T], lambda s: [s[::-1]])
# The patch convolution (width, c, ph, pw) against our kernel over flattened (ph, pw, c) patches.
PATCH = Transform(
    lambda a: a[0].transpose(2, 3, 1, 0).reshape(-1, a[0].shape[0]),
    lambda x: [x.reshape(_patch_side(x.shape[0]), _patch_side(x.shape[0]), 3, x.shape[1]).transpose(3, 2, 0, 1)],
    lambda s: [(s[1], 3, _patch_side(s[0]), _patch_side(s[0]))],
)
# Hugging Face keeps q, k and v as three Linears where OpenAI fuses them into one in_proj.
QKV_KERNEL = Transform(lambda a: np.concatenate(a, axis=0).T, lambda x: list(np.split(x.T, 3)),
                       lambda s: [(s[1] // 3, s[0])] * 3)
QKV_BIAS = Transform(lambda a: np.concatenate(a), lambda x: list(np.split(x, 3)), lambda s: [(s[0] // 3,)] * 3)


@dataclasses.dataclass(frozen=True)
class Rule:
    ours: str
    theirs: tuple[str, ...]
    transform: Transform = SAME


def _norm(ours: str, theirs: str) -> list[Rule]:
    return [Rule(f"{ours}/scale", (f"{theirs}.weight",)), Rule(f"{ours}/bias", (f"{theirs}.bias",))]


def _linear(ours: str, theirs: str) -> list[Rule]:
    return [Rule(f"{ours}/kernel", (f"{theirs}.weight",), TRANSPOSED), Rule(f"{ours}/bias", (f"{theirs}.bias",))]


def _openai_block(ours: str, theirs: str) -> list[Rule]:
    return [
        *_norm(f"{ours}/ln_1", f"{theirs}.ln_1"),
        Rule(f"{ours}/attn/qkv/kernel", (f"{theirs}.attn.in_proj_weight",), TRANSPOSED),
        Rule(f"{ours}/attn/qkv/bias", (f"{theirs}.attn.in_proj_bias",)),
        *_linear(f"{ours}/attn/out", f"{theirs}.attn.out_proj"),
        *_norm(f"{ours}/ln_2", f"{theirs}.ln_2"),
        *_linear(f"{ours}/mlp/fc", f"{theirs}.mlp.c_fc"),
        *_linear(f"{ours}/mlp/proj", f"{theirs}.mlp.c_proj"),
    ]


def _hf_block(ours: str, theirs: str) -> list[Rule]:
    qkv = [f"{theirs}.self_attn.{name}_proj" for name in "qkv"]
    return [
        *_norm(f"{ours}/ln_1", f"{theirs}.layer_norm1"),
        Rule(f"{ours}/attn/qkv/kernel", tuple(f"{key}.weight" for key in qkv), QKV_KERNEL),
        Rule(f"{ours}/attn/qkv/bias", tuple(f"{key}.bias" for key in qkv), QKV_BIAS),
        *_linear(f"{ours}/attn/out", f"{theirs}.self_attn.out_proj"),
        *_norm(f"{ours}/ln_2", f"{theirs}.layer_norm2"),
        *_linear(f"{ours}/mlp/fc", f"{theirs}.mlp.fc1"),
        *_linear(f"{ours}/mlp/proj", f"{theirs}.mlp.fc2"),
    ]


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    top: tuple[Rule, ...]
    block: Callable[[str, str], list[Rule]]
    vision_blocks: str
    text_blocks: str
    ignored: re.Pattern[str]  # buffers some releases store that are not parameters

    def rules(self, vision_layers: int, text_layers: int) -> list[Rule]:
        rules = list(self.top)
        for tower, prefix, layers in (("visual", self.vision_blocks, vision_layers),
                                      ("text", self.text_blocks, text_layers)):
            for i in range(layers):
                rules += self.block(f"{tower}/transformer/blocks/{i}", f"{prefix}.{i}")
        return rules

    @staticmethod
    def _unsupported(keys: list[str]) -> str:
        """What the keys look like instead: the architectures users most often bring."""
        if any(key.startswith("visual.trunk.") for key in keys) or any("logit_bias" in key for key in keys):
            return "this looks like a SigLIP release (timm image trunk, custom text tower, logit bias), not supported"
        if any(key.startswith(("visual.layer1.", "visual.attnpool.")) for key in keys):
            return "this looks like a ResNet image tower (ModifiedResNet), not supported"
        if any(key.startswith("text.transformer.") or key.startswith("text.") for key in keys):
            return "this looks like a custom (Hugging Face) text tower, not supported"
        return "the tensors do not match a CLIP ViT"

    def count_layers(self, keys: Iterable[str]) -> tuple[int, int]:
        keys = list(keys)
        counts = []
        for prefix in (self.vision_blocks, self.text_blocks):
            pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
            found = [int(m.group(1)) for key in keys if (m := pattern.match(key))]
            if not found:
                raise ConvertError(f"no transformer blocks '{prefix}.N.*' found in the {self.name} layout: "
                                   f"{self._unsupported(keys)} (only CLIP's own ViT image towers and CLIP text towers "
                                   f"convert)")
            counts.append(max(found) + 1)
        return counts[0], counts[1]


OPENAI = Layout(
    name="OpenAI/open_clip",
    top=(
        Rule("logit_scale", ("logit_scale",)),
        Rule("visual/patch_embed/kernel", ("visual.conv1.weight",), PATCH),
        Rule("visual/class_embedding", ("visual.class_embedding",)),
        Rule("visual/positional_embedding", ("visual.positional_embedding",)),
        *_norm("visual/ln_pre", "visual.ln_pre"),
        *_norm("visual/ln_post", "visual.ln_post"),
        Rule("visual/proj", ("visual.proj",)),
        Rule("text/token_embedding/embedding", ("token_embedding.weight",)),
        Rule("text/positional_embedding", ("positional_embedding",)),
        *_norm("text/ln_final", "ln_final"),
        Rule("text/text_projection", ("text_projection",)),
    ),
    block=_openai_block,
    vision_blocks="visual.transformer.resblocks",
    text_blocks="transformer.resblocks",
    ignored=re.compile(r"^(input_resolution|context_length|vocab_size|attn_mask)$"),
)

HF = Layout(
    name="Hugging Face",
    top=(
        Rule("logit_scale", ("logit_scale",)),
        Rule("visual/patch_embed/kernel", ("vision_model.embeddings.patch_embedding.weight",), PATCH),
        Rule("visual/class_embedding", ("vision_model.embeddings.class_embedding",)),
        Rule("visual/positional_embedding", ("vision_model.embeddings.position_embedding.weight",)),
        *_norm("visual/ln_pre", "vision_model.pre_layrnorm"),
        *_norm("visual/ln_post", "vision_model.post_layernorm"),
        Rule("visual/proj", ("visual_projection.weight",), TRANSPOSED),
        Rule("text/token_embedding/embedding", ("text_model.embeddings.token_embedding.weight",)),
        Rule("text/positional_embedding", ("text_model.embeddings.position_embedding.weight",)),
        *_norm("text/ln_final", "text_model.final_layer_norm"),
        Rule("text/text_projection", ("text_projection.weight",), TRANSPOSED),
    ),
    block=_hf_block,
    vision_blocks="vision_model.encoder.layers",
    text_blocks="text_model.encoder.layers",
    ignored=re.compile(r"(^|\.)position_ids$"),
)

LAYOUTS = {"openai": OPENAI, "hf": HF}


def _listing(items: list[str], limit: int = 6) -> str:
    more = f", and {len(items) - limit} more" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more


def to_ours(layout: Layout, layers: tuple[int, int], state: Mapping[str, np.ndarray],
            expected: Mapping[str, Shape], where: str) -> dict[str, np.ndarray]:
    """Our flat {path: float32 array} from a state dict, after checking every key and shape against `expected`."""
    rules = layout.rules(*layers)
    uncovered = sorted(expected.keys() - {rule.ours for rule in rules})
    if uncovered:
        raise ConvertError(f"internal: no conversion rule for parameters {uncovered}")
    missing, wrong, known = [], [], set()
    for rule in rules:
        for key, shape in zip(rule.theirs, rule.transform.theirs_shapes(expected[rule.ours]), strict=True):
            known.add(key)
            if key not in state:
                missing.append(f"missing key '{key}' (expected shape {shape})")
            elif tuple(state[key].shape) != shape:
                wrong.append(f"key '{key}' has shape {tuple(state[key].shape)}, expected {shape}")
    extra = [f"unexpected key '{key}' of shape {tuple(state[key].shape)}" for key in state
             if key not in known and not layout.ignored.search(key)]
    problems = missing + extra + wrong
    if problems:
        raise ConvertError(f"{where}: {_listing(problems)}")
    return {rule.ours: np.array(rule.transform.to_ours([state[k] for k in rule.theirs]), np.float32, order="C")
            for rule in rules}


def to_theirs(layout: Layout, layers: tuple[int, int], ours: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The state dict for our flat {path: array}, keys in table order."""
    out: dict[str, np.ndarray] = {}
    for rule in layout.rules(*layers):
        arrays = rule.transform.to_theirs(np.asarray(ours[rule.ours]))
        out.update({key: np.array(a, order="C") for key, a in zip(rule.theirs, arrays, strict=True)})
    return out


def peek(layout: Layout, state: Mapping[str, np.ndarray], ours: str, ndim: int) -> Shape:
    """The shape of one of our parameters, read straight from the state dict to size the model."""
    rule = next(rule for rule in layout.rules(1, 1) if rule.ours == ours)
    for key in rule.theirs:
        if key not in state:
            raise ConvertError(f"missing key '{key}', which the {layout.name} layout needs to size the model")
    shapes = ", ".join(f"'{key}' has shape {tuple(state[key].shape)}" for key in rule.theirs)
    try:
        shape = rule.transform.to_ours([state[key] for key in rule.theirs]).shape
    except ValueError:
        shape = ()
    if len(shape) != ndim:
        raise ConvertError(f"unexpected shape: {shapes}")
    return tuple(int(n) for n in shape)


def infer_sizes(layout: Layout, state: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """embed_dim and tower sizes (all but heads) as a `model` config section, read from the weights."""
    vision_layers, text_layers = layout.count_layers(state)
    rows, width = peek(layout, state, "visual/patch_embed/kernel", 2)
    side = _patch_side(rows)
    if side * side * 3 != rows:
        conv = next(rule.theirs[0] for rule in layout.top if rule.transform is PATCH)
        raise ConvertError(f"key '{conv}' has shape {tuple(state[conv].shape)}, expected (width, 3, patch, patch)")
    positions, _ = peek(layout, state, "visual/positional_embedding", 2)
    grid = math.isqrt(max(positions - 1, 0))
    if grid * grid + 1 != positions:
        raise ConvertError(f"the image positional embedding has {positions} rows, not a square grid plus the "
                           f"class token")
    context_length, text_width = peek(layout, state, "text/positional_embedding", 2)
    return {
        "embed_dim": peek(layout, state, "visual/proj", 2)[1],
        "image": {"image_size": side * grid, "patch_size": side, "width": width, "layers": vision_layers,
                  "mlp_ratio": _ratio(peek(layout, state, "visual/transformer/blocks/0/mlp/fc/kernel", 2))},
        "text": {"context_length": context_length,
                 "vocab_size": peek(layout, state, "text/token_embedding/embedding", 2)[0],
                 "width": text_width, "layers": text_layers,
                 "mlp_ratio": _ratio(peek(layout, state, "text/transformer/blocks/0/mlp/fc/kernel", 2))},
    }


def _ratio(kernel_shape: Shape) -> float:
    width, hidden = kernel_shape
    ratio = hidden / width
    while int(width * ratio) < hidden:  # the model sizes its MLP as int(width * ratio)
        ratio = float(np.nextafter(ratio, np.inf))
    return ratio
