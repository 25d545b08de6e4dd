"""Centroids-ReID checkpoints to jaxretrieval's `CTLModel`, and torchvision / IBN-Net ResNet-50 state dicts to its
backbone (`ResNet`). Results are nested pure dicts shaped like `nnx.to_pure_dict(nnx.state(model))`: parameters,
running statistics and the BNNeck's frozen bias; conv kernels go from PyTorch's OIHW to HWIO, linear weights are
transposed.

A Lightning checkpoint of the original CTLModel holds `backbone.base.*` (the ResNet), `bn.*` (the BNNeck),
`fc_query.weight` (the classifier) and `center_loss.centers`. Its IBN-a backbone also keeps the unused ImageNet
head `backbone.base.fc.*`, skipped here like torchvision's `fc.*`; `num_batches_tracked` counters are skipped too.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from convert import ConvertError
from convert.sources import load_pickle, require_torch, to_numpy
from jaxretrieval.checkpoint import write_model
from jaxretrieval.config import Config, load_config, to_dict
from jaxretrieval.data.reid import IMAGENET_MEAN, IMAGENET_STD
from jaxretrieval.models import abstract_model

BACKBONE_PREFIX = "backbone.base."
EXPANSION = 4
BN_FIELDS = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
SKIPPED_SUFFIX = ".num_batches_tracked"
HEAD_KEYS = ("fc.weight", "fc.bias")  # the ImageNet classifier, never used for re-identification

# numpy's data-only constructors (numpy 1 pickles name numpy.core, numpy 2 numpy._core).
NUMPY_CONSTRUCTORS = {"numpy.dtype", "numpy.ndarray"} | {
    f"numpy.{core}.multiarray.{name}" for core in ("core", "_core") for name in ("scalar", "_reconstruct")}

Layout = dict[str, tuple[tuple[Any, ...], tuple[int, ...]]]  # torch key -> (our path, torch shape)


def _conv(layout: Layout, key: str, path: tuple[Any, ...], d_in: int, d_out: int, size: int) -> None:
    layout[f"{key}.weight"] = ((*path, "kernel"), (d_out, d_in, size, size))


def _bn(layout: Layout, key: str, path: tuple[Any, ...], size: int) -> None:
    for field, name in BN_FIELDS.items():
        layout[f"{key}.{field}"] = ((*path, name), (size,))


def backbone_layout(layers: tuple[int, ...], width: int, ibn: bool) -> Layout:
    """Every tensor of a ResNet(-IBN-a) with bottleneck blocks, in torchvision's key names."""
    layout: Layout = {}
    _conv(layout, "conv1", ("conv1",), 3, width, 7)
    _bn(layout, "bn1", ("bn1",), width)
    d_in = width
    for i, blocks in enumerate(layers):
        planes, stage = width * 2**i, f"layer{i + 1}"
        for j in range(blocks):
            key, path = f"{stage}.{j}", (stage, j)
            _conv(layout, f"{key}.conv1", (*path, "conv1"), d_in, planes, 1)
            if ibn and i < 3:
                half = planes // 2
                layout[f"{key}.bn1.IN.weight"] = ((*path, "bn1", "IN", "scale"), (half,))
                layout[f"{key}.bn1.IN.bias"] = ((*path, "bn1", "IN", "bias"), (half,))
                _bn(layout, f"{key}.bn1.BN", (*path, "bn1", "BN"), planes - half)
            else:
                _bn(layout, f"{key}.bn1", (*path, "bn1"), planes)
            _conv(layout, f"{key}.conv2", (*path, "conv2"), planes, planes, 3)
            _bn(layout, f"{key}.bn2", (*path, "bn2"), planes)
            _conv(layout, f"{key}.conv3", (*path, "conv3"), planes, planes * EXPANSION, 1)
            _bn(layout, f"{key}.bn3", (*path, "bn3"), planes * EXPANSION)
            if j == 0:  # stride or width changes at every stage's first block, so it projects its shortcut
                _conv(layout, f"{key}.downsample.0", (*path, "downsample", "conv"), d_in, planes * EXPANSION, 1)
                _bn(layout, f"{key}.downsample.1", (*path, "downsample", "bn"), planes * EXPANSION)
            d_in = planes * EXPANSION
    return layout


