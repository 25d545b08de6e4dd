"""X2-VLM and CFACK PyTorch checkpoints (`{'model': state_dict, 'config': ...}` or a bare state dict) to a
checkpoint of system cfack (`models.xvlm.XVLM`). Names read in X2-VLM (github:zengyan-97/X2-VLM models/xvlm.py) and
CFACK (AIVIETNAMResearch/Pedestrian-Matching models/model_retrieval.py, xbert.py, beit2.py):
- `vision_encoder.*`: BEiT-2 in timm's names (models/beit2.py); `text_encoder.bert.*` plus the MLM head
  `text_encoder.cls.predictions.*`, or `text_encoder.*` alone: a BERT whose layers from `fusion_layer` on hold
  `crossattention` too (convert/bert.py); `vision_proj`, `text_proj`, `itm_head.{0,1,3}` and the scalar `temp`;
- CFACK's momentum copies `*_m`. Ours keep the momentum BERT's embeddings and text layers, so its fusion layers are
  dropped; without them (plain X2-VLM) the copies start equal to the online weights, as CFACK's `copy_params`.
Only BEiT-2 vision towers (not X-VLM's Swin or CLIP ViT) and BERT text towers (not multilingual X2-VLM's RoBERTa)
convert. The CNN branch (`cnn_encoder`, `pret_model`), `cross_encoder`, `bbox_head` and an id `classifier` are
skipped and counted in a summary line.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import jax
import numpy as np

from convert import ConvertError
from convert.bert import BertSizes, flat_from_hf, fusion_sizes, name_pairs, text_prefix
from convert.presets import named_config, preset_name, wordpiece_vocab
from convert.sources import count_indexed, head_pairs, listed, load_wrapped_state, under
from jaxretrieval.checkpoint import write_model
from jaxretrieval.config import Config, to_dict
from jaxretrieval.models import abstract_model
from jaxretrieval.models.beit2 import EXTRA_ROWS, flat_from_timm, resize_rel_pos_bias_table, timm_from_params
from jaxretrieval.models.stacking import relayout
from jaxretrieval.sharding import path_name

VISION, VISION_M, TEXT, TEXT_M = "vision_encoder.", "vision_encoder_m.", "text_encoder.", "text_encoder_m."
MOMENTUM_PREFIXES = (VISION_M, TEXT_M, "vision_proj_m.", "text_proj_m.")
SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"
# Parts of the original models that ours leaves out; their keys are skipped and counted.
LEFT_OUT = ("cnn_encoder.", "pret_model.", "cross_encoder.", "bbox_head.", "classifier.")
BUFFERS = re.compile(r"(^|\.)(relative_position_index|position_ids|k_bias)$")
CONTEXT_LENGTH = 40  # X2-VLM / CFACK retrieval's max_tokens
RERANK_K = 128  # their k_test: ITM re-ranks each caption's top 128 images
# (our path, their name, kind): linear weights are transposed, LayerNorm weights are our scales.
HEADS = [("vision_proj", "vision_proj", "linear"), ("text_proj", "text_proj", "linear"),
         ("itm_head/hidden", "itm_head.0", "linear"), ("itm_head/norm", "itm_head.1", "norm"),
         ("itm_head/out", "itm_head.3", "linear")]


@dataclasses.dataclass(frozen=True)
class XVLMSizes:
    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_ratio: float
    embed_dim: int
    itm_hidden: int
    text: BertSizes
    mlm: bool  # the checkpoint has the MLM head (CFACK with mlm, X2-VLM pre-training)
    momentum: bool  # the checkpoint has momentum copies (CFACK)


def read_checkpoint(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(state dict as numpy, the training config saved beside it or {}), read with torch.load(weights_only=True)."""
    state, loaded = load_wrapped_state(path)
    config = loaded.get("config")
    return state, config if isinstance(config, dict) else {}


def _get(state: dict[str, np.ndarray], key: str) -> np.ndarray:
    if key not in state:
        raise ConvertError(f"missing key '{key}' (not an X2-VLM or CFACK checkpoint with a BEiT-2 vision tower?)")
    return state[key]


