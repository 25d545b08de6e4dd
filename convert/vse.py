"""VSE-infinity PyTorch checkpoints (woodfrog/vse_infty, precomp_enc_type "basic": BUTD regions + BERT) to
checkpoints of system vse_infty (`models.vse.VSE`).

A released `model_best.pth` is what the original's train.py saves: {'model': [img_enc state dict, txt_enc state
dict], 'opt': its argparse.Namespace, 'epoch', 'best_rsum', 'Eiters'}, read with torch.load(weights_only=True) and
argparse.Namespace allowed. A plain state-dict file reads too: the two state dicts as a list, or one dict with their
keys under `img_enc.` / `txt_enc.`. DataParallel's `module.` is dropped. In messages the image encoder's keys are
named `img_enc.*` and the text encoder's `txt_enc.*`.
- `img_enc.fc`, `img_enc.mlp.layers.{0,1}` (Linear: weights transposed to our kernels) and `img_enc.mlp.bns.0`
  (BatchNorm1d: weight, bias, running_mean, running_var -> scale, bias, mean, var); `img_enc.gpool.*` and
  `txt_enc.gpool.*` through `models.gpo.flat_from_torch`; `txt_enc.bert.*` (a Hugging Face BertModel, convert/bert.py)
  and `txt_enc.linear`. `Eiters` becomes the model's `updates` count (the hinge loss's warm-up is counted in it).
- Skipped and counted: `img_enc.mlp.bns.1.*` (built by the original's MLP, never applied), batch-norm counters, the
  BERT pooler and index buffers. Any other key is an error naming it, as is a missing one or a wrong shape.
Sizes come from the weights: the region width and embedding width from `fc`, BERT's from its tensors (heads:
`heads`, else width / 64 as bert-base), checked against `opt` where it names them. The config carries the original's
recipe from `opt` (the released train_region.sh's where there is none).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections import Counter
from pathlib import Path
from typing import Any

import jax
import numpy as np

from convert import ConvertError
from convert.bert import BertSizes, fusion_sizes, name_pairs
from convert.presets import named_config, preset_name, wordpiece_vocab
from convert.sources import check_keys, listed, load_pickle, to_numpy
from convert.xvlm import fit
from jaxretrieval.checkpoint import write_model
from jaxretrieval.config import Config, to_dict
from jaxretrieval.models import abstract_model
from jaxretrieval.models.gpo import flat_from_torch
from jaxretrieval.models.stacking import relayout

SYSTEM, FAMILY = "vse_infty", "vse"
IMAGE, TEXT = "img_enc.", "txt_enc."
CONTEXT_LENGTH = 64  # preset vse_bert_base's; the original does not cut captions
# The released train_region.sh (and arguments.py) where a checkpoint saves no options.
RELEASED = {"num_epochs": 25, "lr_update": 15, "learning_rate": 5e-4, "batch_size": 128, "grad_clip": 2.0,
            "margin": 0.2, "vse_mean_warmup_epochs": 1, "max_violation": False}
SKIPPED = {re.compile(r"^img_enc\.mlp\.bns\.1\."): "unused batch norm mlp.bns.1",
           re.compile(r"\.num_batches_tracked$"): "batch-norm counters",
           re.compile(r"^txt_enc\.bert\.pooler\."): "BERT pooler",
           re.compile(r"^txt_enc\.bert\.embeddings\.(position_ids|token_type_ids)$"): "BERT index buffers"}
# (our GPO path, their name) of models.gpo's mapping, for naming a tensor in messages.
GPO_NAMES = {f"gru/{side}/{kind}_{what}": f"gru.{'weight' if what == 'kernel' else 'bias'}_{kind[0]}h_l0{tail}"
             for side, tail in (("forward", ""), ("backward", "_reverse")) for kind in ("input", "hidden")
             for what in ("kernel", "bias")} | {"linear/kernel": "linear.weight"}


@dataclasses.dataclass(frozen=True)
class VSESizes:
    region_dim: int
    embed_dim: int
    region_mlp: bool
    text: BertSizes

    def model_kwargs(self) -> dict[str, Any]:
        """VSE(**kwargs, rngs=...) of these sizes."""
        t = self.text
        bert = dict(vocab_size=t.vocab_size, width=t.width, layers=t.layers, heads=t.heads, ffn_dim=t.ffn_dim,
                    max_positions=t.max_positions, type_vocab_size=t.type_vocab_size)
        return dict(region_dim=self.region_dim, embed_dim=self.embed_dim, bert=bert, region_mlp=self.region_mlp,
                    pad_id=0)


def _options(value: Any) -> dict[str, Any]:
    if isinstance(value, argparse.Namespace):
        return vars(value)
    return value if isinstance(value, dict) else {}


def _encoders(loaded: Any, path: Path) -> tuple[Any, Any] | None:
    """The (image, text) state dicts of what torch.load returned; None when it holds neither layout."""
    model = loaded.get("model", loaded) if isinstance(loaded, dict) else loaded
    if isinstance(model, (list, tuple)):
        if len(model) != 2 or not all(isinstance(part, dict) for part in model):
            raise ConvertError(f"{path}: 'model' must be [img_enc state dict, txt_enc state dict], got a "
                               f"{type(model).__name__} of {len(model)}")
        return model[0], model[1]
    if isinstance(model, dict):
        keys = [k.removeprefix("module.") for k in model if isinstance(k, str)]
        if any(k.startswith(IMAGE) for k in keys) and any(k.startswith(TEXT) for k in keys):
            image = {k.removeprefix("module.")[len(IMAGE):]: v for k, v in model.items()
                     if k.removeprefix("module.").startswith(IMAGE)}
            text = {k.removeprefix("module.")[len(TEXT):]: v for k, v in model.items()
                    if k.removeprefix("module.").startswith(TEXT)}
            return image, text
    return None


def read_vse(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """({img_enc.* and txt_enc.* key: array}, the saved options plus 'Eiters' / 'epoch' where present) of a
    VSE-infinity checkpoint, read with torch.load(weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path} does not exist or is not a file")
    loaded = load_pickle(path)
    encoders = _encoders(loaded, path)
    if encoders is None:
        what = f"a dict with keys {listed(sorted(map(str, loaded)))}" if isinstance(loaded, dict) else \
            f"a {type(loaded).__name__}"
        raise ConvertError(f"{path} holds {what}: not a VSE-infinity checkpoint ({{'model': [img_enc, txt_enc]}}, "
                           f"or img_enc.* and txt_enc.* keys)")
    state = {IMAGE + k: v for k, v in to_numpy(dict(encoders[0]), path).items()}
    state.update({TEXT + k: v for k, v in to_numpy(dict(encoders[1]), path).items()})
    saved = dict(_options(loaded.get("opt"))) if isinstance(loaded, dict) else {}
    for key in ("Eiters", "epoch"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), int):
            saved[key] = loaded[key]
    return state, saved


