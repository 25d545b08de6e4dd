"""Typed configuration: one YAML file holds every knob, `key.path=value` overrides on the command line.

Loading order: dataclass defaults <- model preset (`model.name`) <- the file <- overrides. Every key is
checked against the dataclasses; an unknown or misspelt key is an error naming it, where it came from, and
the nearest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from jaxretrieval.errors import ConfigError
from jaxretrieval.models.presets import MODEL_PRESETS

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ImageTowerConfig:
    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    remat: str = "none"  # none, full or dots (see models/layers.py REMAT_POLICIES)


@dataclasses.dataclass
class TextTowerConfig:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    remat: str = "none"


@dataclasses.dataclass
class MultiwayConfig:
    """BEiT-3's one encoder for both modalities (model.family=beit3), with per-modality experts in each layer.

    model.image gives the image and patch size, model.text the context length and vocabulary."""

    layers: int = 12
    width: int = 768
    heads: int = 12
    ffn_dim: int = 3072
    max_text_positions: int = 1024  # rows of the text position table, the first 2 unused (fairseq offset)
    pad_id: int = 1  # XLM-R's <pad>; text positions holding it are masked out of attention
    remat: str = "none"  # none, full or dots, as for the CLIP towers


@dataclasses.dataclass
class ResNetConfig:
    """The CNN backbone of model.family=ctl (Centroids-ReID): torchvision's ResNet layout, NHWC."""

    layers: tuple[int, ...] = (3, 4, 6, 3)  # bottleneck blocks per stage (ResNet-50)
    width: int = 64  # stem channels; features = 32 x width (2048)
    last_stride: int = 1  # 1 keeps layer 4 at layer 3's resolution (re-id); 2 is ImageNet's
    stem_relu: bool | None = None  # None: as the original, ReLU after the stem with IBN-a only
    ibn: bool = False  # ResNet-50-IBN-a: InstanceNorm on half the channels of each block's first norm, layers 1-3


@dataclasses.dataclass
class ModelConfig:
    name: str = "vit_b32"
    # clip: two towers (model.image, model.text); beit3: one multiway encoder; ctl: a ResNet re-id model
    family: str = "clip"
    embed_dim: int = 512
    activation: str = "quick_gelu"  # quick_gelu (OpenAI CLIP) or gelu
    init_logit_scale: float = 2.659260036932778  # log(1 / 0.07)
    max_logit_scale: float = 4.6052  # log(100), the clamp CLIP applies
    # Set (SigLIP: init_logit_scale 2.3026 = log 10, init_logit_bias -10) for train.loss=sigmoid: a learnable logit
    # bias; null: none (InfoNCE).
    init_logit_bias: float | None = None
    image: ImageTowerConfig = dataclasses.field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = dataclasses.field(default_factory=TextTowerConfig)
    multiway: MultiwayConfig = dataclasses.field(default_factory=MultiwayConfig)
    drop_path: float = 0.0  # stochastic depth of the last layer, rising linearly from 0 (beit3)
    resnet: ResNetConfig = dataclasses.field(default_factory=ResNetConfig)
    num_classes: int = 0  # ctl: identities of the classifier and center loss; 0 = those of the training split
    # Transformer towers hold their layers stacked (parameters with a leading layer axis) and run them as one
    # scanned layer: init and compile time independent of depth. false: one module per layer (the same numbers;
    # checkpoints of either layout load into both).
    scan_layers: bool = True
    # Layers per iteration of the scanned loop; the depth (or more) unrolls it: on CPU the step then runs about as
    # fast as one module per layer (~10% faster than 1) at about twice the compile time of 1.
    scan_unroll: int = 1
    # Attention kernel: auto takes cuDNN's fused attention on a GPU with bf16 compute (head dims multiple of 8, up
    # to 128), XLA's elsewhere; xla or cudnn force one (cudnn where it cannot apply is an error).
    attention: str = "auto"