def infer_sizes(state: dict[str, np.ndarray], heads: int | None = None) -> XVLMSizes:
    """The sizes the state's shapes tell; the text heads (no shape holds them) are `heads` or width / 64."""
    width = _get(state, f"{VISION}cls_token").shape[-1]
    patch = _get(state, f"{VISION}patch_embed.proj.weight").shape[-1]
    table = state.get(f"{VISION}blocks.0.attn.relative_position_bias_table", state.get(VISION + SHARED_TABLE))
    if table is None:
        raise ConvertError(f"missing key '{VISION}blocks.0.attn.relative_position_bias_table': only BEiT-2 vision "
                           f"towers with relative position bias (X2-VLM, CFACK) convert")
    side = math.isqrt(max(table.shape[0] - EXTRA_ROWS, 0))
    if side % 2 == 0 or side * side + EXTRA_ROWS != table.shape[0]:
        raise ConvertError(f"a relative position table of {table.shape[0]} rows is not for a square patch grid")
    fc1 = _get(state, f"{VISION}blocks.0.mlp.fc1.weight").shape[0]
    text = fusion_sizes(state, TEXT, heads, "an X2-VLM or CFACK checkpoint")
    if text.encoder_width not in (None, width):
        raise ConvertError(f"the cross-attention reads {text.encoder_width}-wide image tokens; the vision tower "
                           f"is {width} wide")
    return XVLMSizes(image_size=(side + 1) // 2 * patch, patch_size=patch, width=width,
                     layers=count_indexed(state, rf"{re.escape(VISION)}blocks\.(\d+)\."), heads=table.shape[1],
                     mlp_ratio=fc1 / width, embed_dim=_get(state, "vision_proj.weight").shape[0],
                     itm_hidden=_get(state, "itm_head.0.weight").shape[0], text=text,
                     mlm=f"{TEXT}cls.predictions.bias" in state,
                     momentum=any(key.startswith(MOMENTUM_PREFIXES) for key in state))


def _config_overrides(s: XVLMSizes, saved: dict[str, Any]) -> list[str]:
    def number(key: str, kind: type) -> Any:
        value = saved.get(key)
        return value if isinstance(value, kind) and not isinstance(value, bool) else None

    context = min(number("max_tokens", int) or CONTEXT_LENGTH, s.text.max_positions)
    momentum = number("momentum", float) if saved.get("use_momentum", True) else None
    t = s.text
    overrides = {"system": "cfack", "model.family": "xvlm", "model.embed_dim": s.embed_dim,
                 "model.image.image_size": s.image_size, "model.image.patch_size": s.patch_size,
                 "model.image.width": s.width, "model.image.layers": s.layers, "model.image.heads": s.heads,
                 "model.image.mlp_ratio": s.mlp_ratio, "model.text.vocab_size": t.vocab_size,
                 "model.text.width": t.width, "model.text.layers": t.layers, "model.text.heads": t.heads,
                 "model.text.mlp_ratio": t.ffn_dim / t.width, "model.text.context_length": context,
                 "cfack.fusion_from": t.fusion_from, "cfack.max_positions": t.max_positions,
                 "cfack.type_vocab_size": t.type_vocab_size, "cfack.mlm": s.mlm,
                 "cfack.itm_hidden": 0 if s.itm_hidden == 2 * t.width else s.itm_hidden,
                 # CFACK's data and evaluation: text-person captions, squashed images, ITM re-ranking.
                 "data.kind": "cuhk-pedes", "data.tokenizer": "vocab.txt", "data.tokenizer_kind": "wordpiece",
                 "data.resize": "squash", "data.mean": [0.48145466, 0.4578275, 0.40821073],
                 "data.std": [0.26862954, 0.26130258, 0.27577711], "train.loss": "cfack",
                 "eval.protocol": "text_to_image", "eval.rerank_k": RERANK_K}
    if number("max_words", int):
        overrides["data.max_words"] = saved["max_words"]
    if momentum is not None and 0 < momentum < 1:
        overrides["cfack.momentum"] = momentum
    return [f"{key}={value}".replace(" ", "") for key, value in overrides.items()]


def build_config(s: XVLMSizes, saved: dict[str, Any] | None = None) -> Config:
    """Config of system cfack for these sizes, named like the preset of the same sizes (else "custom"); the
    context length, caption words and momentum from the original's training config where it has them."""
    overrides = _config_overrides(s, saved or {})
    return named_config(overrides, preset_name("xvlm", overrides), "converted X2-VLM config", "cfack")


