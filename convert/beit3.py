"""unilm BEiT-3 checkpoints (`{'model': state_dict}` .pth: retrieval fine-tunes, or pretrained encoders without
retrieval heads) to jaxretrieval checkpoints, with the XLM-R sentencepiece tokenizer embedded."""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path

import jax
import numpy as np

from convert import ConvertError
from convert.sources import load_tensors, load_wrapped_state
from jaxretrieval.checkpoint import write_model
from jaxretrieval.config import Config, load_config, to_dict
from jaxretrieval.data.spm import SentencePieceTokenizer
from jaxretrieval.models import MODEL_PRESETS, abstract_model
from jaxretrieval.models.beit3 import params_from_torchscale
from jaxretrieval.models.stacking import relayout

PREFIX = "beit3."
HEAD_KEYS = ("vision_head.weight", "language_head.weight", "logit_scale")
EXTRA_POSITIONS = 3  # vision position rows ahead of the patch grid: 2 fairseq-offset rows and the class token
HEAD_DIM = 64  # unilm's base (768 / 12) and large (1024 / 16) configs
CONTEXT_LENGTH = 64


@dataclasses.dataclass(frozen=True)
class Sizes:
    layers: int
    width: int
    heads: int
    ffn_dim: int
    patch_size: int
    image_size: int
    vocab_size: int
    max_text_positions: int


def read_state(path: Path) -> dict[str, np.ndarray]:
    """The state dict of a unilm checkpoint as float32/int numpy arrays, unwrapped from model/module/state_dict."""
    if path.suffix == ".safetensors":
        return load_tensors(path)[0]
    return load_wrapped_state(path)[0]


def _shape(state: dict[str, np.ndarray], key: str, where: str) -> tuple[int, ...]:
    if PREFIX + key not in state:
        raise ConvertError(f"{where}: missing key '{PREFIX}{key}' (not a unilm BEiT-3 checkpoint?)")
    return state[PREFIX + key].shape


def infer_sizes(state: dict[str, np.ndarray], where: str) -> Sizes:
    vocab, width = _shape(state, "text_embed.weight", where)
    patch = _shape(state, "vision_embed.proj.weight", where)[-1]
    rows = _shape(state, "encoder.embed_positions.A.weight", where)[0]
    grid = math.isqrt(max(rows - EXTRA_POSITIONS, 0))
    if grid == 0 or grid * grid + EXTRA_POSITIONS != rows:
        raise ConvertError(f"{where}: '{PREFIX}encoder.embed_positions.A.weight' has {rows} rows, not "
                           f"{EXTRA_POSITIONS} + a square patch grid")
    layers = 0
    while f"{PREFIX}encoder.layers.{layers}.ffn.A.fc1.weight" in state:
        layers += 1
    ffn_dim = _shape(state, "encoder.layers.0.ffn.A.fc1.weight", where)[0]
    if width % HEAD_DIM:
        raise ConvertError(f"{where}: width {width} is not a multiple of {HEAD_DIM}, so the head count (width / "
                           f"{HEAD_DIM} in unilm's configs) cannot be told")
    return Sizes(layers=layers, width=width, heads=width // HEAD_DIM, ffn_dim=ffn_dim, patch_size=patch,
                 image_size=grid * patch, vocab_size=vocab,
                 max_text_positions=_shape(state, "encoder.embed_positions.B.weight", where)[0])


