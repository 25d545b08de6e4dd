"""LAVIS BLIP-2 checkpoints (`pretrain_vitL`: CLIP ViT-L/14 `clip_L` + Q-Former) to checkpoints of system blip2
(`models.blip2.Blip2`), and transformers' Q-Former weights. Names read in LAVIS (github:salesforce/LAVIS,
lavis/models/blip2_models/blip2.py, blip2_qformer.py, clip_vit.py) and transformers (models/blip_2).

`import_blip2` reads `{'model': state_dict, ...}` (what LAVIS's runner saves; its `config`, when there, gives the
caption length `max_txt_len`) or a bare state dict:
- `visual_encoder.*`: LAVIS's `clip_L`, OpenAI CLIP's visual names without the `visual.` prefix (conv1, class and
  positional embedding, ln_pre, `transformer.resblocks.{i}` with attn in_proj / out_proj, ln_1, ln_2, mlp.c_fc,
  mlp.c_proj; no ln_post, no proj), mapped by convert/clip_layout.py's OpenAI rules to our `VisionTransformer`, every
  block kept (LAVIS's 23). LAVIS saves only trainable parameters, so a checkpoint trained with `freeze_vit` (the
  released `blip2_pretrained_vitL.pth`) has none: then `vision` names the CLIP the ViT comes from, an OpenAI
  ViT-L/14 `.pt`, an open_clip file or folder, a Hugging Face CLIPModel folder (read by convert/clip.py) or LAVIS's
  own `clip_vit_L.pth` (the prefix-less visual names), of which the first 23 blocks are taken, as LAVIS's
  `create_clip_vit_L` builds (`vision_layers` says otherwise; default for a tower not 1024 wide: all blocks but the
  last); the rest, ln_post, proj and any text tower are skipped and counted.
- `ln_vision.*`, `query_tokens`, `Qformer.bert.*` (embeddings: word and position tables and their LayerNorm; layers
  with `attention.self`, `crossattention` every `cross_every` layers, `intermediate_query` / `output_query`),
  `vision_proj`, `text_proj`, `itm_head` and the scalar `temp`: models/qformer.py's `flat_from_lavis`.
- Skipped and counted: `Qformer.cls.*` (the captioning / ITG head) and `position_ids` buffers. Any other key is an
  error naming it, as is a missing one.
Sizes come from the shapes; the attention heads (no shape holds them) are `heads` (Q-Former) and `vision_heads`, else
those a `qformer_hf` folder's config.json or a whole CLIP's config gives, else width / 64 (ViT-L 16, bert-base 12).
The ViT runs with QuickGELU, as LAVIS's clip_L always does. `image_size` resamples the position grid as LAVIS does
when it builds clip_L at another size (bicubic, corners aligned: models/lavis_vit.py `lavis_resize_positions`). The
config: system blip2 named after the preset of the same sizes (`blip2_pretrain_vitl`, `blip2_tiny`), else "custom";
captions of `max_txt_len` (32) WordPiece tokens; squashed images, CLIP's normalisation; `blip2.query_reduce` stays
`max` (BLIP-2's ITC; the PAB seed's scorer is `first`, an evaluation override).

Our `VisionTransformer` always holds `ln_post` and `proj` parameters, which BLIP-2 never runs (`Blip2` stops after
the blocks): they are written as an identity LayerNorm (scale ones, bias zeros) and a zero projection.

Hugging Face: transformers' BLIP-2 vision model (`vision_model.*`) is EVA ViT-g in BLIP's layout (no ln_pre, a patch
convolution with a bias, q / v biases, `post_layernorm` standing for LAVIS's ln_vision), which system blip2's CLIP
tower cannot hold, so only the Q-Former part converts:
- `qformer_hf` (`--qformer-hf FOLDER`): a folder with config.json and model.safetensors (or pytorch_model.bin) of a
  `Blip2QFormerModel` (`layernorm.*`, `encoder.layer.*`), or of a `Blip2ForImageTextRetrieval` / `Blip2Model`
  (`qformer.*`, and in the retrieval model the text `embeddings.*` tables, `query_tokens`, `vision_projection`,
  `text_projection`, `itm_head`), mapped by models/qformer.py's `flat_from_hf`: whatever of these it holds replaces
  the LAVIS checkpoint's (temp and ln_vision stay LAVIS's; transformers keeps no temp, and its ln_vision is the EVA
  tower's post_layernorm, skipped with the tower);
- SRC itself such a folder: a partial checkpoint for train.init_from (a fresh model's Q-Former, and the ViT when
  `vision` is given; the rest starts fresh), sized by the folder's config.json and shapes (query tokens 32 and
  projections 256 wide where it holds none); without `vision` the ViT is LAVIS's ViT-L/14 (23 blocks, 224 px),
  which needs a Q-Former reading 1024-wide image tokens.

Left out: EVA ViT-g models (LAVIS's `pretrain` and `coco`, and every Hugging Face BLIP-2 release) beyond their
Q-Former, the captioning head, LAVIS's fp16 ViT precision (weights are stored in float32).
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
from convert.clip import open_source, per_layer, settings_for
from convert.clip_layout import LAYOUTS, OPENAI, Layout, _ratio, infer_sizes, peek, to_ours
from convert.presets import named_config, preset_name, wordpiece_vocab
from convert.sources import (
    check_keys,
    count_indexed,
    head_count,
    listed,
    load_hf_weights,
    load_tensors,
    load_wrapped_state,
    read_json,
)
from convert.uit import _prune, _stacked
from convert.xvlm import fit
from jaxretrieval.checkpoint import write_model
from jaxretrieval.config import Config, to_dict
from jaxretrieval.models import MODEL_PRESETS, abstract_model
from jaxretrieval.models.lavis_vit import lavis_resize_positions
from jaxretrieval.models.qformer import VOCAB_SIZE, flat_from_hf, flat_from_lavis, lavis_pairs
from jaxretrieval.systems.blip2 import Blip2Settings

VISUAL, BERT, CAPTION_HEAD = "visual_encoder.", "Qformer.bert.", "Qformer.cls."
BUFFERS = re.compile(r"(^|\.)position_ids$")
# Our tower's parameters BLIP-2 never runs, written as an identity LayerNorm and a zero projection.
UNUSED = {"visual/ln_post/scale": np.ones, "visual/ln_post/bias": np.zeros, "visual/proj": np.zeros}
CONTEXT_LENGTH = 32  # LAVIS Blip2Qformer's max_txt_len
HEAD_DIM = 64  # ViT-L/14's and bert-base's head width: the heads unless told
# LAVIS's blip_image_eval: CLIP's normalisation, Resize((size, size), bicubic).
MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
# transformers' names of the retrieval heads (Blip2ForImageTextRetrieval) -> ours (torch Linears: transposed)
HF_HEADS = {"vision_projection": "vision_proj", "text_projection": "text_proj", "itm_head": "itm_head/out"}
# What a partial checkpoint may lack, and our path that tells it has it.
FRESH = (("the ViT", "vision/"), ("ln_vision", "retrieval/ln_vision/"),
         ("the word / position tables", "retrieval/qformer/embeddings/word/"),
         ("the text feed-forward", "retrieval/qformer/encoder/layers/0/cross/intermediate/"),
         ("the query tokens", "retrieval/query_tokens"), ("the projections", "retrieval/vision_proj/"),
         ("the ITM head", "retrieval/itm_head/"))
VIT_L = MODEL_PRESETS["blip2_pretrain_vitl"]["image"]  # LAVIS's clip_L: a fresh tower's sizes


@dataclasses.dataclass(frozen=True)
class VisionSizes:
    image_size: int
    patch_size: int
    width: int
    layers: int  # the blocks our tower holds and runs
    heads: int
    mlp_ratio: float


@dataclasses.dataclass(frozen=True)
class QFormerSizes:
    vocab_size: int
    width: int
    layers: int
    heads: int
    ffn_dim: int
    max_positions: int
    cross_every: int
    encoder_width: int
    query_tokens: int
    embed_dim: int


@dataclasses.dataclass
class Vision:
    """A ViT's weights ready to map: `layout` (OpenAI's or Hugging Face's rules, renamed to where the tensors sit)
    reads `state` into our tower of `sizes`; `skipped` counts the source's tensors left out."""
    layout: Layout
    state: dict[str, np.ndarray]
    sizes: VisionSizes
    where: str
    skipped: Counter