@dataclasses.dataclass
class DataConfig:
    # jsonl: annotation files of {"image", "caption", "image_id"} lines; albef: ALBEF / CUSA JSON arrays of
    # {"image_path", "caption", "image_id"}, captions cleaned to max_words words; demo: generated captions. Re-id:
    # market1501, dukemtmc (folders), street2shop (COCO JSON, train_file), reid_demo (generated). Text-person:
    # cuhk-pedes, icfg-pedes, rstpreid (root: the folder of reid_raw.json / ICFG-PEDES.json / data_captions.json and
    # imgs/; captions cut to max_words words), pedes_demo (generated, in CUHK-PEDES's layout). csv (open_clip's CSV/TSV)
    # and karpathy (dataset_coco.json / dataset_flickr30k.json), see below; webdataset: img2dataset's tar shards,
    # train_file / test_file a shard pattern under root (shards/{00000..00099}.tar, :: lists, globs); tfds: a prepared
    # TFDS dataset (see tfds_* below). precomp: SCAN / BUTD region features ({split}_ims.npy, {split}_caps.txt under
    # root; train_file / test_file name the splits: train, test, testall), precomp_demo (generated, data/precomp.py).
    kind: str = "jsonl"
    root: str = ""  # annotation paths and image paths are relative to this folder
    train_file: str = "train.jsonl"  # or a glob pattern (PAB: annotation/train/pair_*.json), files read sorted
    test_file: str = "test.jsonl"
    # Under root: a word vocabulary file, or CLIP BPE merges (*.gz); or "checkpoint": the tokenizer saved
    # with train.init_from.
    tokenizer: str = "vocab.txt"
    # auto: by the file name above (a word list, CLIP BPE *.gz, SentencePiece *.spm/*.model); wordpiece: BERT's
    # WordPiece from a vocab.txt, a tokenizer.json or a folder holding one (bert-base-uncased's lower-casing).
    tokenizer_kind: str = "auto"
    max_words: int = 64  # albef: captions cut to this many words after cleaning
    # csv: open_clip's CSV / TSV (header row; --csv-img-key, --csv-caption-key, --csv-separator); a caption's group is
    # its image path unless csv_group_key names a column.
    csv_img_key: str = "filepath"
    csv_caption_key: str = "title"
    csv_group_key: str = ""
    csv_separator: str = "\t"
    # karpathy: Karpathy's dataset_coco.json / dataset_flickr30k.json as train_file and test_file; train takes restval
    # too (COCO's 113,287 images); the evaluation split is karpathy_eval_split (test: COCO 5K, Flickr30K 1K); captions
    # raw or tokens (joined); images under data.root / karpathy_image_dir / filepath / filename.
    karpathy_restval: bool = True
    karpathy_eval_split: str = "test"
    karpathy_captions: str = "raw"
    karpathy_image_dir: str = ""
    # tfds: a prepared TFDS dataset in ArrayRecord files under root (the TFDS data_dir): tfds_name (`coco_captions`,
    # `name:1.0.0`; empty: root is the version folder holding dataset_info.json), the two splits (slices allowed:
    # `train[:90%]`), and the features to read: the encoded image, the caption (a Text or a sequence of them; `a/b`
    # names a nested feature) and the group id (empty: every example is its own group).
    tfds_name: str = ""
    tfds_train_split: str = "train"
    tfds_test_split: str = "test"
    tfds_image_key: str = "image"
    tfds_caption_key: str = "caption"
    tfds_id_key: str = ""
    workers: int = 0  # grain worker processes; 0 decodes in the training process
    # JPEGs decode at 1/2, 1/4 or 1/8 scale where the result still covers the model input (PIL draft mode; training
    # and evaluation): several times faster on photos, pixels close to but not equal to a full decode.
    jpeg_draft: bool = False
    # Training batches carry uint8 pixels, normalised by the train step on the device: a quarter of the host work
    # and transfer of float32 (the same values, computed there).
    normalise_on_device: bool = False
    skip_bad_records: bool = False  # False: a bad image or line is an error; True: skipped and counted
    mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    flip: bool = False
    resize: str = "crop"  # crop: short side to size, centre crop (CLIP); squash: straight to size x size (BEiT-3)
    # LHP's hybrid views for training: per sample x ~ N(0.5, 1/6); x > 0.5 a local RandomResizedCrop with area
    # scale in local_scale, else the global (squash) resize.
    hybrid_views: bool = False
    local_scale: tuple[float, float] = (0.5, 1.0)
    # Re-id: input (height, width); identity-balanced batches of batch_size / num_instances identities x
    # num_instances images; pad + random crop, random erasing probability.
    input_size: tuple[int, int] = (256, 128)
    num_instances: int = 4
    padding: int = 10
    random_erasing: float = 0.5
    demo_seed: int = 0
    demo_num_train: int = 4000
    demo_num_test: int = 200


