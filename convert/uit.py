"""UIT / CMP PyTorch checkpoints (the PAB seed's CMP baseline, uit/cmp of github:AIVIETNAM-Hub/Hybrid-Unified-and-
Iterative-A-Novel-Framework-for-Text-based-Person-Anomaly-Retrieval) to checkpoints of system uit (`models.uit.UIT`),
and the original's initial weights (a Swin, optionally with a Hugging Face BERT) to a partial one for train.init_from.

`import_uit` reads `{'model': state_dict, 'config': ...}` (what the original's training saves) or a bare state dict:
- `vision_encoder.*`: the Swin in Microsoft's layout (each PatchMerging at the end of the stage before it; timm's
  layout reads too), mapped by `models.swin.flat_from_timm`. Sizes from shapes: the embedding width, the stage depths
  from the key names, each stage's heads from its relative position table's columns, the window from stage 0's
  table ((2W - 1)^2 rows). The image size is the saved config's `image_res` or `h` (= `w`), else told by stage 0's
  shifted-window `attn_mask` ((h / W)^2 windows), else 224, the original's.
- `text_encoder.bert.*` and `text_encoder.cls.predictions.*`: a BERT whose layers from the first with
  `crossattention` on read the image tokens (convert/bert.py); heads = width / 64 unless `heads` says otherwise.
- `vision_proj.{0,2}`, `text_proj.{0,2}`: BatchNorm1d (weight, bias -> scale, bias; running_mean / running_var -> our
  batch statistics mean / var) and Linear; `embed_dim` from the Linear, the chunks from its input width.
- `itm_head.{0,1,3}`, `temp`, SimMIM's `simmim.encoder.mask_token` (1, 1, C) -> (C,) and `simmim.decoder.0` (a 1x1
  convolution (out, in, 1, 1) -> our dense kernel (in, out)).
Skipped and counted: index and mask buffers, BatchNorm's num_batches_tracked, `simmim.encoder.encoder.*` (the vision
encoder again, one module shared: checked equal) and the MLM decoder tied to the word embeddings (checked equal). Any
other key is an error naming it, as is a missing one.

`import_swin` reads a Microsoft Swin checkpoint (`{'model': state_dict}`, e.g. swin_base_patch4_window7_224_22k.pth)
or a timm one (.pth / .bin / .safetensors) and, with `bert`, a Hugging Face BERT folder (bert-base-uncased): the
Swin, the BERT's embeddings and layers (the fusion layers' cross-attention is not in it and starts fresh) and its MLM
head where the folder has one. The classifier (`head.*`), the pooler and the NSP head are skipped and counted.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from convert import ConvertError
from convert.bert import BertSizes, flat_from_hf, fusion_sizes, name_pairs, read_hf_bert, sizes_from_hf, text_prefix
from convert.presets import named_config, preset_name, wordpiece_vocab
from convert.sources import (
    head_pairs,
    listed,
    load_tensors,
    load_wrapped_state,
    under,
)
from convert.xvlm import fit, read_checkpoint
from jaxretrieval.checkpoint import write_model
from jaxretrieval.config import Config, to_dict
from jaxretrieval.models import abstract_model
from jaxretrieval.models.swin import SWIN_B, _entries, depths_of, flat_from_timm
from jaxretrieval.systems.uit import CUHK_MEAN, CUHK_STD, UITSettings

VISION, TEXT, SIMMIM_COPY = "vision_encoder.", "text_encoder.", "simmim.encoder.encoder."
MASK_TOKEN, DECODER = "simmim.encoder.mask_token", "simmim.decoder.0."
IMAGE_SIZE = 224  # the original's (configs/config_swinB.json image_res, cmp.yaml h and w)
CONTEXT_LENGTH = 56  # cmp.yaml max_tokens
RERANK_K = 10  # the PAB inference's k_test (configs/infer.yaml)
SWIN_BUFFERS = re.compile(r"\.(relative_position_index|attn_mask)$")
TEXT_BUFFERS = re.compile(r"embeddings\.(position_ids|token_type_ids)$")
# (our path, their name, kind) of the heads: linear weights transposed, norm weights our scales.
HEADS = [("itm_head/hidden", "itm_head.0", "linear"), ("itm_head/norm", "itm_head.1", "norm"),
         ("itm_head/out", "itm_head.3", "linear")]
# Settings of the original's training config (cmp.yaml) carried into ours where it holds them.
SAVED_SETTINGS = {"max_words": ("data.max_words", int), "label_smooth": ("uit.label_smooth", float),
                  "itc_dp": ("uit.proj_dropout", float), "eda_p": ("uit.eda_p", float),
                  "erasing_p": ("uit.erasing_p", float), "mask_prob": ("uit.mask_prob", float),
                  "max_masks": ("uit.max_masks", int)}
# Stage sizes a preset implies (the presets hold model.* only; the stages live in the uit section).
PRESET_STAGES = {"uit_swinb": (tuple(SWIN_B["depths"]), tuple(SWIN_B["num_heads"]), SWIN_B["window_size"])}


@dataclasses.dataclass(frozen=True)
class SwinSizes:
    image_size: int
    patch_size: int
    embed_dim: int
    depths: tuple[int, ...]
    heads: tuple[int, ...]
    window: int
    mlp_ratio: float
    microsoft: bool  # PatchMerging at the end of the stage before it (Microsoft's layout), else timm's

    @property
    def width(self) -> int:
        return self.embed_dim * 2 ** (len(self.depths) - 1)


@dataclasses.dataclass(frozen=True)
class UITSizes:
    swin: SwinSizes
    text: BertSizes
    embed_dim: int
    chunks: int
    itm_hidden: int
    mlm: bool
    mim: bool


def _get(state: dict[str, np.ndarray], key: str, what: str) -> np.ndarray:
    if key not in state:
        raise ConvertError(f"missing key '{key}' (not {what}?)")
    return state[key]


def _number(saved: dict[str, Any], key: str, kind: type) -> Any:
    value = saved.get(key)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    return value if isinstance(value, kind) and not isinstance(value, bool) else None


# ---- the Swin ------------------------------------------------------------------------------------------------------
def _saved_image_size(saved: dict[str, Any]) -> int | None:
    size = _number(saved, "image_res", int)
    h, w = _number(saved, "h", int), _number(saved, "w", int)
    if size is None and h is not None:
        if w is not None and w != h:
            raise ConvertError(f"the saved config trains at {h}x{w}; system uit takes square images only")
        size = h
    return size


def _mask_image_size(vision: dict[str, np.ndarray], patch: int) -> int | None:
    """The input size a shifted block's attn_mask (windows, W^2, W^2) implies: the lowest stage that has one."""
    for key in sorted(vision):
        found = re.match(r"layers\.(\d+)\.blocks\.\d+\.attn_mask$", key)
        if found and vision[key].ndim == 3:
            windows, area = vision[key].shape[0], vision[key].shape[1]
            side, window = math.isqrt(windows), math.isqrt(area)
            if side * side == windows and window * window == area:
                return side * window * 2 ** int(found.group(1)) * patch
    return None