def expected_shapes(s: Sizes, heads: bool) -> dict[str, tuple[int, ...]]:
    """Every tensor of unilm's BEiT3ForRetrieval (its encoder alone when heads=False) with its shape."""
    w, f = s.width, s.ffn_dim
    grid = s.image_size // s.patch_size
    shapes = {"text_embed.weight": (s.vocab_size, w), "vision_embed.proj.weight": (w, 3, s.patch_size, s.patch_size),
              "vision_embed.proj.bias": (w,), "vision_embed.cls_token": (1, 1, w),
              "vision_embed.mask_token": (1, 1, w),
              "encoder.embed_positions.A.weight": (grid * grid + EXTRA_POSITIONS, w),
              "encoder.embed_positions.B.weight": (s.max_text_positions, w)}

    def linear(name: str, fan_in: int, fan_out: int) -> None:
        shapes.update({f"{name}.weight": (fan_out, fan_in), f"{name}.bias": (fan_out,)})

    def norm(name: str, size: int) -> None:
        shapes.update({f"{name}.weight": (size,), f"{name}.bias": (size,)})

    for expert in "AB":
        norm(f"encoder.layer_norm.{expert}", w)
        for i in range(s.layers):
            base = f"encoder.layers.{i}"
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                linear(f"{base}.self_attn.{proj}.{expert}", w, w)
            for name in ("self_attn.inner_attn_ln", "self_attn_layer_norm", "final_layer_norm"):
                norm(f"{base}.{name}.{expert}", w)
            linear(f"{base}.ffn.{expert}.fc1", w, f)
            norm(f"{base}.ffn.{expert}.ffn_layernorm", f)
            linear(f"{base}.ffn.{expert}.fc2", f, w)
    shapes = {PREFIX + key: shape for key, shape in shapes.items()}
    if heads:
        shapes.update({"vision_head.weight": (w, w), "language_head.weight": (w, w), "logit_scale": ()})
    return shapes


def check_state(state: dict[str, np.ndarray], sizes: Sizes, where: str) -> bool:
    """Refuses missing, unexpected and misshapen tensors; True when the retrieval heads are there."""
    heads = any(key in state for key in HEAD_KEYS)
    wanted = expected_shapes(sizes, heads)
    missing = sorted(wanted.keys() - state.keys())
    if missing:
        raise ConvertError(f"{where}: missing key '{missing[0]}'" + (f" and {len(missing) - 1} more"
                                                                       if len(missing) > 1 else ""))
    unexpected = sorted(state.keys() - wanted.keys())
    if unexpected:
        more = f", ... ({len(unexpected)} in all)" if len(unexpected) > 3 else ""
        raise ConvertError(f"{where}: unexpected keys {', '.join(repr(k) for k in unexpected[:3])}{more}; not a "
                           f"BEiT-3 retrieval or pretrained checkpoint")
    for key, shape in wanted.items():
        if tuple(state[key].shape) != shape:
            raise ConvertError(f"{where}: '{key}' has shape {tuple(state[key].shape)}, expected {shape}")
    return heads


def resize_vision_positions(table: np.ndarray, grid: int) -> np.ndarray:
    """The torchscale vision position table resampled to a grid x grid patch grid, as unilm does on loading: the
    3 leading rows kept, the patch rows bicubic (PyTorch's, align_corners=False, no antialiasing)."""
    import torch
    import torch.nn.functional as F

    old = math.isqrt(table.shape[0] - EXTRA_POSITIONS)
    cells = torch.from_numpy(np.ascontiguousarray(table[EXTRA_POSITIONS:], np.float32))
    cells = cells.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    cells = F.interpolate(cells, size=(grid, grid), mode="bicubic", align_corners=False)
    return np.concatenate([table[:EXTRA_POSITIONS], cells.permute(0, 2, 3, 1).reshape(grid * grid, -1).numpy()])


def init_heads(width: int, seed: int = 0) -> dict[str, np.ndarray | dict]:
    """Retrieval heads as BEiT3ForRetrieval initialises them: weights normal(0, 0.02) truncated at +-0.02
    (unilm's trunc_normal_ cuts at one std), logit_scale log(1 / 0.07)."""
    vision, language = jax.random.split(jax.random.key(seed))

    def head(key: jax.Array) -> dict[str, np.ndarray]:
        return {"kernel": 0.02 * np.asarray(jax.random.truncated_normal(key, -1.0, 1.0, (width, width)))}

    return {"vision_head": head(vision), "language_head": head(language),
            "logit_scale": np.asarray(math.log(1 / 0.07), np.float32)}