@dataclasses.dataclass
class TrainConfig:
    batch_size: int = 256  # global, over all processes and devices
    steps: int = 1000
    epochs: float = 0.0  # > 0: steps = epochs x (training records // batch_size), as unilm counts them
    lr: float = 5e-4
    end_lr: float = 0.0
    warmup_steps: int = 100
    weight_decay: float = 0.2
    # Regexes over "/"-joined parameter paths kept out of weight decay, besides every vector and scalar.
    no_decay: list[str] = dataclasses.field(default_factory=list)
    decay_vectors: bool = False  # adamw: decay biases and norm gains too (torch's AdamW as VSE-infinity uses it)
    layer_decay: float = 1.0  # < 1: layer-wise lr decay, lr x decay^(depth from the top) (beit3)
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-6
    grad_clip: float = 1.0  # global norm; 0 disables
    # > 1: the batch goes through the model in this many micro-batches. accumulation "cache": gradient caching,
    # exactly the full-batch contrastive gradient; "mean": the mean of each micro-batch's own loss (unilm's
    # --update_freq).
    micro_batches: int = 1
    accumulation: str = "cache"
    # One of the system's losses; "" is its first (see `python -m jaxretrieval.systems`). clip / beit3: contrastive
    # (symmetric InfoNCE) or sigmoid (SigLIP's pairwise loss, needs model.init_logit_bias). Variant: local (the
    # full-batch formula on global arrays; XLA partitions it), gathered (each device its rows against the
    # all-gathered columns) or ring (column blocks passed around the devices; no device holds the N x N logits).
    loss: str = ""
    loss_variant: str = "local"
    # adamw (decoupled decay on matrices) or adam (torch.optim.Adam: L2 weight_decay added to every gradient).
    optimizer: str = "adamw"
    # cosine: warmup_steps linear, then cosine to end_lr; multistep (with epochs): lr x min(1, (epoch + 1) /
    # warmup_epochs), x gamma at each of the milestones (epochs), as Centroids-ReID; xvlm_step: X-VLM's / UIT's
    # 'step' (warmup_steps linear, then linear to 0 at steps, times 1 / 0.5 / 0.2 from 4 and 7 x warmup_steps).
    schedule: str = "cosine"
    warmup_epochs: int = 0
    milestones: list[int] = dataclasses.field(default_factory=list)
    gamma: float = 0.1
    precision: str = "fp32"  # fp32, or bf16: bf16 compute with fp32 parameters and optimizer state
    seed: int = 0
    init_from: str = ""  # a model checkpoint (converted or trained) to start from when DIR has none
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    progress_bar: bool = True
    # XLA's persistent compilation cache, so a resumed or repeated run does not compile again: auto keeps it in
    # .jax_cache beside the workdir (shared by the runs in that folder), or a folder, or off (false). The
    # environment's JAX_COMPILATION_CACHE_DIR, where set, wins.
    compilation_cache: str | bool = "auto"