def swin_sizes(vision: dict[str, np.ndarray], saved: dict[str, Any], where: str) -> tuple[SwinSizes, str]:
    """The sizes a Swin state dict (keys without their prefix) tells, and where the image size came from."""
    what = "a Swin Transformer"
    proj = _get(vision, "patch_embed.proj.weight", what)
    depths = depths_of(vision)
    if not depths or 0 in depths:
        raise ConvertError(f"{where}: no Swin stages 'layers.<s>.blocks.<i>.*' (or a stage without blocks)")
    tables = [_get(vision, f"layers.{s}.blocks.0.attn.relative_position_bias_table", what) for s in range(len(depths))]
    side = math.isqrt(tables[0].shape[0])
    if side * side != tables[0].shape[0] or side % 2 == 0:
        raise ConvertError(f"{where}: a relative position table of {tables[0].shape[0]} rows is not (2W - 1)^2")
    fc1 = _get(vision, "layers.0.blocks.0.mlp.fc1.weight", what)
    size, source = _saved_image_size(saved), "the saved config"
    if size is None:
        size, source = _mask_image_size(vision, proj.shape[-1]), "the shifted windows' attention masks"
    if size is None:
        size, source = IMAGE_SIZE, f"the original's default {IMAGE_SIZE} (nothing in the checkpoint tells it)"
    sizes = SwinSizes(image_size=size, patch_size=proj.shape[-1], embed_dim=proj.shape[0], depths=depths,
                      heads=tuple(t.shape[1] for t in tables), window=(side + 1) // 2,
                      mlp_ratio=fc1.shape[0] / proj.shape[0],
                      microsoft="layers.0.downsample.reduction.weight" in vision)
    return sizes, source