class Layout:
    """Where each tensor of the checkpoint goes: the keys read (`needed`; `optional` where a shared table stands in
    for the per-block ones) and the flat {our per-layer path: array}."""

    def __init__(self, state: dict[str, np.ndarray], s: XVLMSizes, abstract: dict[str, Any]):
        self.state, self.s = state, s
        self.needed, self.optional = set(), set()
        self.flat: dict[str, np.ndarray] = {}
        # Momentum copies from the _m tensors, or from the online ones when the checkpoint has none.
        m_vision, self.text_m, m = (VISION_M, TEXT_M, "_m") if s.momentum else (VISION, TEXT, "")
        self.vision("vision", VISION, abstract["vision"])
        self.vision("momentum/vision", m_vision, abstract["momentum"]["vision"])
        self.text("text", TEXT, s.text, s.mlm)
        layers = s.text.fusion_from
        self.text("momentum/text", self.text_m, dataclasses.replace(s.text, layers=layers, fusion_from=layers), False)
        pairs = [p for ours, theirs, kind in HEADS for p in head_pairs(ours, theirs, kind)]
        pairs += [p for name in ("vision_proj", "text_proj") for p in head_pairs(f"momentum/{name}", name + m,
                                                                                    "linear")]
        for ours, theirs, transposed in [*pairs, ("temp", "temp", False)]:
            self.needed.add(theirs)
            if theirs in state:
                value = state[theirs]
                self.flat[ours] = value.T if transposed else value.reshape(()) if ours == "temp" else value

    def vision(self, ours: str, prefix: str, template: dict[str, Any]) -> None:
        # Their names of our template's tensors (zero-copy stand-ins for its arrays).
        views = jax.tree.map(lambda a: np.broadcast_to(np.zeros((), a.dtype), a.shape), template)
        needed = set(timm_from_params(views, prefix))
        self.needed |= needed
        if prefix + SHARED_TABLE in self.state:
            self.optional |= {k for k in needed if k.endswith("attn.relative_position_bias_table")}
            self.optional.add(prefix + SHARED_TABLE)
        if needed - self.optional <= self.state.keys():
            try:
                flat = flat_from_timm({k: v for k, v in self.state.items() if k in needed | self.optional}, prefix)
            except ValueError as e:
                raise ConvertError(f"{prefix}*: {e}") from None
            self.flat.update({f"{ours}/{key}": value for key, value in flat.items()})

    def text(self, ours: str, base: str, sizes: BertSizes, mlm: bool) -> None:
        prefix = text_prefix(self.state, base)
        pairs = name_pairs(sizes, prefix, mlm)
        self.needed |= {base + theirs for _, theirs, _ in pairs}
        if all(base + theirs in self.state for _, theirs, _ in pairs):
            flat = flat_from_hf(under(self.state, base), sizes, prefix, mlm)
            self.flat.update({(f"mlm_head/{k[4:]}" if k.startswith("mlm/") else f"{ours}/{k}"): v
                              for k, v in flat.items()})

    def left_out(self, key: str) -> str | None:
        """Why a key that no tensor of ours reads may be skipped (None: it may not)."""
        s, word = self.s, f"{TEXT}{text_prefix(self.state, TEXT)}embeddings.word_embeddings.weight"
        tied = {f"{TEXT}cls.predictions.decoder.weight": word, f"{TEXT}cls.predictions.decoder.bias":
                f"{TEXT}cls.predictions.bias"}
        if key in tied:
            if not np.array_equal(self.state[key], self.state.get(tied[key])):
                raise ConvertError(f"'{key}' differs from '{tied[key]}': our MLM decoder is tied to them")
            return "tied MLM decoder"
        fusion = re.match(rf"{re.escape(self.text_m)}(bert\.)?encoder\.layer\.(\d+)\.", key)
        if s.momentum and fusion and int(fusion.group(2)) >= s.text.fusion_from:
            return "momentum fusion layers (never run)"
        if key.startswith(LEFT_OUT):
            return key.split(".")[0] + ".*"
        if BUFFERS.search(key):
            return "index buffers"
        return "pooler" if ".pooler." in key else None