def infer_sizes(state: dict[str, np.ndarray], saved: dict[str, Any], heads: int | None = None) -> VSESizes:
    """The sizes the weights tell, checked against the saved options that name them."""
    if any(k.startswith((f"{IMAGE}backbone.", f"{IMAGE}image_encoder.")) for k in state) or \
            saved.get("precomp_enc_type", "basic") != "basic":
        raise ConvertError("an EncoderImageFull (precomp_enc_type backbone: a ResNet over grid features) does not "
                           "convert; only the region-feature encoder (precomp_enc_type basic) does")
    for option in ("no_imgnorm", "no_txtnorm"):
        if saved.get(option):
            raise ConvertError(f"trained with --{option}: system vse_infty always L2-normalises its embeddings")
    fc = f"{IMAGE}fc.weight"
    if fc not in state:
        raise ConvertError(f"missing key '{fc}' (not a VSE-infinity checkpoint?)")
    if state[fc].ndim != 2:
        raise ConvertError(f"'{fc}' has shape {state[fc].shape}, expected (embed_size, img_dim)")
    embed_dim, region_dim = state[fc].shape
    for option, value in (("embed_size", embed_dim), ("img_dim", region_dim)):
        if isinstance(saved.get(option), int) and saved[option] != value:
            raise ConvertError(f"the saved options say {option} {saved[option]} but '{fc}' has shape "
                               f"{state[fc].shape}")
    text = fusion_sizes(state, TEXT, heads, "a VSE-infinity text encoder")
    return VSESizes(region_dim=int(region_dim), embed_dim=int(embed_dim),
                    region_mlp=any(k.startswith(f"{IMAGE}mlp.") for k in state), text=text)


def _linear(ours: str, theirs: str) -> list[tuple[str, str, bool]]:
    return [(f"{ours}/kernel", f"{theirs}.weight", True), (f"{ours}/bias", f"{theirs}.bias", False)]