def swin_names(sizes: SwinSizes) -> list[str]:
    """The Swin's keys in its checkpoint's layout: timm's names from models.swin, merging moved for Microsoft's."""
    names = [theirs for _, theirs, _ in _entries(sizes.depths)]
    if sizes.microsoft:
        names = [re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", n)
                 for n in names]
    return names


def swin_flat(vision: dict[str, np.ndarray], sizes: SwinSizes, where: str) -> dict[str, np.ndarray]:
    try:
        return flat_from_timm({k: v for k, v in vision.items() if not SWIN_BUFFERS.search(k)}, "", sizes.depths)
    except ValueError as e:
        raise ConvertError(f"{where}: {e}") from None


# ---- the BERT ------------------------------------------------------------------------------------------------------
def _text_path(key: str, base: str = "text") -> str:
    return f"mlm_head/{key[4:]}" if key.startswith("mlm/") else f"{base}/{key}"


# ---- config --------------------------------------------------------------------------------------------------------
def _overrides(swin: SwinSizes, text: BertSizes | None, embed_dim: int | None, saved: dict[str, Any],
               **uit: Any) -> list[str]:
    s = swin
    overrides = {"system": "uit", "model.family": "uit", "model.image.image_size": s.image_size,
                 "model.image.patch_size": s.patch_size, "model.image.width": s.embed_dim,
                 "model.image.mlp_ratio": s.mlp_ratio, "uit.swin_depths": list(s.depths),
                 "uit.swin_heads": list(s.heads), "uit.swin_window": s.window}
    if embed_dim is not None:
        overrides["model.embed_dim"] = embed_dim
    if text is not None:
        context = min(_number(saved, "max_tokens", int) or CONTEXT_LENGTH, text.max_positions)
        overrides.update({"model.text.vocab_size": text.vocab_size, "model.text.width": text.width,
                          "model.text.layers": text.layers, "model.text.heads": text.heads,
                          "model.text.mlp_ratio": text.ffn_dim / text.width, "model.text.context_length": context,
                          "uit.fusion_from": text.fusion_from, "uit.max_positions": text.max_positions,
                          "uit.type_vocab_size": text.type_vocab_size})
    overrides.update({f"uit.{key}": value for key, value in uit.items()})
    # PAB as configs/pab/uit_swinb.yaml reads it; evaluation re-ranks each caption's top k_test images by ITM.
    overrides.update({"data.kind": "jsonl", "data.root": "data/PAB", "data.train_file": "annotation/train/pair_*.json",
                      "data.test_file": "annotation/test/pair.json", "data.tokenizer": "vocab.txt",
                      "data.tokenizer_kind": "wordpiece", "data.max_words": CONTEXT_LENGTH, "data.resize": "squash",
                      "data.mean": list(CUHK_MEAN), "data.std": list(CUHK_STD), "train.loss": "uit",
                      "eval.protocol": "text_to_image", "eval.rerank_k": RERANK_K, "eval.rerank_fill": "row_min"})
    for key, (ours, kind) in SAVED_SETTINGS.items():
        if (value := _number(saved, key, kind)) is not None:
            overrides[ours] = value
    return [f"{key}={value}".replace(" ", "") for key, value in overrides.items()]


def build_config(swin: SwinSizes, text: BertSizes | None, embed_dim: int | None = None,
                 saved: dict[str, Any] | None = None, source: str = "converted UIT config", **uit: Any) -> Config:
    """Config of system uit for these sizes, named like the preset of the same sizes (uit_swinb: Swin-B stages too),
    else "custom"; without `text` (or `embed_dim`) the preset's, uit_swinb's by default. `saved`: the original's
    training config (cmp.yaml's keys); `uit`: further uit.* settings."""
    overrides = _overrides(swin, text, embed_dim, saved or {}, **uit)
    stages = (swin.depths, swin.heads, swin.window)
    name = preset_name("uit", overrides, lambda preset: PRESET_STAGES.get(preset, stages) == stages)
    if text is None:  # a Swin alone: the text sizes are the preset's (uit_swinb's BERT-base by default)
        name = name if name != "custom" else "uit_swinb"
    return named_config(overrides, name, source, "uit")