@dataclasses.dataclass
class MeshConfig:
    # Logical axes, named once. -1 takes the devices left over. Batches are split over (data, fsdp).
    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass
class DistributedConfig:
    # auto: start jax.distributed when JAX_COORDINATOR_ADDRESS is set (the SLURM and local launchers set it);
    # always: start it regardless (Cloud TPU pods, where jax finds every setting itself); never.
    initialize: str = "auto"
    coordinator_address: str = ""  # host:port of process 0; default JAX_COORDINATOR_ADDRESS
    num_processes: int = 0  # default JAX_NUM_PROCESSES, else jax's cluster detection
    process_id: int = -1  # default JAX_PROCESS_ID, else jax's cluster detection


@dataclasses.dataclass
class EvalConfig:
    batch_size: int = 256
    split: str = "test"
    # One of the system's protocols; "" is its first. image_text: recall both ways (i2t_R*, t2i_R*, rsum);
    # text_to_image: captions rank the gallery images, the images of the caption's image_id relevant (R1 R5 R10 mAP
    # mINP, the PAB / text-to-person protocol); reid (system ctl): query x gallery splits, the Market protocol.
    protocol: str = ""
    # image_text: > 1 also reports the metrics averaged over this many folds of consecutive gallery images, keys
    # prefixed 1k_ (COCO's 1K protocol: 5 folds of the 5K test images).
    folds: int = 1
    # False: a gallery or query image that cannot be read is an error naming it; True: skipped, counted in the
    # metrics as `skipped` and named in the log.
    skip_bad_records: bool = False
    # Two-stage text_to_image evaluation (systems with a cross-encoder, e.g. cfack): each caption's top rerank_k
    # images by the contrastive score are re-scored by the ITM head, metrics reported before (R1 ...) and after
    # (rerank_R1 ...). 0: off. rerank_combine: replace (the ITM logit alone, X2-VLM / CFACK) or add (ITM + the
    # contrastive score, BLIP-2); rerank_fill: what the other images of the row get: a number (X2-VLM: -100),
    # row_min (PAB) or keep (their contrastive scores). rerank_batch: pairs per cross-encoder call.
    rerank_k: int = 0
    rerank_combine: str = "replace"
    rerank_fill: Any = -100.0
    rerank_batch: int = 256


@dataclasses.dataclass
class CheckpointConfig:
    # What a run does when the newest checkpoint in its workdir fails verification (damaged or half-copied files):
    # fallback: warn naming its step and path, set it aside and resume from the newest intact one; error: stop.
    on_corrupt: str = "fallback"


@dataclasses.dataclass
class Config:
    # The system (jaxretrieval/systems/) that trains and evaluates the model: its model, loss, data fields and
    # evaluation. "" is the one named like model.family. Its own settings are a top-level section of its name
    # (e.g. `cusa:`), held in `section`.
    system: str = ""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    # Partition rules for parameters and optimizer state: a list of [regex over "/"-joined parameter paths,
    # spec], the spec a list of mesh axis names or null per dimension, or "fsdp" (the largest dimension that
    # divides by mesh.fsdp). The first match wins; parameters that match nothing are replicated. Or the name of
    # a rule set (jaxretrieval.sharding.RULE_SETS): replicated, fsdp, fsdp_tensor.
    sharding: list[list[Any]] | str = dataclasses.field(default_factory=list)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    section: Any = None  # the system's own settings (its `Section` dataclass), read from the key of its name


_TOP_LEVEL = {f.name for f in dataclasses.fields(Config)}

# Names users bring from other trainers, pointed at ours in "did you mean" hints.
ALIASES = {"learning_rate": "lr", "warmup": "warmup_steps", "epochs": "steps", "num_workers": "workers",
           "clip_grad": "grad_clip", "max_grad_norm": "grad_clip", "wd": "weight_decay",
           "drop_path_rate": "drop_path", "lr_decay": "layer_decay", "input_size": "image_size",
           "update_freq": "micro_batches", "grad_accum": "micro_batches", "accum_freq": "micro_batches"}