# ---- the ViT ------------------------------------------------------------------------------------------------------
def vision_layout(layout: Layout, prefix: str) -> Layout:
    """`layout`'s rules of the image tower without ln_post and proj, its keys moved from their `visual.` (or
    `vision_model.`) prefix to `prefix`; no text tower."""
    base = layout.vision_blocks.split(".")[0] + "."
    top = tuple(dataclasses.replace(rule, theirs=tuple(prefix + key.removeprefix(base) for key in rule.theirs))
                for rule in layout.top if rule.ours.startswith("visual/") and rule.ours not in UNUSED)
    return dataclasses.replace(layout, name=f"{layout.name} image tower under '{prefix}'", top=top,
                               vision_blocks=prefix + layout.vision_blocks.removeprefix(base), text_blocks="")


def _vision_sizes(layout: Layout, state: dict[str, np.ndarray], keep: int | None, heads: int | None,
                  where: str) -> VisionSizes:
    """Sizes read off the image tower's shapes: all its blocks, or the first `keep`."""
    def shape(ours: str) -> tuple[int, ...]:
        try:
            return peek(layout, state, ours, 2)
        except ConvertError as e:
            raise ConvertError(f"{where}: {e}") from None

    rows, width = shape("visual/patch_embed/kernel")
    patch = math.isqrt(rows // 3)
    positions = shape("visual/positional_embedding")[0]
    grid = math.isqrt(max(positions - 1, 0))
    if patch * patch * 3 != rows or grid * grid + 1 != positions:
        raise ConvertError(f"{where}: not a square-patch ViT with a class token and a square position grid")
    blocks = count_indexed(state, rf"{re.escape(layout.vision_blocks)}\.(\d+)\.")
    layers = blocks if keep is None else keep
    if not 0 < layers <= blocks:
        raise ConvertError(f"{where}: {blocks} transformer blocks ('{layout.vision_blocks}.N.*'), {layers} wanted")
    heads = head_count(width, heads, "ViT", "--vision-heads", HEAD_DIM, where)
    return VisionSizes(image_size=patch * grid, patch_size=patch, width=width, layers=layers, heads=heads,
                       mlp_ratio=_ratio(shape("visual/transformer/blocks/0/mlp/fc/kernel")))


def lavis_vision(state: dict[str, np.ndarray], heads: int | None, where: str) -> Vision:
    """The checkpoint's own `visual_encoder.*` (LAVIS's clip_L, every block)."""
    if f"{VISUAL}conv1.weight" not in state and any(k.startswith(f"{VISUAL}blocks.") for k in state):
        raise ConvertError(f"{where}: visual_encoder.* is an EVA ViT-g (blocks.N.*, LAVIS's eva_clip_g: the pretrain "
                           f"and coco models); only pretrain_vitL's CLIP ViT-L (clip_L) converts")
    layout = vision_layout(OPENAI, VISUAL)
    # Every visual_encoder.* key goes to to_ours, so one without a place is named there.
    mine = {k: v for k, v in state.items() if k.startswith(VISUAL)}
    return Vision(layout, mine, _vision_sizes(layout, mine, None, heads, where), where, Counter())


def clip_vision(path: str | Path, heads: int | None, layers: int | None = None) -> Vision:
    """The first `layers` blocks of a CLIP's image tower (default: LAVIS's 23 of a 1024-wide ViT-L, as its
    `create_clip_vit_L` builds; all but the last of another width): OpenAI / open_clip / Hugging Face through
    convert/clip.py's readers, or LAVIS's prefix-less clip_vit_L.pth."""
    path, where = Path(path), f"--vision {path}"
    try:
        source = open_source(path, None, None)
    except ConvertError as e:
        state = load_tensors(path)[0] if path.is_file() else {}
        if "conv1.weight" not in state:
            raise ConvertError(f"{where}: {e}") from None
        # LAVIS's clip_vit_L.pth: OpenAI's visual names without the prefix
        return _take_vision(vision_layout(OPENAI, ""), "", state, heads, layers, where)
    full = LAYOUTS["hf" if source.format == "hf" else "openai"]
    if heads is None:
        try:  # a whole CLIP: the heads its config (or OpenAI's 64-wide rule) gives
            heads = settings_for(source, infer_sizes(full, source.state)).image_heads
        except ConvertError:
            heads = None  # an image tower alone: width / 64
    prefix = full.vision_blocks.split(".")[0] + "."
    return _take_vision(vision_layout(full, prefix), prefix, source.state, heads, layers, where)


LEFT_OUT = re.compile(r"^(visual\.)?(ln_post\.|proj$)|^vision_model\.post_layernorm\.|^visual_projection\.")


def _take_vision(layout: Layout, prefix: str, state: dict[str, np.ndarray], heads: int | None, layers: int | None,
                 where: str) -> Vision:
    """The tower's first `layers` blocks (see clip_vision); the rest of the file skipped by kind, an unknown
    image-tower key an error."""
    blocks = count_indexed(state, rf"{re.escape(layout.vision_blocks)}\.(\d+)\.")
    if blocks < 2:
        raise ConvertError(f"{where}: no CLIP ViT image tower of 2 or more blocks "
                           f"('{layout.vision_blocks}.N.*')")
    if layers is None:
        width = peek(layout, state, "visual/class_embedding", 1)[0]
        layers = VIT_L["layers"] if width == VIT_L["width"] and blocks >= VIT_L["layers"] else blocks - 1
    sizes = _vision_sizes(layout, state, layers, heads, where)
    needed = {key for rule in layout.rules(sizes.layers, 0) for key in rule.theirs}
    block = re.compile(rf"{re.escape(layout.vision_blocks)}\.(\d+)\.")
    skipped: Counter = Counter()
    unexpected = []
    for key in sorted(state.keys() - needed):
        if block.match(key):
            skipped[f"image blocks after the first {layers} (LAVIS's clip_L runs 23 of ViT-L's 24)"] += 1
        elif LEFT_OUT.search(key):
            skipped["image ln_post / proj (BLIP-2 runs neither)"] += 1
        elif BUFFERS.search(key) or layout.ignored.search(key):
            skipped["buffers"] += 1
        elif prefix and not key.startswith(prefix):
            skipped["the CLIP's text tower and logit scale"] += 1
        else:
            unexpected.append(key)
    if unexpected:
        raise ConvertError(f"{where}: {len(unexpected)} unexpected image-tower keys: {listed(unexpected)}")
    return Vision(layout, {k: state[k] for k in needed if k in state}, sizes, where, skipped)


def vision_flat(vision: Vision, expected: dict[str, tuple[int, ...]], image_size: int) -> dict[str, np.ndarray]:
    """Our flat `vision/...` tensors: the source's through the layout (missing, unexpected and misshapen keys are
    one ConvertError), the position grid resampled for `image_size`, ln_post and proj filled as unused.
    `expected`: our per-layer `visual/...` shapes."""
    s = vision.sizes
    shapes = {k: v for k, v in expected.items() if k not in UNUSED}
    shapes["visual/positional_embedding"] = ((s.image_size // s.patch_size) ** 2 + 1, s.width)  # as stored
    flat = to_ours(vision.layout, (s.layers, 0), vision.state, shapes, where=vision.where)
    if image_size != s.image_size:
        flat["visual/positional_embedding"] = lavis_resize_positions(flat["visual/positional_embedding"],
                                                                     image_size // s.patch_size)
    for name, fill in UNUSED.items():
        flat[name] = fill(expected[name], np.float32)
    return {f"vision/{k.removeprefix('visual/')}": v for k, v in flat.items()}


# ---- the Q-Former and heads ---------------------------------------------------------------------------------------
def _shape(state: dict[str, np.ndarray], key: str, what: str) -> tuple[int, ...]:
    if key not in state:
        raise ConvertError(f"missing key '{key}' (not {what}?)")
    return tuple(state[key].shape)


def _cross_every(state: dict[str, np.ndarray], prefix: str, inner: str, layers: int) -> int:
    cross = sorted(int(m.group(1)) for key in state if (m := re.match(
        rf"{re.escape(prefix)}encoder\.layer\.(\d+)\.crossattention\.{inner}\.query\.weight$", key)))
    every = cross[1] - cross[0] if len(cross) > 1 else layers
    if not cross or cross != list(range(0, layers, every)) or layers % every:
        raise ConvertError(f"Q-Former layers 0..{layers - 1} with cross-attention in {cross}: not whole units of "
                           f"cross_every layers, the first of each cross-attending")
    return every


def lavis_qformer_sizes(state: dict[str, np.ndarray], heads: int | None) -> QFormerSizes:
    what = "a LAVIS BLIP-2 (Blip2Qformer) checkpoint"
    vocab, width = _shape(state, f"{BERT}embeddings.word_embeddings.weight", what)
    layers = count_indexed(state, rf"{re.escape(BERT)}encoder\.layer\.(\d+)\.attention\.self\.query\.weight$")
    every = _cross_every(state, BERT, "self", layers)
    return QFormerSizes(
        vocab_size=vocab, width=width, layers=layers, heads=head_count(width, heads, "Q-Former"),
        ffn_dim=_shape(state, f"{BERT}encoder.layer.0.intermediate_query.dense.weight", what)[0],
        max_positions=_shape(state, f"{BERT}embeddings.position_embeddings.weight", what)[0], cross_every=every,
        encoder_width=_shape(state, f"{BERT}encoder.layer.0.crossattention.self.key.weight", what)[1],
        query_tokens=_shape(state, "query_tokens", what)[1], embed_dim=_shape(state, "vision_proj.weight", what)[0])


def lavis_flat(state: dict[str, np.ndarray], q: QFormerSizes, where: str) -> tuple[dict[str, np.ndarray], Counter]:
    """Our flat `retrieval/...` tensors and the skipped keys; missing and unexpected keys are a ConvertError.
    `visual_encoder.*` is the ViT's (checked there)."""
    needed = {theirs for _, theirs, _ in lavis_pairs(q.layers, q.cross_every)}

    def reason(key: str) -> str | None:
        if key.startswith(VISUAL):
            return ""
        if key.startswith(CAPTION_HEAD):
            return "captioning head (Qformer.cls.*)"
        return "position_ids buffers" if BUFFERS.search(key) else None

    skipped = check_keys(state, needed, where, "blip2's Blip2", reason)
    try:
        flat = flat_from_lavis(state)
    except ValueError as e:
        raise ConvertError(f"{where}: {e}") from None
    flat["temp"] = np.asarray(flat["temp"], np.float32).reshape(())
    return {f"retrieval/{k}": v for k, v in flat.items()}, skipped


@dataclasses.dataclass
class HFQFormer:
    """What a transformers folder gives: our flat `retrieval/...` tensors, the sizes it tells (None where it holds
    none), the skipped keys."""
    flat: dict[str, np.ndarray]
    sizes: dict[str, Any]
    skipped: Counter
    kind: str
    text_ffn: bool  # False: a captioning model's Q-Former (use_qformer_text_input off), no text feed-forward


def hf_qformer(folder: str | Path) -> HFQFormer:
    """A Blip2QFormerModel / Blip2ForImageTextRetrieval / Blip2Model folder's Q-Former and retrieval heads."""
    folder = Path(folder)
    where = str(folder)
    if not (folder / "config.json").is_file():
        raise ConvertError(f"{where} is not a Hugging Face folder: config.json is missing")
    raw, state = read_json(folder / "config.json"), load_hf_weights(folder)
    config = raw["qformer_config"] if isinstance(raw.get("qformer_config"), dict) else raw  # Blip2Config or not
    prefix = "qformer." if any(k.startswith("qformer.") for k in state) else ""
    kind = "Blip2QFormerModel" if not prefix else next(iter(raw.get("architectures") or []), "Blip2Model")
    if f"{prefix}encoder.layer.0.attention.attention.query.weight" not in state:
        raise ConvertError(f"{where}: no transformers Q-Former ('{prefix}encoder.layer.0.attention.attention.query."
                           f"weight'): not a Blip2QFormerModel, Blip2Model or Blip2ForImageTextRetrieval")
    embeddings = "embeddings." if "embeddings.word_embeddings.weight" in state else None
    text_ffn = f"{prefix}encoder.layer.0.intermediate.dense.weight" in state
    try:
        qformer = flat_from_hf(state, prefix, embeddings=embeddings, text_ffn=text_ffn)
    except ValueError as e:
        raise ConvertError(f"{where}: {e}") from None
    flat = {f"retrieval/qformer/{k}": v for k, v in qformer.items()}
    used = {k for k in state if k.startswith(prefix) or (embeddings and k.startswith(embeddings))}
    if "query_tokens" in state:
        flat["retrieval/query_tokens"] = state["query_tokens"]
        used.add("query_tokens")
    for theirs, ours in HF_HEADS.items():
        if f"{theirs}.weight" in state:
            flat[f"retrieval/{ours}/kernel"] = state[f"{theirs}.weight"].T
            flat[f"retrieval/{ours}/bias"] = state[f"{theirs}.bias"]
            used |= {f"{theirs}.weight", f"{theirs}.bias"}
    skipped: Counter = Counter()
    unexpected = []
    for key in sorted(state.keys() - used):
        if key.startswith("vision_model."):
            skipped["vision_model.* (EVA ViT-g in BLIP's layout, with the ln_vision it stands for: not a CLIP tower)"] \
                += 1
        elif key.startswith(("language_model.", "language_projection.")):
            skipped["the language model and its projection"] += 1
        elif BUFFERS.search(key):
            skipped["position_ids buffers"] += 1
        else:
            unexpected.append(key)
    if unexpected:
        raise ConvertError(f"{where}: {len(unexpected)} unexpected keys: {listed(unexpected)}")
    width = state[f"{prefix}layernorm.weight"].shape[0]
    layers = count_indexed(state, rf"{re.escape(prefix)}encoder\.layer\.(\d+)\.attention\.attention\.query\.weight$")
    sizes = {"width": width, "layers": layers, "heads": config.get("num_attention_heads"),
             "ffn_dim": state[f"{prefix}encoder.layer.0.intermediate_query.dense.weight"].shape[0],
             "cross_every": _cross_every(state, prefix, "attention", layers),
             "encoder_width": state[f"{prefix}encoder.layer.0.crossattention.attention.key.weight"].shape[1],
             "vocab_size": state[f"{embeddings}word_embeddings.weight"].shape[0] if embeddings else
             config.get("vocab_size"),
             "max_positions": state[f"{embeddings}position_embeddings.weight"].shape[0] if embeddings else
             config.get("max_position_embeddings"),
             "query_tokens": state["query_tokens"].shape[1] if "query_tokens" in state else raw.get("num_query_tokens"),
             "embed_dim": state["vision_projection.weight"].shape[0] if "vision_projection.weight" in state else
             raw.get("image_text_hidden_size")}
    return HFQFormer(flat, sizes, skipped, kind, text_ffn)


# ---- config and import ---------------------------------------------------------------------------------------------
def build_config(v: VisionSizes, q: QFormerSizes, *, image_size: int | None = None,
                 context_length: int = CONTEXT_LENGTH) -> Config:
    """Config of system blip2 for these sizes, named like the preset of the same sizes (else "custom")."""
    overrides = {"system": "blip2", "model.family": "blip2", "model.embed_dim": q.embed_dim,
                 "model.activation": "quick_gelu", "model.image.image_size": image_size or v.image_size,
                 "model.image.patch_size": v.patch_size, "model.image.width": v.width, "model.image.layers": v.layers,
                 "model.image.heads": v.heads, "model.image.mlp_ratio": v.mlp_ratio,
                 "model.text.vocab_size": q.vocab_size, "model.text.width": q.width, "model.text.layers": q.layers,
                 "model.text.heads": q.heads, "model.text.mlp_ratio": _ratio((q.width, q.ffn_dim)),
                 "model.text.context_length": min(context_length, q.max_positions),
                 "blip2.query_tokens": q.query_tokens, "blip2.cross_every": q.cross_every,
                 "blip2.max_positions": q.max_positions,
                 # LAVIS's evaluation: BERT WordPiece captions, squashed images, CLIP's normalisation.
                 "data.tokenizer": "vocab.txt", "data.tokenizer_kind": "wordpiece", "data.resize": "squash",
                 "data.mean": MEAN, "data.std": STD, "train.loss": "blip2", "eval.protocol": "text_to_image"}
    overrides = [f"{key}={value}".replace(" ", "") for key, value in overrides.items()]
    return named_config(overrides, preset_name("blip2", overrides), "converted BLIP-2 config", "blip2")




def _vision_shapes(config: Config) -> dict[str, tuple[int, ...]]:
    """Our per-layer image tower shapes, named as the CLIP layouts name them (`visual/...`)."""
    _, abstract = abstract_model(dataclasses.replace(config, model=per_layer(config.model)))
    return {"visual/" + name.removeprefix("vision/"): shape for name, shape in _flat_shapes(abstract).items()
            if name.startswith("vision/")}


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(x.shape)
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _image_size(requested: int | None, vision: VisionSizes) -> int:
    if requested is None:
        return vision.image_size
    if requested <= 0 or requested % vision.patch_size:
        raise ConvertError(f"--image-size {requested} is not a positive multiple of the patch size "
                           f"{vision.patch_size}")
    return requested


def _same_qformer(hf: HFQFormer, q: QFormerSizes, where: str) -> None:
    """The folder's Q-Former must be the LAVIS checkpoint's shape for shape (its config's vocabulary and positions
    count only where it holds the tables)."""
    tables = "retrieval/qformer/embeddings/word/embedding" in hf.flat
    for name in ("width", "layers", "cross_every", "ffn_dim", "encoder_width", "query_tokens", "embed_dim", "heads",
                 *(("vocab_size", "max_positions") if tables else ())):
        theirs = hf.sizes.get(name)
        if theirs is not None and theirs != getattr(q, name):
            raise ConvertError(f"--qformer-hf {where}: its {name} is {theirs}, the LAVIS checkpoint's "
                               f"{getattr(q, name)}")


def _summary(skipped: Counter) -> None:
    if skipped:
        print(f"ignored {sum(skipped.values())} keys: " + ", ".join(f"{n} {why}" for why, n in skipped.items()))


def import_blip2(src: str | Path, out: str | Path, *, vocab: str | Path | None = None,
                 vision: str | Path | None = None, qformer_hf: str | Path | None = None, heads: int | None = None,
                 vision_heads: int | None = None, vision_layers: int | None = None,
                 image_size: int | None = None) -> Path:
    """A LAVIS BLIP-2 checkpoint at SRC -> a complete system-blip2 checkpoint at OUT, or a Hugging Face Q-Former
    folder at SRC -> a partial one (see the module docstring); nothing at OUT on failure. `vocab`: BLIP-2's
    bert-base-uncased vocab.txt (or tokenizer.json), stored as the tokenizer; `vision`: the CLIP the ViT comes from
    when SRC holds none; `qformer_hf`: a transformers folder whose Q-Former replaces SRC's; `heads` /
    `vision_heads`: the attention heads (default width / 64); `vision_layers`: the blocks taken from `vision`
    (default: 23 of a ViT-L, as LAVIS; all but the last of another width); `image_size`: the position grid resampled
    for it."""
    src, out = Path(src), Path(out)
    if out.exists():
        raise ConvertError(f"{out} already exists; choose a new output folder")
    for flag, value in (("--heads", heads), ("--vision-heads", vision_heads), ("--vision-layers", vision_layers),
                        ("--image-size", image_size)):
        if value is not None and value <= 0:
            raise ConvertError(f"{flag} must be positive, got {value}")
    if src.is_dir():
        if qformer_hf is not None:
            raise ConvertError(f"{src} is a Hugging Face folder already; --qformer-hf goes with a LAVIS checkpoint")
        return _import_hf(src, out, vocab=vocab, vision=vision, heads=heads, vision_heads=vision_heads,
                          vision_layers=vision_layers, image_size=image_size)
    where = str(src)
    state, loaded = load_wrapped_state(src)
    hf = hf_qformer(qformer_hf) if qformer_hf is not None else None
    try:
        q = lavis_qformer_sizes(state, heads or (hf.sizes["heads"] if hf else None))
    except ConvertError as e:
        raise ConvertError(f"{where}: {e}") from None
    has_vit = any(key.startswith(VISUAL) for key in state)
    if has_vit and vision is not None:
        raise ConvertError(f"{where} holds its own ViT (visual_encoder.*): leave out --vision")
    if not has_vit and vision is None:
        raise ConvertError(f"{where} holds no ViT (visual_encoder.*): LAVIS saves only the trainable weights, so a "
                           f"model trained with freeze_vit has none; give the CLIP it was built from with --vision "
                           f"(OpenAI's ViT-L-14.pt, an open_clip file or LAVIS's clip_vit_L.pth)")
    if has_vit and vision_layers is not None:
        raise ConvertError("--vision-layers picks the blocks of --vision; SRC's own visual_encoder.* runs them all")
    vit = lavis_vision(state, vision_heads, where) if has_vit else clip_vision(vision, vision_heads, vision_layers)
    if q.encoder_width != vit.sizes.width:
        raise ConvertError(f"{where}: the Q-Former cross-attends to {q.encoder_width}-wide image tokens, the ViT "
                           f"({vit.where}) is {vit.sizes.width} wide")
    if hf is not None:
        _same_qformer(hf, q, str(qformer_hf))
    saved = loaded.get("config") if isinstance(loaded.get("config"), dict) else {}
    model = saved.get("model") if isinstance(saved.get("model"), dict) else {}
    context = model.get("max_txt_len") if isinstance(model.get("max_txt_len"), int) else CONTEXT_LENGTH
    size = _image_size(image_size, vit.sizes)
    config = build_config(vit.sizes, q, image_size=size, context_length=context)
    text = config.model.text
    tokenizer = wordpiece_vocab(vocab, text.context_length, text.vocab_size, where)
    flat = vision_flat(vit, _vision_shapes(config), size)
    retrieval, skipped = lavis_flat(state, q, where)
    flat.update(retrieval)
    if hf is not None:
        flat.update(hf.flat)
        skipped.update(hf.skipped)
    skipped.update(vit.skipped)
    _, abstract = abstract_model(config)
    params = fit(flat, abstract, where)
    meta = {"config": to_dict(config), "converted_from": {
        "path": str(src.absolute()), "format": "lavis_blip2",
        **({"vision": str(Path(vision).absolute())} if vision is not None else {}),
        **({"qformer_hf": str(Path(qformer_hf).absolute())} if qformer_hf is not None else {})}}
    if tokenizer is not None:
        meta["tokenizer"] = tokenizer.to_spec()
    _summary(skipped)
    print(f"ViT: {vit.sizes.layers} blocks from {vit.where if vision is not None else 'visual_encoder.*'}; its "
          f"ln_post and proj, which BLIP-2 never runs, written as an identity LayerNorm and a zero projection"
          + (f"; Q-Former from the {hf.kind} in {qformer_hf}" if hf is not None else ""))
    if tokenizer is None:
        print("no --vocab: the checkpoint holds no tokenizer, which jaxretrieval.load and evaluate need (training "
              "reads data.root/data.tokenizer)")
    return write_model(out, params, meta)


def _import_hf(src: Path, out: Path, *, vocab: str | Path | None, vision: str | Path | None, heads: int | None,
               vision_heads: int | None, vision_layers: int | None, image_size: int | None) -> Path:
    """A transformers Q-Former folder (and a CLIP's ViT) -> a partial system-blip2 checkpoint for train.init_from."""
    hf = hf_qformer(src)
    s, where = hf.sizes, str(src)
    settings = Blip2Settings()
    q = QFormerSizes(vocab_size=s["vocab_size"] or VOCAB_SIZE, width=s["width"], layers=s["layers"],
                     heads=head_count(s["width"], heads or s["heads"], "Q-Former"), ffn_dim=s["ffn_dim"],
                     max_positions=s["max_positions"] or settings.max_positions, cross_every=s["cross_every"],
                     encoder_width=s["encoder_width"], query_tokens=s["query_tokens"] or settings.query_tokens,
                     embed_dim=s["embed_dim"] or MODEL_PRESETS["blip2_pretrain_vitl"]["embed_dim"])
    vit = clip_vision(vision, vision_heads, vision_layers) if vision is not None else None
    if vit is not None:
        v = vit.sizes
    elif q.encoder_width == VIT_L["width"]:
        v = VisionSizes(image_size=VIT_L["image_size"], patch_size=VIT_L["patch_size"], width=VIT_L["width"],
                        layers=VIT_L["layers"], heads=VIT_L["heads"], mlp_ratio=4.0)
    else:
        raise ConvertError(f"{where}: the Q-Former cross-attends to {q.encoder_width}-wide image tokens (EVA ViT-g: "
                           f"1408), system blip2's fresh ViT-L/14 to 1024; give a CLIP of that width with --vision")
    if q.encoder_width != v.width:
        raise ConvertError(f"{where}: the Q-Former cross-attends to {q.encoder_width}-wide image tokens, the ViT "
                           f"(--vision {vision}) is {v.width} wide")
    size = _image_size(image_size, v)
    config = build_config(v, q, image_size=size)
    text = config.model.text
    tokenizer = wordpiece_vocab(vocab, text.context_length, text.vocab_size, where)
    flat = dict(hf.flat)
    if vit is not None:
        flat.update(vision_flat(vit, _vision_shapes(config), size))
        hf.skipped.update(vit.skipped)
    _, abstract = abstract_model(config)
    template = _prune(abstract, {_stacked(k) for k in flat})
    params = fit(flat, template, where)
    meta = {"partial": True, "component": "blip2", "config": to_dict(config),
            "converted_from": {"path": str(src.absolute()), "format": f"hf_{hf.kind}",
                               **({"vision": str(Path(vision).absolute())} if vision is not None else {})}}
    if tokenizer is not None:
        meta["tokenizer"] = tokenizer.to_spec()
    _summary(hf.skipped)
    fresh = [name for name, part in FRESH if not any(k.startswith(part) for k in flat)]
    print(f"a partial checkpoint for train.init_from: the Q-Former from the {hf.kind}"
          + (f", the ViT's {v.layers} blocks from --vision" if vit is not None else "")
          + f"; {', '.join([*fresh, 'temp'])} start fresh")
    return write_model(out, params, meta)


__all__ = ["QFormerSizes", "VisionSizes", "build_config", "clip_vision", "hf_qformer", "import_blip2",
           "lavis_qformer_sizes", "vision_layout"]