def _equal_or_fail(state: dict[str, np.ndarray], key: str, other: str, why: str) -> None:
    if other not in state or not np.array_equal(state[key], state[other]):
        raise ConvertError(f"'{key}' differs from '{other}' (or that is missing): {why}")


# ---- import_uit ----------------------------------------------------------------------------------------------------
def infer_sizes(state: dict[str, np.ndarray], saved: dict[str, Any], heads: int | None,
                where: str) -> tuple[UITSizes, str]:
    swin, image_from = swin_sizes(under(state, VISION), saved, where)
    text = fusion_sizes(state, TEXT, heads, "a CMP / UIT checkpoint with a BERT text encoder")
    if text.encoder_width not in (None, swin.width):
        raise ConvertError(f"the cross-attention reads {text.encoder_width}-wide image tokens; the Swin ends "
                           f"{swin.width} wide")
    proj = _get(state, "vision_proj.2.weight", "a CMP / UIT checkpoint")
    chunks, rest = divmod(proj.shape[1], swin.width)
    if rest or chunks < 1:
        raise ConvertError(f"vision_proj reads {proj.shape[1]} features, no multiple of the Swin's width {swin.width}")
    itm = _get(state, "itm_head.0.weight", "a CMP / UIT checkpoint")
    return UITSizes(swin=swin, text=text, embed_dim=proj.shape[0], chunks=chunks, itm_hidden=itm.shape[0],
                    mlm=f"{TEXT}cls.predictions.bias" in state,
                    mim=any(k.startswith("simmim.") for k in state)), image_from


class Layout:
    """Where each tensor of a CMP checkpoint goes: the keys read (`needed`) and the flat {our per-layer path: array}
    (filled once every key a part reads is there)."""

    def __init__(self, state: dict[str, np.ndarray], s: UITSizes):
        self.state, self.s = state, s
        self.needed: set[str] = set()
        self.flat: dict[str, np.ndarray] = {}
        names = [VISION + n for n in swin_names(s.swin)]
        self.needed.update(names)
        if all(n in state for n in names):
            vision = {k: v for k, v in under(state, VISION).items() if VISION + k in self.needed}
            self.flat.update({f"vision/{k}": v for k, v in swin_flat(vision, s.swin, VISION + "*").items()})
        prefix = text_prefix(state, TEXT)
        pairs = [TEXT + theirs for _, theirs, _ in name_pairs(s.text, prefix, s.mlm)]
        self.needed.update(pairs)
        if all(n in state for n in pairs):
            self.flat.update({_text_path(k): v for k, v in flat_from_hf(under(state, TEXT), s.text, prefix,
                                                                        s.mlm).items()})
        heads = [p for ours, theirs, kind in HEADS for p in head_pairs(ours, theirs, kind)]
        for name in ("vision_proj", "text_proj"):
            heads += [(f"{name}/norm/scale", f"{name}.0.weight", False), (f"{name}/norm/bias", f"{name}.0.bias", False),
                      (f"{name}/norm/mean", f"{name}.0.running_mean", False),
                      (f"{name}/norm/var", f"{name}.0.running_var", False),
                      *head_pairs(f"{name}/linear", f"{name}.2", "linear")]
        for ours, theirs, transposed in [*heads, ("temp", "temp", False)]:
            self.needed.add(theirs)
            if theirs in state:
                value = state[theirs]
                self.flat[ours] = value.T if transposed else value.reshape(()) if ours == "temp" else value
        if s.mim:
            self.mim()

    def mim(self) -> None:
        state = self.state
        self.needed |= {MASK_TOKEN, DECODER + "weight", DECODER + "bias"}
        if MASK_TOKEN in state:
            token = state[MASK_TOKEN]
            if token.size != token.shape[-1]:
                raise ConvertError(f"'{MASK_TOKEN}' has shape {token.shape}, expected (1, 1, channels)")
            self.flat["mask_token"] = token.reshape(-1)
        if DECODER + "weight" in state:
            weight = state[DECODER + "weight"]
            if weight.ndim != 4 or weight.shape[2:] != (1, 1):
                raise ConvertError(f"'{DECODER}weight' has shape {weight.shape}, expected a 1x1 convolution's "
                                   f"(out, in, 1, 1)")
            self.flat["mim_decoder/kernel"] = weight[:, :, 0, 0].T
        if DECODER + "bias" in state:
            self.flat["mim_decoder/bias"] = state[DECODER + "bias"]

    def left_out(self, key: str) -> str | None:
        """Why a key that no tensor of ours reads may be skipped (None: it may not)."""
        state = self.state
        if key.startswith(SIMMIM_COPY):
            twin = VISION + key[len(SIMMIM_COPY):]
            if SWIN_BUFFERS.search(key) and twin not in state:
                return "SimMIM's copy of vision_encoder"
            if twin not in self.needed and not SWIN_BUFFERS.search(key):
                return None
            _equal_or_fail(state, key, twin, "SimMIM's encoder is the vision encoder, one module shared")
            return "SimMIM's copy of vision_encoder"
        word = f"{TEXT}{text_prefix(state, TEXT)}embeddings.word_embeddings.weight"
        tied = {f"{TEXT}cls.predictions.decoder.weight": word,
                f"{TEXT}cls.predictions.decoder.bias": f"{TEXT}cls.predictions.bias"}
        if key in tied and self.s.mlm:
            _equal_or_fail(state, key, tied[key], "our MLM decoder is tied to them")
            return "tied MLM decoder"
        if key.startswith(VISION) and SWIN_BUFFERS.search(key):
            return "Swin index / mask buffers"
        if key.startswith(TEXT) and TEXT_BUFFERS.search(key):
            return "BERT index buffers"
        if re.fullmatch(r"(vision|text)_proj\.0\.num_batches_tracked", key):
            return "batch-norm counters"
        return None