def name_map(sizes: VSESizes) -> list[tuple[str, str, bool]]:
    """(our per-layer path, their key, transposed) of every tensor but the GPOs'."""
    pairs = _linear("image/fc", f"{IMAGE}fc")
    if sizes.region_mlp:
        bn = f"{IMAGE}mlp.bns.0"
        pairs += [*_linear("image/mlp/layers_0", f"{IMAGE}mlp.layers.0"),
                  *_linear("image/mlp/layers_1", f"{IMAGE}mlp.layers.1"),
                  ("image/mlp/bn_0/scale", f"{bn}.weight", False), ("image/mlp/bn_0/bias", f"{bn}.bias", False),
                  ("image/mlp/bn_0/mean", f"{bn}.running_mean", False),
                  ("image/mlp/bn_0/var", f"{bn}.running_var", False)]
    pairs += [(f"text/bert/{ours}", f"{TEXT}{theirs}", transposed)
              for ours, theirs, transposed in name_pairs(sizes.text, "bert.")]
    return pairs + _linear("text/linear", f"{TEXT}linear")


def layout(state: dict[str, np.ndarray], sizes: VSESizes,
           where: str) -> tuple[dict[str, np.ndarray], dict[str, tuple[str, bool]], Counter]:
    """(flat {our per-layer path: array}, {our path: (their key, transposed)}, skipped keys counted by reason); a
    missing or unexpected key is a ConvertError naming it."""
    pairs = name_map(sizes)
    gpos = [(f"{ours}/gpo/{path}", f"{prefix}gpool.{name}") for ours, prefix in (("image", IMAGE), ("text", TEXT))
            for path, name in GPO_NAMES.items()]
    needed = {theirs for _, theirs, _ in pairs} | {theirs for _, theirs in gpos}
    skipped = check_keys(state, needed, where, "vse_infty's VSE",
                         lambda key: next((why for pattern, why in SKIPPED.items() if pattern.search(key)), None))
    flat = {ours: (state[theirs].T if transposed else state[theirs]) for ours, theirs, transposed in pairs}
    for ours, prefix in (("image", IMAGE), ("text", TEXT)):
        try:
            gpo = flat_from_torch(state, f"{prefix}gpool.")
        except ValueError as e:
            raise ConvertError(f"{where}: {prefix}gpool.*: {e}") from None
        flat.update({f"{ours}/gpo/{k}": v for k, v in gpo.items()})
    theirs = {ours: (key, transposed) for ours, key, transposed in pairs}
    theirs.update({ours: (key, ours.endswith("kernel")) for ours, key in gpos})
    return flat, theirs, skipped


def vse_params(state: dict[str, np.ndarray], sizes: VSESizes, template: Any, where: str,
               updates: int = 0) -> tuple[dict[str, Any], Counter]:
    """(our parameter tree in `template`'s structure (a VSE's nnx.to_pure_dict state, abstract or not), skipped keys
    counted): every tensor checked against its shape, which a ConvertError names with their key."""
    flat, theirs, skipped = layout(state, sizes, where)
    flat["updates"] = np.asarray(updates, np.int32)
    views = jax.tree.map(lambda a: np.broadcast_to(np.zeros((), a.dtype), a.shape), template)
    try:
        expected = relayout(views, {name: 0 for name in flat})
    except KeyError as e:
        raise ConvertError(f"{where}: the model has no {e}") from None
    for name, value in flat.items():
        shape = tuple(expected[name].shape)
        if tuple(value.shape) != shape:
            key, transposed = theirs.get(name, (name, False))
            raise ConvertError(f"{where}: '{key}' has shape {tuple(state[key].shape) if key in state else value.shape}"
                               f", system vse_infty's model takes {shape[::-1] if transposed else shape}")
    return fit(flat, template, where), skipped