def ctl_layout(num_classes: int, layers: tuple[int, ...], width: int, ibn: bool) -> Layout:
    """Every tensor of the original Lightning CTLModel's state dict."""
    layout = {BACKBONE_PREFIX + key: (("backbone", *path), shape)
              for key, (path, shape) in backbone_layout(layers, width, ibn).items()}
    features = width * 8 * EXPANSION
    _bn(layout, "bn", ("neck",), features)
    layout["fc_query.weight"] = (("classifier", "kernel"), (num_classes, features))
    layout["center_loss.centers"] = (("center_loss", "centers"), (num_classes, features))
    return layout


def _shape(state: Mapping[str, Any], key: str) -> tuple[int, ...]:
    if key not in state:
        raise ConvertError(f"missing key '{key}'")
    return tuple(np.shape(state[key]))


def _backbone_sizes(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    width = _shape(state, f"{prefix}conv1.weight")[0]
    layers = []
    for i in range(1, 5):
        blocks = 0
        while f"{prefix}layer{i}.{blocks}.conv1.weight" in state:
            blocks += 1
        if blocks == 0:
            raise ConvertError(f"missing key '{prefix}layer{i}.0.conv1.weight'")
        layers.append(blocks)
    ibn = any(key.startswith(prefix + "layer") and ".bn1.IN." in key for key in state)
    return {"layers": tuple(layers), "width": width, "ibn": ibn}


def infer_ctl_sizes(state: Mapping[str, Any]) -> dict[str, Any]:
    """CTLModel's constructor arguments for an original CTL state dict: num_classes, layers, width, ibn, and what
    the weights cannot tell, taken from the original: stem_relu (IBN-a only) and last_stride 1 (its default)."""
    sizes = _backbone_sizes(state, BACKBONE_PREFIX)
    num_classes = _shape(state, "fc_query.weight")[0]
    return {"num_classes": num_classes, **sizes, "stem_relu": sizes["ibn"], "last_stride": 1}


def _convert(state: Mapping[str, Any], layout: Layout, ignored: tuple[str, ...]) -> dict:
    keys = {key for key in state if not key.endswith(SKIPPED_SUFFIX) and key not in ignored}
    missing = sorted(layout.keys() - keys)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ConvertError(f"missing key '{missing[0]}'{more}")
    unexpected = sorted(keys - layout.keys())
    if unexpected:
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise ConvertError(f"unexpected key '{unexpected[0]}'{more}")
    out: dict = {}
    for key, (path, shape) in layout.items():
        value = np.asarray(state[key], np.float32)
        if value.shape != shape:
            raise ConvertError(f"'{key}' has shape {value.shape}, expected {shape}")
        if value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)
        elif value.ndim == 2 and path[-1] == "kernel":
            value = value.T
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = np.ascontiguousarray(value)
    return out


def params_from_torchvision(state: Mapping[str, Any]) -> dict:
    """A torchvision ResNet-50 (or IBN-Net ResNet-50-IBN-a) state dict -> the `ResNet` state as a pure dict. The
    sizes come from the keys; `fc.*` is dropped."""
    sizes = _backbone_sizes(state, "")
    return _convert(state, backbone_layout(sizes["layers"], sizes["width"], sizes["ibn"]), HEAD_KEYS)


def params_from_lightning(state: Mapping[str, Any]) -> dict:
    """An original CTL (Lightning) state dict -> the `CTLModel` state as a pure dict (build the model with
    `infer_ctl_sizes(state)`)."""
    s = infer_ctl_sizes(state)
    layout = ctl_layout(s["num_classes"], s["layers"], s["width"], s["ibn"])
    return _convert(state, layout, tuple(BACKBONE_PREFIX + key for key in HEAD_KEYS))


def _stand_in(name: str) -> Any:
    """What a global a checkpoint names outside its tensors resolves to while reading it. numpy's data-only
    constructors (scalars, arrays, dtypes) are used as they are. Any other name (other numpy functions included:
    some would load pickles) becomes an inert stand-in whose instances are empty OrderedDicts, which the weights-only
    unpickler may fill; none of the named class's code runs. Lightning 1.1 checkpoints need this: they keep yacs
    CfgNodes in an AttributeDict under `hyper_parameters` and key `callbacks` by callback class."""
    module, _, attr = name.rpartition(".")
    if name in NUMPY_CONSTRUCTORS:
        return getattr(importlib.import_module(module), attr)
    return type(attr, (), {"__new__": staticmethod(lambda cls, *args, **kwargs: OrderedDict())})