def _nearest(key: str, names: list[str]) -> str | None:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    if close:
        return close[0]
    aliases = [alias for alias, name in ALIASES.items() if name in names]
    close = difflib.get_close_matches(key, aliases, n=1, cutoff=0.7)
    return ALIASES[close[0]] if close else None


# Besides YAMLError, PyYAML's scalar constructors let Python's own errors out for malformed scalars: `0x_`,
# `!!int abc`, dates such as `2020-13-45` (ValueError), `!!bool x` (KeyError), `!!int ''` (IndexError),
# `!!timestamp x` (AttributeError), out-of-range dates (OverflowError); deep nesting is a RecursionError.
_YAML_ERRORS = (yaml.YAMLError, ValueError, KeyError, IndexError, AttributeError, OverflowError, RecursionError)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            if value is None and option is type(None):
                return None
            try:
                return _coerce(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} is not a {tp}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:  # a fixed length, e.g. (height, width)
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
            return tuple(_coerce(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, args, strict=True)))
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"{where}: {value} is too large for a float") from None
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def _build(cls: type, raw: dict[str, Any], where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = _nearest(str(key), names)
            hint = f"; did you mean '{(where + '.') if where else ''}{close}'?" if close else ""
            raise ConfigError(f"unknown config key '{path}'{hint} (valid here: {', '.join(names)})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, path)
        else:
            kwargs[key] = _coerce(value, tp, path)
    return cls(**kwargs)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _parse_override(text: str) -> dict[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.path=value")
    path, value = text.split("=", 1)
    try:
        parsed = yaml.safe_load(value) if value else ""
    except _YAML_ERRORS:  # not a YAML value: the text itself
        parsed = value
    node: dict[str, Any] = {}
    cursor = node
    keys = path.strip().split(".")
    for key in keys[:-1]:
        cursor = cursor.setdefault(key, {})
    cursor[keys[-1]] = parsed
    return node


def _move_keys(raw: dict[str, Any], moved: dict[str, str]) -> tuple[dict[str, Any], list[str]]:
    """Old dotted keys that a system took into its own section read as their new keys; (raw, the old keys found)."""
    found = []
    for old, new in moved.items():
        section, key = old.split(".")
        if not isinstance(raw.get(section), dict) or key not in raw[section]:
            continue
        raw = {**raw, section: dict(raw[section])}
        value = raw[section].pop(key)
        new_section, new_key = new.split(".")
        target = raw.setdefault(new_section, {})
        if isinstance(target, dict) and new_key not in target:  # the new key wins where both are given
            raw[new_section] = {**target, new_key: value}
        found.append(old)
    return raw, found


def from_dict(raw: dict[str, Any], source: str = "config", *, notices: bool = True) -> Config:
    """Validates a raw nested dict (file contents merged with overrides) into a Config. `notices`: say which old keys
    were read under their new names (not for a checkpoint's saved config, which nobody edits)."""
    from jaxretrieval.systems import SYSTEMS, get_system

    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    raw = dict(raw)
    model = raw.get("model") or {}
    if not isinstance(model, dict):
        raise ConfigError(f"{source}: model: expected a mapping, got {model!r}")
    name = model.get("name", ModelConfig.name)
    if not isinstance(name, str) or name not in MODEL_PRESETS:
        close = difflib.get_close_matches(str(name), list(MODEL_PRESETS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{source}: unknown model.name '{name}'{hint} (presets: {', '.join(MODEL_PRESETS)})")
    raw["model"] = _merge(MODEL_PRESETS[name], model)
    system_name = _system_name(raw)
    if not isinstance(system_name, str):
        raise ConfigError(f"{source}: system: expected the name of a system, got {system_name!r}")
    try:
        system = get_system(system_name)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    raw, moved = _move_keys(raw, system.moved_keys)
    if notices:
        _notice_moved(source, system.name, system.moved_keys, moved)
    section = raw.pop(system.name, None)
    for other in SYSTEMS:
        if other in raw and other not in _TOP_LEVEL:
            raise ConfigError(f"{source}: '{other}:' holds the settings of system {other}, but this config's system "
                              f"is {system.name} (set system: {other} to use it)")
    if "section" in raw:
        raise ConfigError(f"{source}: unknown config key 'section' (a system's settings go under its name)")
    try:
        config = _build(Config, raw, "")
        settings = _build(system.Section, section or {}, system.name) if system.Section else None
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    if section is not None and system.Section is None:
        raise ConfigError(f"{source}: system {system.name} has no settings of its own; remove '{system.name}:'")
    config = dataclasses.replace(
        config, system=system.name, section=settings,
        train=dataclasses.replace(config.train, loss=config.train.loss or system.losses[0]),
        eval=dataclasses.replace(config.eval, protocol=config.eval.protocol or system.protocols[0]))
    from jaxretrieval.config_checks import validate

    validate(config, source)
    return config


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), *,
                base: dict[str, Any] | None = None, source: str = "defaults", notices: bool = True) -> Config:
    """Reads a YAML config file (or starts from `base`) and applies `key.path=value` overrides."""
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            line = Path(path).read_bytes()[: e.start].count(b"\n") + 1
            raise ConfigError(f"{path}:{line}: not valid UTF-8 text") from None
        try:
            loaded = yaml.safe_load(text)
            loaded = {} if loaded is None else loaded  # an empty file; `0`, `false` or `[]` are refused below
        except _YAML_ERRORS as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
    layers = [dict(base or {}), loaded if path is not None else {}, *map(_parse_override, overrides)]
    if overrides:
        source = f"{source} with overrides {' '.join(overrides)}"
    raw = _merge_all(layers)
    moved = _moved_keys_of(raw)
    if moved:  # each layer read in the new names before merging, so a later layer wins whichever names it uses
        renamed = [_move_keys(layer, moved) for layer in layers]
        raw = _merge_all([layer for layer, _ in renamed])
        if notices:
            _notice_moved(source, _system_name(raw), moved, [key for _, found in renamed for key in found])
    return from_dict(raw, source, notices=notices)


def _notice_moved(source: str, system: str, moved: dict[str, str], found: list[str]) -> None:
    """One line naming the old keys a config used and their new names in the system's section."""
    found = list(dict.fromkeys(found))
    if found:
        log.warning("%s: %s moved to %s's own section (%s); the old keys still work", source, ", ".join(found),
                    system, ", ".join(moved[key] for key in found))


def _merge_all(layers: list[dict[str, Any]]) -> dict[str, Any]:
    raw: dict[str, Any] = {}
    for layer in layers:
        raw = _merge(raw, layer)
    return raw


def _system_name(raw: dict[str, Any]) -> str:
    """The system a raw config names: `system`, else model.family (from the file or the model.name preset)."""
    model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
    preset = MODEL_PRESETS.get(model.get("name", ModelConfig.name), {}) if isinstance(model.get("name", ""), str) \
        else {}
    return raw.get("system") or model.get("family") or preset.get("family") or ModelConfig.family


def _moved_keys_of(raw: dict[str, Any]) -> dict[str, str]:
    from jaxretrieval.systems import SYSTEMS, get_system

    name = _system_name(raw)
    return get_system(name).moved_keys if isinstance(name, str) and name in SYSTEMS else {}


def to_dict(config: Config) -> dict[str, Any]:
    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    section = config.section
    out = plain(dataclasses.asdict(dataclasses.replace(config, section=None)))
    del out["section"]
    if section is not None:
        out[config.system] = plain(dataclasses.asdict(section))
    return out


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