def check_keys(layout: Layout, where: str) -> Counter:
    """Refuses missing and unexpected keys; the skipped ones counted by reason."""
    state = layout.state
    missing = sorted(layout.needed - state.keys())
    if missing:
        raise ConvertError(f"{where}: {len(missing)} required keys missing: {listed(missing)}")
    reasons = {key: layout.left_out(key) for key in sorted(state.keys() - layout.needed)}
    unexpected = [key for key, reason in reasons.items() if reason is None]
    if unexpected:
        raise ConvertError(f"{where}: {len(unexpected)} unexpected keys (no place in system uit's UIT): "
                           f"{listed(unexpected)}")
    return Counter(reasons.values())


def _summary(skipped: Counter) -> None:
    if skipped:
        print(f"ignored {sum(skipped.values())} keys: " + ", ".join(f"{n} {why}" for why, n in skipped.items()))


def import_uit(src: str | Path, out: str | Path, *, vocab: str | Path | None = None,
               heads: int | None = None) -> Path:
    """A CMP / UIT checkpoint at SRC -> a complete system-uit checkpoint at OUT (nothing at OUT on failure).
    `vocab`: the BERT vocab.txt (or tokenizer.json) stored as the tokenizer; `heads`: the BERT's attention heads
    (default width / 64)."""
    src, out = Path(src), Path(out)
    if out.exists():
        raise ConvertError(f"{out} already exists; choose a new output folder")
    if heads is not None and heads <= 0:
        raise ConvertError(f"--heads must be positive, got {heads}")
    state, saved = read_checkpoint(src)
    try:
        sizes, image_from = infer_sizes(state, saved, heads, str(src))
    except ConvertError as e:
        raise ConvertError(f"{src}: {e}") from None
    t = sizes.text
    config = build_config(sizes.swin, t, sizes.embed_dim, saved, chunks=sizes.chunks, mlm=sizes.mlm, mim=sizes.mim,
                          itm_hidden=0 if sizes.itm_hidden == 2 * t.width else sizes.itm_hidden)
    tokenizer = wordpiece_vocab(vocab, config.model.text.context_length, t.vocab_size, str(src))
    _, abstract = abstract_model(config)
    layout = Layout(state, sizes)
    skipped = check_keys(layout, str(src))
    params = fit(layout.flat, abstract, str(src))
    meta = {"config": to_dict(config), "converted_from": {"path": str(src.absolute()), "format": "cmp"}}
    if tokenizer is not None:
        meta["tokenizer"] = tokenizer.to_spec()
    _summary(skipped)
    print(f"image size {sizes.swin.image_size} from {image_from}; model.name {config.model.name}")
    if tokenizer is None:
        print("no --vocab: the checkpoint holds no tokenizer, which jaxretrieval.load and evaluate need (training "
              "reads data.root/data.tokenizer)")
    return write_model(out, params, meta)