def check_keys(layout: Layout, where: str) -> Counter:
    """Refuses missing and unexpected keys; the skipped ones counted by reason."""
    state = layout.state
    missing = sorted(layout.needed - layout.optional - state.keys())
    if missing:
        raise ConvertError(f"{where}: {len(missing)} required keys missing: {listed(missing)}")
    reasons = {key: layout.left_out(key) for key in sorted(state.keys() - layout.needed - layout.optional)}
    unexpected = [key for key, reason in reasons.items() if reason is None]
    if unexpected:
        raise ConvertError(f"{where}: {len(unexpected)} unexpected keys (no place in system cfack's XVLM): "
                           f"{listed(unexpected)}")
    return Counter(reasons.values())


def fit(flat: dict[str, np.ndarray], abstract: dict[str, Any], where: str) -> dict[str, Any]:
    """The flat per-layer tensors in the model's tree, each checked against its shape and cast to its dtype."""
    try:
        params = relayout(flat, abstract)
    except (KeyError, ValueError) as e:
        raise ConvertError(f"{where}: {e}") from None

    def check(path: tuple, like: Any, value: Any) -> np.ndarray:
        if tuple(value.shape) != tuple(like.shape):
            raise ConvertError(f"{where}: our '{path_name(path)}' gets shape {tuple(value.shape)}, expected "
                               f"{tuple(like.shape)}")
        return np.asarray(value, like.dtype)

    return jax.tree_util.tree_map_with_path(check, abstract, params)


def import_xvlm(src: str | Path, out: str | Path, *, vocab: str | Path | None = None, image_size: int | None = None,
                heads: int | None = None) -> Path:
    """An X2-VLM / CFACK checkpoint at SRC -> a complete system-cfack checkpoint at OUT (nothing at OUT on failure).
    `vocab`: the BERT vocab.txt (or tokenizer.json) stored as the tokenizer; `image_size`: the relative position
    tables resampled for it; `heads`: the BERT's attention heads (default width / 64)."""
    src, out = Path(src), Path(out)
    if out.exists():
        raise ConvertError(f"{out} already exists; choose a new output folder")
    if heads is not None and heads <= 0:
        raise ConvertError(f"--heads must be positive, got {heads}")
    state, saved = read_checkpoint(src)
    try:
        sizes = infer_sizes(state, heads)
    except ConvertError as e:
        raise ConvertError(f"{src}: {e}") from None
    trained_at = sizes.image_size
    if image_size is not None:
        if image_size <= 0 or image_size % sizes.patch_size:
            raise ConvertError(f"--image-size {image_size} is not a positive multiple of the patch size "
                               f"{sizes.patch_size}")
        sizes = dataclasses.replace(sizes, image_size=image_size)
    config = build_config(sizes, saved)
    tokenizer = wordpiece_vocab(vocab, config.model.text.context_length, sizes.text.vocab_size, str(src))
    _, abstract = abstract_model(config)
    layout = Layout(state, sizes, abstract)
    skipped = check_keys(layout, str(src))
    flat = layout.flat
    if sizes.image_size != trained_at:
        grid = sizes.image_size // sizes.patch_size
        flat = {k: resize_rel_pos_bias_table(v, grid) if k.endswith("relative_position_bias_table") else v
                for k, v in flat.items()}
    params = fit(flat, abstract, str(src))
    fmt = "cfack" if sizes.momentum else "x2vlm"
    meta = {"config": to_dict(config), "converted_from": {"path": str(src.absolute()), "format": fmt}}
    if tokenizer is not None:
        meta["tokenizer"] = tokenizer.to_spec()
    if skipped:
        print(f"ignored {sum(skipped.values())} keys: " + ", ".join(f"{n} {why}" for why, n in skipped.items()))
    print("momentum copies: " + ("the checkpoint's" if sizes.momentum else "none in the checkpoint, so copies "
                                                                            "of the online weights"))
    if tokenizer is None:
        print("no --vocab: the checkpoint holds no tokenizer, which jaxretrieval.load and evaluate need (training "
              "reads data.root/data.tokenizer)")
    return write_model(out, params, meta)


__all__ = ["XVLMSizes", "build_config", "import_xvlm", "infer_sizes", "read_checkpoint"]