def build_config(sizes: VSESizes, saved: dict[str, Any] | None = None) -> Config:
    """Config of system vse_infty for these sizes (named like the preset of the same sizes, else "custom") with the
    original's recipe from its saved options (the released script's where absent)."""
    opt = {**RELEASED, **{k: v for k, v in (saved or {}).items() if k in RELEASED}}
    t = sizes.text
    warmup = 0 if opt["max_violation"] else opt["vse_mean_warmup_epochs"]
    overrides = {"system": SYSTEM, "model.family": FAMILY, "model.embed_dim": sizes.embed_dim,
                 "model.text.vocab_size": t.vocab_size, "model.text.width": t.width, "model.text.layers": t.layers,
                 "model.text.heads": t.heads, "model.text.mlp_ratio": t.ffn_dim / t.width,
                 "model.text.context_length": min(CONTEXT_LENGTH, t.max_positions),
                 f"{SYSTEM}.region_dim": sizes.region_dim, f"{SYSTEM}.region_mlp": str(sizes.region_mlp).lower(),
                 f"{SYSTEM}.max_positions": t.max_positions, f"{SYSTEM}.margin": float(opt["margin"]),
                 f"{SYSTEM}.hinge_warmup_epochs": warmup, "data.kind": "precomp", "data.train_file": "train",
                 "data.test_file": "test", "data.tokenizer": "vocab.txt", "data.tokenizer_kind": "wordpiece",
                 "train.loss": "hinge",
                 "train.batch_size": int(opt["batch_size"]), "train.epochs": int(opt["num_epochs"]),
                 "train.lr": float(opt["learning_rate"]), "train.schedule": "multistep",
                 "train.milestones": f"[{int(opt['lr_update'])}]", "train.gamma": 0.1, "train.optimizer": "adamw",
                 "train.weight_decay": 1e-4, "train.decay_vectors": "true", "train.b2": 0.999, "train.eps": 1e-8,
                 "train.grad_clip": float(opt["grad_clip"]), "eval.protocol": "image_text"}
    data_name = (saved or {}).get("data_name")
    if data_name in ("coco", "f30k"):  # the precomp folders of configs/{coco,f30k}/vse_infty.yaml
        overrides["data.root"] = f"data/{data_name}_precomp"
    if data_name == "coco":  # the 5K test images, and COCO's 1K protocol over 5 folds of them
        overrides.update({"data.test_file": "testall", "eval.folds": 5})
    listed_overrides = [f"{key}={value}" for key, value in overrides.items()]
    name = preset_name(FAMILY, listed_overrides)
    return named_config(listed_overrides, name, "converted VSE-infinity config", SYSTEM)


def import_vse(src: str | Path, out: str | Path, *, vocab: str | Path | None = None,
               heads: int | None = None) -> Path:
    """A VSE-infinity checkpoint at SRC -> a complete system-vse_infty checkpoint at OUT (nothing at OUT on failure).
    `vocab`: bert-base-uncased's vocab.txt (or tokenizer.json), stored as the tokenizer; `heads`: the BERT's attention
    heads (default width / 64)."""
    src, out = Path(src), Path(out)
    if out.exists():
        raise ConvertError(f"{out} already exists; choose a new output folder")
    if heads is not None and heads <= 0:
        raise ConvertError(f"--heads must be positive, got {heads}")
    state, saved = read_vse(src)
    try:
        sizes = infer_sizes(state, saved, heads)
    except ConvertError as e:
        raise ConvertError(f"{src}: {e}") from None
    config = build_config(sizes, saved)
    tokenizer = wordpiece_vocab(vocab, config.model.text.context_length, sizes.text.vocab_size, str(src))
    _, abstract = abstract_model(config)
    params, skipped = vse_params(state, sizes, abstract, str(src), int(saved.get("Eiters", 0)))
    meta = {"config": to_dict(config), "converted_from": {"path": str(src.absolute()), "format": "vse_infty",
                                                          **{k: saved[k] for k in ("epoch", "Eiters") if k in saved}}}
    if tokenizer is not None:
        meta["tokenizer"] = tokenizer.to_spec()
    if skipped:
        print(f"ignored {sum(skipped.values())} keys: " + ", ".join(f"{n} {why}" for why, n in skipped.items()))
    print(f"model.name {config.model.name}; region_dim {sizes.region_dim}, embed_dim {sizes.embed_dim}, BERT "
          f"{sizes.text.layers} x {sizes.text.width} ({sizes.text.heads} heads); updates {saved.get('Eiters', 0)}")
    if tokenizer is None:
        print("no --vocab: the checkpoint holds no tokenizer, which jaxretrieval.load and evaluate need (training "
              "reads data.root/data.tokenizer)")
    return write_model(out, params, meta)


__all__ = ["VSESizes", "build_config", "import_vse", "infer_sizes", "layout", "name_map", "read_vse", "vse_params"]