# ---- import_swin ---------------------------------------------------------------------------------------------------
def read_swin(path: Path) -> dict[str, np.ndarray]:
    """A Swin state dict: .safetensors, or a torch.save file holding it bare or under 'model' / 'state_dict'."""
    if path.suffix == ".safetensors":
        return load_tensors(path)[0]
    return load_wrapped_state(path)[0]


def _prune(template: Any, keep: set[str]) -> Any:
    """The template's leaves whose per-layer-free path is in `keep` (a set of our stacked paths)."""
    if isinstance(template, dict):
        out = {}
        for key, value in template.items():
            sub = {k[len(str(key)) + 1:] for k in keep if k.startswith(f"{key}/")}
            if str(key) in keep:
                out[key] = value
            elif sub:
                out[key] = _prune(value, sub)
        return out
    return template


def _stacked(name: str) -> str:
    """Our per-layer path with the layer index taken out (`text/layers/3/x` -> `text/layers/x`)."""
    return re.sub(r"/(layers|blocks)/\d+/", r"/\1/", name)


def _bert_part(folder: Path, fusion_from: int | None, swin_width: int) -> tuple[BertSizes, bool, dict, Counter]:
    """(sizes with our fusion split, MLM head present, flat {our path: array}, skipped keys) of a HF BERT folder."""
    if not (folder / "config.json").is_file():
        raise ConvertError(f"--bert {folder} is not a Hugging Face BERT folder: config.json is missing")
    config, state = read_hf_bert(folder)
    prefix = "bert." if any(k.startswith("bert.") for k in state) else ""
    try:
        plain = sizes_from_hf(config, state, prefix)
    except (KeyError, TypeError, ValueError) as e:
        raise ConvertError(f"--bert {folder}: config.json lacks or garbles {e}") from None
    if plain.fusion_from != plain.layers:
        raise ConvertError(f"--bert {folder} already has cross-attention layers (a fusion BERT): convert the whole "
                           f"model instead")
    if fusion_from is None:
        fusion_from = config.get("fusion_layer", UITSettings().fusion_from)
    if not isinstance(fusion_from, int) or not 0 <= fusion_from <= plain.layers:
        raise ConvertError(f"fusion from layer {fusion_from}: the BERT has {plain.layers} layers")
    mlm = "cls.predictions.bias" in state
    plain = dataclasses.replace(plain, pooler=False)
    flat = {}
    for key, value in flat_from_hf(state, plain, prefix, mlm).items():  # every layer as a text layer, then moved
        if layer := re.match(r"text/layers/(\d+)/(.*)", key):
            i, rest = int(layer.group(1)), layer.group(2)
            key = f"text/layers/{i}/{rest}" if i < fusion_from else f"fusion/layers/{i - fusion_from}/cross/{rest}"
        flat[_text_path(key)] = value
    read = {theirs for _, theirs, _ in name_pairs(plain, prefix, mlm)}
    skipped: Counter = Counter()
    unexpected = []
    for key in sorted(state.keys() - read):
        if TEXT_BUFFERS.search(key):
            skipped["BERT index buffers"] += 1
        elif ".pooler." in f".{key}":
            skipped["pooler"] += 1
        elif key.startswith("cls.seq_relationship."):
            skipped["NSP head"] += 1
        elif key.startswith("cls.predictions.decoder."):
            skipped["MLM decoder (tied to the word embeddings on load)"] += 1
        else:
            unexpected.append(key)
    if unexpected:
        raise ConvertError(f"--bert {folder}: {len(unexpected)} unexpected keys: {listed(unexpected)}")
    sizes = dataclasses.replace(plain, fusion_from=fusion_from, encoder_width=swin_width)
    return sizes, mlm, flat, skipped