def build_config(s: Sizes) -> Config:
    """The model under the name of the preset of the same sizes (else "custom"), with unilm's eval preprocessing."""
    model = {"family": "beit3", "embed_dim": s.width, "image.image_size": s.image_size,
             "image.patch_size": s.patch_size, "text.vocab_size": s.vocab_size,
             "text.context_length": min(CONTEXT_LENGTH, s.max_text_positions - 2), "multiway.layers": s.layers,
             "multiway.width": s.width, "multiway.heads": s.heads, "multiway.ffn_dim": s.ffn_dim,
             "multiway.max_text_positions": s.max_text_positions, "multiway.pad_id": 1}
    sizes = [f"model.{key}={value}" for key, value in model.items()]
    name = "custom"
    for preset in MODEL_PRESETS:
        if MODEL_PRESETS[preset].get("family") == "beit3":
            own = load_config(None, [f"model.name={preset}"]).model
            if load_config(None, [f"model.name={preset}", *sizes]).model == own:
                name = preset
                break
    data = ["data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]", "data.resize=squash", "data.tokenizer=checkpoint"]
    return load_config(None, [f"model.name={name}", *sizes, *data], source="converted BEiT-3 config")


def spm_tokenizer(path: str | Path, context_length: int) -> SentencePieceTokenizer:
    try:
        return SentencePieceTokenizer.from_file(path, context_length=context_length)
    except ValueError as e:
        raise ConvertError(f"--spm: {e}") from None


def import_beit3(src: str | Path, out: str | Path, *, spm: str | Path, image_size: int | None = None) -> Path:
    """Converts a unilm BEiT-3 .pth at SRC into a jaxretrieval checkpoint at OUT (nothing at OUT on failure)."""
    src, out = Path(src), Path(out)
    if out.exists():
        raise ConvertError(f"{out} already exists; choose a new output folder")
    state = read_state(src)
    sizes = infer_sizes(state, str(src))
    heads = check_state(state, sizes, str(src))
    if image_size is not None and (image_size <= 0 or image_size % sizes.patch_size):
        raise ConvertError(f"--image-size {image_size} is not a positive multiple of the patch size {sizes.patch_size}")
    tokenizer = spm_tokenizer(spm, min(CONTEXT_LENGTH, sizes.max_text_positions - 2))
    if tokenizer.vocab_size > sizes.vocab_size:
        raise ConvertError(f"--spm {spm} gives {tokenizer.vocab_size} token ids but {src} embeds only "
                           f"{sizes.vocab_size}: not the sentencepiece model this BEiT-3 was trained with")
    params = params_from_torchscale(state)
    if not heads:
        warnings.warn(f"{src} has no retrieval heads (vision_head, language_head, logit_scale), like a pretrained "
                      f"BEiT-3: initialising them as unilm's BEiT3ForRetrieval does (truncated normal std 0.02, "
                      f"logit_scale log(1/0.07)); fine-tune before retrieving with it", stacklevel=2)
        params.update(init_heads(sizes.width))
    if image_size is not None and image_size != sizes.image_size:
        beit3 = params["beit3"]
        beit3["vision_positions"] = resize_vision_positions(beit3["vision_positions"], image_size // sizes.patch_size)
        sizes = dataclasses.replace(sizes, image_size=image_size)
    config = build_config(sizes)
    _, abstract = abstract_model(config.model)
    params = jax.tree.map(lambda a, x: np.asarray(x, a.dtype), abstract, relayout(params, abstract))
    meta = {"config": to_dict(config), "tokenizer": tokenizer.to_spec(),
            "converted_from": {"path": str(src.absolute()), "format": "unilm_beit3"}}
    return write_model(out, params, meta)


__all__ = ["Sizes", "build_config", "import_beit3", "infer_sizes", "read_state", "resize_vision_positions"]
