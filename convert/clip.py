"""CLIP checkpoints in and out: OpenAI TorchScript or state-dict `.pt`, open_clip (`.bin`/`.pt`/`.safetensors`
with its model config JSON) and Hugging Face `CLIPModel` folders, to and from jaxretrieval checkpoints."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import shutil
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np

from convert import ConvertError
from convert.clip_configs import (
    Settings,
    config_kind,
    hf_config,
    hf_preprocessor_config,
    hf_settings,
    open_clip_config,
    open_clip_settings,
    openai_settings,
)
from convert.clip_layout import LAYOUTS, infer_sizes, to_ours, to_theirs
from convert.sources import INSTALL_EXTRA, load_hf_weights, load_tensors, read_json, save_safetensors
from jaxretrieval.checkpoint import read_meta_at, write_model
from jaxretrieval.config import Config, ModelConfig, from_dict, to_dict
from jaxretrieval.data.clip_bpe import ClipTokenizer
from jaxretrieval.errors import MissingPackageError, require
from jaxretrieval.evaluate import restore_params, saved_config
from jaxretrieval.models import MODEL_PRESETS, abstract_model
from jaxretrieval.models.stacking import relayout
from jaxretrieval.sharding import make_mesh, path_name

FORMATS = ("openai", "open_clip", "hf")
EXPORT_FORMATS = ("open_clip", "hf")
CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
OPEN_CLIP_EXTRA = "bench"  # pyproject's extra with open_clip_torch


@dataclasses.dataclass
class Source:
    format: str  # openai | open_clip | hf
    state: dict[str, np.ndarray]
    config: dict[str, Any] | None = None  # the release's config JSON
    preprocessor: dict[str, Any] = dataclasses.field(default_factory=dict)  # HF preprocessor_config.json
    config_path: Path | None = None


def _beside(path: Path, names: tuple[str, ...]) -> Path | None:
    return next((path / name for name in names if (path / name).is_file()), None)


def _open_folder(src: Path, fmt: str | None, config_path: Path | None) -> Source:
    open_clip_json, hf_json = src / "open_clip_config.json", src / "config.json"
    if fmt in (None, "open_clip") and open_clip_json.is_file():
        weights = _beside(src, ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"))
        if weights is None:
            raise ConvertError(f"{src} has open_clip_config.json but no open_clip_model.safetensors or "
                               f"open_clip_pytorch_model.bin")
        config_path = config_path or open_clip_json
        return Source("open_clip", load_tensors(weights)[0], read_json(config_path), config_path=config_path)
    if fmt in (None, "hf") and hf_json.is_file():
        config_path = config_path or hf_json
        preprocessor = src / "preprocessor_config.json"
        return Source("hf", load_hf_weights(src), read_json(config_path),
                      read_json(preprocessor) if preprocessor.is_file() else {}, config_path)
    wanted = {None: "config.json (Hugging Face) or open_clip_config.json", "hf": "config.json",
              "open_clip": "open_clip_config.json", "openai": "a .pt file, not a folder"}[fmt]
    raise ConvertError(f"cannot convert folder {src}: expected {wanted}")


def open_source(src: Path, fmt: str | None, config_path: Path | None) -> Source:
    """Reads the weights and the config JSON that goes with them, telling the format when not given."""
    if fmt is not None and fmt not in FORMATS:
        raise ConvertError(f"unknown format '{fmt}' (known: {', '.join(FORMATS)})")
    if not src.exists():
        raise ConvertError(f"{src} does not exist")
    if src.is_dir():
        return _open_folder(src, fmt, config_path)
    state, stored = load_tensors(src)
    found = config_path or _beside(src.parent, ("open_clip_config.json", "config.json"))
    raw = read_json(found) if found else None
    kind = config_kind(raw) if raw is not None else None
    if config_path is not None and kind is None:
        raise ConvertError(f"{config_path} is neither an open_clip model config nor a Hugging Face CLIP config")
    if fmt is None:
        if stored == "torchscript":
            fmt = "openai"
        elif any(key.startswith("visual.") for key in state):
            fmt = "open_clip" if kind == "open_clip" else "openai"
        elif any(key.startswith("vision_model.") for key in state):
            fmt = "hf"
        else:
            sample = ", ".join(sorted(state)[:3])
            raise ConvertError(f"cannot tell the format of {src}: its keys ({sample}, ...) follow neither the "
                               f"OpenAI/open_clip layout (visual.*) nor Hugging Face's (vision_model.*); pass --format")
    wanted = {"openai": None, "open_clip": "open_clip", "hf": "hf"}[fmt]
    if config_path is not None and kind != wanted:
        raise ConvertError(f"{config_path} is a {kind} config, which does not go with {fmt} weights")
    if wanted is None:
        return Source(fmt, state)
    if kind != wanted:
        name = "open_clip_config.json" if fmt == "open_clip" else "config.json"
        raise ConvertError(f"{fmt} weights need their model config: pass --config or put {name} beside {src}")
    assert found is not None and raw is not None
    preprocessor = found.parent / "preprocessor_config.json"
    return Source(fmt, state, raw, read_json(preprocessor) if preprocessor.is_file() else {}, found)


def settings_for(source: Source, sizes: dict[str, Any]) -> Settings:
    where = str(source.config_path)
    if source.format == "open_clip":
        return open_clip_settings(source.config or {}, sizes, where)
    if source.format == "hf":
        return hf_settings(source.config or {}, source.preprocessor, sizes, where)
    return openai_settings(sizes)


def _preset_name(model: dict[str, Any]) -> str:
    for name, values in MODEL_PRESETS.items():
        if name == "custom" or values.get("family", "clip") != "clip":
            continue
        preset = dataclasses.asdict(from_dict({"model": {"name": name}}).model)
        # Compare the sizes convert read; settings it does not write (such as remat) keep their defaults.
        if all(preset[key] == model[key] if not isinstance(model[key], dict) else
               all(preset[key].get(k) == v for k, v in model[key].items()) for key in ("embed_dim", "image", "text")):
            return name
    return "custom"


def build_config(sizes: dict[str, Any], settings: Settings, image_size: int | None = None) -> Config:
    """Every model field given explicitly, under the name of the preset of the same sizes (else "custom")."""
    model = {
        "embed_dim": sizes["embed_dim"],
        "activation": settings.activation,
        "image": {**sizes["image"], "heads": settings.image_heads},
        "text": {**sizes["text"], "heads": settings.text_heads},
    }
    if image_size is not None:
        model["image"]["image_size"] = image_size
    model["name"] = _preset_name(model)
    return from_dict({"model": model, "data": {"mean": list(settings.mean), "std": list(settings.std)}},
                     source="converted CLIP config")


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    return {path_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def resize_positions(table: np.ndarray, grid: int) -> np.ndarray:
    """The image positional embedding (class row + square grid) resampled to grid x grid, class row kept.

    PyTorch's bicubic (a = -0.75) with antialiasing, as open_clip resizes the same table, so both agree.
    """
    import torch
    import torch.nn.functional as F

    old = math.isqrt(table.shape[0] - 1)
    cells = torch.from_numpy(np.ascontiguousarray(table[1:])).reshape(1, old, old, -1).permute(0, 3, 1, 2)
    cells = F.interpolate(cells, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    return np.concatenate([table[:1], cells.permute(0, 2, 3, 1).reshape(grid * grid, -1).numpy()])


def default_bpe_path() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        raise MissingPackageError(f"the CLIP tokenizer needs its BPE merges file: pass --bpe PATH to {CLIP_BPE_FILE}, "
                                  f"or install the 'open_clip' package, which ships it: pip install "
                                  f"'jaxretrieval[{OPEN_CLIP_EXTRA}]'")
    for folder in spec.submodule_search_locations or []:
        if (Path(folder) / CLIP_BPE_FILE).is_file():
            return Path(folder) / CLIP_BPE_FILE
    raise ConvertError(f"no CLIP BPE merges file: pass --bpe PATH to {CLIP_BPE_FILE} (it ships with open_clip)")


def clip_tokenizer(context_length: int, bpe: str | Path | None = None) -> ClipTokenizer:
    """The tokenizer saved with converted CLIPs: CLIP's byte-level BPE from `bpe` or the merges file open_clip
    ships (its spec embeds the merges, so the checkpoint needs neither afterwards)."""
    path = Path(bpe) if bpe is not None else default_bpe_path()
    try:
        return ClipTokenizer.from_file(path, context_length=context_length)
    except (FileNotFoundError, ValueError) as e:
        raise ConvertError(str(e)) from None


def import_clip(src: str | Path, out: str | Path, *, fmt: str | None = None, config: str | Path | None = None,
                image_size: int | None = None, bpe: str | Path | None = None) -> Path:
    """Converts a PyTorch CLIP at SRC into a jaxretrieval checkpoint at OUT (nothing at OUT on failure)."""
    src, out = Path(src), Path(out)
    if out.exists():
        raise ConvertError(f"{out} already exists; choose a new output folder")
    bpe = bpe if bpe is not None else default_bpe_path()  # a missing open_clip is told before reading weights
    source = open_source(src, fmt, Path(config) if config is not None else None)
    layout = LAYOUTS["hf" if source.format == "hf" else "openai"]
    sizes = infer_sizes(layout, source.state)
    settings = settings_for(source, sizes)
    tokenizer = clip_tokenizer(sizes["text"]["context_length"], bpe)
    if tokenizer.vocab_size != sizes["text"]["vocab_size"]:
        warnings.warn(f"the text tower has {sizes['text']['vocab_size']} token ids, the CLIP BPE tokenizer saved "
                      f"with it {tokenizer.vocab_size}", stacklevel=2)
    as_stored = build_config(sizes, settings)
    _, abstract = abstract_model(per_layer(as_stored.model))  # the layouts name each layer
    layers = (sizes["image"]["layers"], sizes["text"]["layers"])
    flat = to_ours(layout, layers, source.state, _flat_shapes(abstract), where=str(src))
    final = as_stored
    if image_size is not None and image_size != sizes["image"]["image_size"]:
        patch = sizes["image"]["patch_size"]
        if image_size <= 0 or image_size % patch:
            raise ConvertError(f"--image-size {image_size} is not a positive multiple of the patch size {patch}")
        flat["visual/positional_embedding"] = resize_positions(flat["visual/positional_embedding"],
                                                               image_size // patch)
        final = build_config(sizes, settings, image_size)
        _, abstract = abstract_model(per_layer(final.model))
    params = jax.tree_util.tree_map_with_path(lambda p, _: flat[path_name(p)], abstract)
    params = relayout(params, abstract_model(final.model)[1])  # stacked, as the model holds its layers
    meta = {"config": to_dict(final), "tokenizer": tokenizer.to_spec(),
            "converted_from": {"path": str(src.absolute()), "format": source.format}}
    return write_model(out, params, meta)


def per_layer(model: ModelConfig) -> ModelConfig:
    """The model with one module per layer, the layout the PyTorch state dicts are mapped from."""
    return dataclasses.replace(model, scan_layers=False)


def check_exportable(meta: dict[str, Any], checkpoint: str | Path) -> None:
    """Only a CLIP that reads CLIP-BPE ids can be exported: open_clip and transformers tokenize with that BPE."""
    family = meta.get("config", {}).get("model", {}).get("family", "clip")
    if family != "clip":
        raise ConvertError(f"checkpoint {checkpoint} is a model.family={family} model; clip-export writes CLIP dual "
                           f"encoders only")
    kind = meta.get("tokenizer", {}).get("kind")
    if kind != ClipTokenizer.kind:
        raise ConvertError(f"checkpoint {checkpoint} was trained with the {kind!r} tokenizer: the CLIP BPE tokenizer "
                           f"of open_clip and Hugging Face would not produce the token ids it was trained on, so the "
                           f"exported model would not work; only a model tokenized with CLIP's BPE (data.tokenizer: "
                           f"{CLIP_BPE_FILE}, or converted from a CLIP release) can be exported")


def export_clip(checkpoint: str | Path, out: str | Path, *, fmt: str) -> Path:
    """Writes one of our checkpoints as open_clip (open_clip_model.safetensors + open_clip_config.json) or a
    Hugging Face CLIPModel folder (model.safetensors + config.json + preprocessor_config.json)."""
    if fmt not in EXPORT_FORMATS:
        raise ConvertError(f"unknown export format '{fmt}' (known: {', '.join(EXPORT_FORMATS)})")
    require("safetensors", INSTALL_EXTRA, "clip-export")
    out = Path(out).absolute()
    if out.exists():
        raise ConvertError(f"{out} already exists; choose a new output folder")
    check_exportable(read_meta_at(checkpoint), checkpoint)
    # Whatever mesh it was trained on, export reads the parameters onto this machine unsharded.
    # One module per layer: the layouts name each layer (a stacked checkpoint is read out layer by layer).
    config = saved_config(checkpoint, ["mesh.data=-1", "mesh.fsdp=1", "mesh.tensor=1", "sharding=[]",
                                       "model.scan_layers=false"])
    _, params, _ = restore_params(config, checkpoint, make_mesh(config.mesh))
    flat = {path_name(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    layers = (config.model.image.layers, config.model.text.layers)
    state = to_theirs(LAYOUTS["openai" if fmt == "open_clip" else "hf"], layers, flat)
    if fmt == "open_clip":
        files = {"open_clip_model.safetensors": state, "open_clip_config.json": open_clip_config(config)}
    else:
        files = {"model.safetensors": state, "config.json": hf_config(config),
                 "preprocessor_config.json": hf_preprocessor_config(config)}
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        for name, content in files.items():
            if name.endswith(".safetensors"):
                save_safetensors(content, staging / name)
            else:
                (staging / name).write_text(json.dumps(content, indent=2) + "\n")
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


__all__ = ["EXPORT_FORMATS", "FORMATS", "clip_tokenizer", "export_clip", "import_clip", "resize_positions"]