def import_swin(src: str | Path, out: str | Path, *, bert: str | Path | None = None,
                vocab: str | Path | None = None, fusion_from: int | None = None) -> Path:
    """The original UIT's initial weights -> a partial system-uit checkpoint at OUT for train.init_from (nothing at
    OUT on failure): a Microsoft or timm Swin at SRC, and with `bert` a Hugging Face BERT folder (its layers from
    `fusion_from` on, default the folder's config.json `fusion_layer` or 6, become our fusion layers, whose
    cross-attention stays fresh). `vocab` (default: the BERT folder's vocab.txt) is stored as the tokenizer
    (data.tokenizer: checkpoint reads it)."""
    src, out = Path(src), Path(out)
    if out.exists():
        raise ConvertError(f"{out} already exists; choose a new output folder")
    state = read_swin(src)
    if any(k.startswith((VISION, TEXT)) for k in state):
        raise ConvertError(f"{src} is a whole CMP / UIT checkpoint (vision_encoder.*, text_encoder.*): convert it "
                           f"with `python -m convert uit`")
    try:
        swin, image_from = swin_sizes(state, {}, str(src))
    except ConvertError as e:
        raise ConvertError(f"{src}: {e}") from None
    names = set(swin_names(swin))
    missing = sorted(names - state.keys())
    if missing:
        raise ConvertError(f"{src}: {len(missing)} required keys missing: {listed(missing)}")
    skipped = Counter("Swin index / mask buffers" if SWIN_BUFFERS.search(k) else "classifier (head.*)"
                      for k in state.keys() - names if SWIN_BUFFERS.search(k) or k.startswith("head."))
    unexpected = sorted(k for k in state.keys() - names if not SWIN_BUFFERS.search(k) and not k.startswith("head."))
    if unexpected:
        raise ConvertError(f"{src}: {len(unexpected)} unexpected keys (no place in a Swin of these sizes): "
                           f"{listed(unexpected)}")
    flat = {f"vision/{k}": v for k, v in swin_flat(state, swin, str(src)).items()}
    text, mlm = None, False
    if bert is not None:
        folder = Path(bert)
        text, mlm, text_flat, text_skipped = _bert_part(folder, fusion_from, swin.width)
        flat.update(text_flat)
        skipped.update(text_skipped)
        if vocab is None and (folder / "vocab.txt").is_file():
            vocab = folder / "vocab.txt"
    elif fusion_from is not None:
        raise ConvertError("--fusion-from places a BERT's layers: it needs --bert")
    config = build_config(swin, text, source="converted Swin / BERT sizes", mlm=mlm)
    context = min(CONTEXT_LENGTH, text.max_positions if text else CONTEXT_LENGTH)
    tokenizer = wordpiece_vocab(vocab, context, config.model.text.vocab_size, str(bert or src))
    _, abstract = abstract_model(config)
    template = _prune(abstract, {_stacked(k) for k in flat})
    params = fit(flat, template, str(src))
    meta = {"partial": True, "component": "uit", "swin": {**dataclasses.asdict(swin), "depths": list(swin.depths),
                                                          "heads": list(swin.heads)},
            "bert": None if text is None else dataclasses.asdict(text), "mlm": mlm,
            "converted_from": {"path": str(src.absolute()), "format": "ms_swin" if swin.microsoft else "timm_swin",
                               **({"bert": str(Path(bert).absolute())} if bert is not None else {})}}
    if tokenizer is not None:
        meta["tokenizer"] = tokenizer.to_spec()
    _summary(skipped)
    fresh = "the fusion layers' cross-attention, " if text is not None else "the BERT, "
    print(f"a partial checkpoint for train.init_from: {fresh}the projections, ITM head"
          f"{'' if mlm else ', MLM head'} and SimMIM's mask token and decoder start fresh; Swin image size "
          f"{swin.image_size} from "
          f"{image_from} (the tables are per window: any input size of the same window loads them)")
    if tokenizer is None:
        print("no tokenizer stored (no --vocab and no vocab.txt beside the BERT): data.tokenizer: checkpoint cannot "
              "read one from this checkpoint")
    return write_model(out, params, meta)


__all__ = ["SwinSizes", "UITSizes", "build_config", "import_swin", "import_uit", "infer_sizes", "swin_sizes"]