def _load_with_stand_ins(path: Path, refused: ConvertError) -> Any:
    """torch.load(weights_only=True) with `_stand_in`s for the globals it refused; `refused` if that fails too."""
    torch = require_torch()
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        allowed: list[Any] = [(_stand_in(name), name) for name in names]
        if NUMPY_CONSTRUCTORS.intersection(names):  # dtype objects are built as their own classes
            allowed += [cls for cls in vars(np.dtypes).values() if isinstance(cls, type)]
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch's unpickler and importlib raise many types
        raise refused from None


def read_state(path: str | Path) -> dict[str, np.ndarray]:
    """The state dict of a `torch.save` file (a Lightning .ckpt's `state_dict`, or a bare state dict) as numpy.
    Read with `torch.load(weights_only=True)`; classes named outside the tensors (the original's hyper-parameters)
    are read as inert stand-ins rather than refused."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path} does not exist or is not a file")
    try:
        loaded = load_pickle(path)
    except ConvertError as refused:
        loaded = _load_with_stand_ins(path, refused)
    if not isinstance(loaded, dict):
        raise ConvertError(f"{path} holds a {type(loaded).__name__}, not a state dict")
    return to_numpy(loaded, path)


def build_config(sizes: dict[str, Any], input_size: tuple[int, int]) -> Config:
    """A Centroids-ReID config (the Market-1501 recipe's data, loss and evaluation) for these model sizes."""
    preset = "resnet50_ibn_a_ctl" if sizes["ibn"] else "resnet50_ctl"
    standard = tuple(sizes["layers"]) == (3, 4, 6, 3) and sizes["width"] == 64
    overrides = [f"model.name={preset if standard else 'custom'}", "model.family=ctl",
                 f"model.resnet.layers={list(sizes['layers'])}", f"model.resnet.width={sizes['width']}",
                 f"model.resnet.ibn={sizes['ibn']}", f"model.resnet.stem_relu={sizes['stem_relu']}",
                 f"model.resnet.last_stride={sizes['last_stride']}", f"model.num_classes={sizes['num_classes']}",
                 "data.kind=market1501", f"data.input_size={list(input_size)}", f"data.mean={list(IMAGENET_MEAN)}",
                 f"data.std={list(IMAGENET_STD)}", "train.loss=ctl", "eval.protocol=reid"]
    return load_config(None, overrides, source="convert ctl")


def import_ctl(src: str | Path, out: str | Path, *, input_size: tuple[int, int] = (256, 128)) -> Path:
    """A Centroids-ReID Lightning .ckpt -> a full jaxretrieval checkpoint; a torchvision (or IBN-Net) ResNet-50
    state dict -> a backbone-only one for `train.init_from` (the original's MODEL.PRETRAIN_PATH), marked partial:
    the neck, classifier and centres keep their fresh initialisation. Nothing is written at OUT on failure."""
    src, out = Path(src), Path(out)
    if out.exists():
        raise ConvertError(f"{out} already exists; choose a new output folder")
    state = read_state(src)
    try:
        if any(key.startswith(BACKBONE_PREFIX) for key in state):
            sizes, partial = infer_ctl_sizes(state), False
            params = params_from_lightning(state)
        else:
            sizes, partial = {**_backbone_sizes(state, ""), "num_classes": 1}, True
            params = {"backbone": params_from_torchvision(state)}
    except ConvertError as e:
        raise ConvertError(f"{src}: {e}") from None
    config = build_config({"stem_relu": sizes["ibn"], "last_stride": 1, **sizes}, input_size)
    _, abstract = abstract_model(config.model)
    params = jax.tree.map(lambda a, x: np.asarray(x, a.dtype), {k: abstract[k] for k in params}, params)
    meta = {"config": to_dict(config), "converted_from": {"path": str(src.absolute()),
                                                           "format": "torchvision" if partial else "ctl_lightning"}}
    return write_model(out, params, {**meta, "partial": True} if partial else meta)


__all__ = ["backbone_layout", "build_config", "ctl_layout", "import_ctl", "infer_ctl_sizes", "params_from_lightning",
           "params_from_torchvision", "read_state"]
