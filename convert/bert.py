"""Hugging Face BERT weights (`BertModel`, `BertForMaskedLM`, or a fusion BERT with `crossattention` layers) to our
`models.bert` layout and back.

Names: `[bert.]embeddings.{word,position,token_type}_embeddings`, `embeddings.LayerNorm`,
`encoder.layer.{i}.attention.self.{query,key,value}`, `.attention.output.{dense,LayerNorm}`, the same under
`.crossattention` for fusion layers, `.intermediate.dense`, `.output.{dense,LayerNorm}`, `pooler.dense` and, for the
MLM head, `cls.predictions.transform.{dense,LayerNorm}`, `cls.predictions.bias` and the decoder tied to the word
embeddings. Linear weights are (out, in) in torch and (in, out) here.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from convert import ConvertError
from convert.sources import count_indexed, head_count, load_hf_weights, read_json, save_safetensors, under
from jaxretrieval.checkpoint import load_model, read_meta_at, write_model
from jaxretrieval.models.bert import Bert, MLMHead, layer_path
from jaxretrieval.models.stacking import relayout

_LINEAR = {"query": "query", "key": "key", "value": "value", "output.dense": "output"}


@dataclasses.dataclass(frozen=True)
class BertSizes:
    vocab_size: int
    width: int
    layers: int
    heads: int
    ffn_dim: int
    max_positions: int
    type_vocab_size: int
    fusion_from: int
    cross_every: int = 1
    encoder_width: int | None = None
    pooler: bool = True  # BertForMaskedLM has none

    def model_kwargs(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def sizes_from_hf(config: dict[str, Any], state: dict[str, np.ndarray], prefix: str) -> BertSizes:
    """Sizes from a HF config.json, the fusion layers read off the state (the first layer with crossattention)."""
    layers = int(config["num_hidden_layers"])
    cross = sorted(int(m.group(1)) for key in state
                   if (m := re.match(rf"{re.escape(prefix)}encoder\.layer\.(\d+)\.crossattention\.self\.query\.weight$",
                                     key)))
    fusion_from = cross[0] if cross else layers
    every = cross[1] - cross[0] if len(cross) > 1 else 1
    if cross and cross != list(range(fusion_from, layers, every)):
        raise ConvertError(f"cross-attention in layers {cross}: not every {every} layers from {fusion_from} on")
    encoder_width = (state[f"{prefix}encoder.layer.{fusion_from}.crossattention.self.key.weight"].shape[1]
                     if cross else None)
    return BertSizes(vocab_size=int(config["vocab_size"]), width=int(config["hidden_size"]), layers=layers,
                     heads=int(config["num_attention_heads"]), ffn_dim=int(config["intermediate_size"]),
                     max_positions=int(config["max_position_embeddings"]),
                     type_vocab_size=int(config.get("type_vocab_size", 2)), fusion_from=fusion_from,
                     cross_every=every, encoder_width=encoder_width, pooler=f"{prefix}pooler.dense.weight" in state)


HEAD_DIM = 64  # BERT's (base 768 / 12, large 1024 / 16): the heads of a checkpoint unless told


def text_prefix(state: dict[str, np.ndarray], base: str) -> str:
    """Where the BERT sits under `base`: "bert." in BertForMaskedLM, "" in a bare BertModel."""
    if any(key.startswith(f"{base}roberta.") for key in state):
        raise ConvertError(f"{base}roberta.*: RoBERTa text encoders are not supported")
    return "bert." if any(key.startswith(f"{base}bert.") for key in state) else ""


def fusion_sizes(state: dict[str, np.ndarray], base: str, heads: int | None, what: str) -> BertSizes:
    """The sizes of the fusion BERT under `base` of a whole-model checkpoint (X2-VLM, UIT), read from its shapes:
    heads are `heads` or width / 64 (no shape holds them), no pooler, cross-attention in every layer from the first
    that has it. A missing tensor is a ConvertError saying the checkpoint is not `what`."""
    def get(key: str) -> np.ndarray:
        if f"{base}{prefix}{key}" not in state:
            raise ConvertError(f"missing key '{base}{prefix}{key}' (not {what}?)")
        return state[f"{base}{prefix}{key}"]

    prefix = text_prefix(state, base)
    vocab, width = get("embeddings.word_embeddings.weight").shape
    heads = head_count(width, heads or None, "BERT", head_dim=HEAD_DIM)
    view = under(state, base)
    hf = {"vocab_size": vocab, "hidden_size": width, "num_attention_heads": heads,
          "num_hidden_layers": count_indexed(view, rf"{prefix}encoder\.layer\.(\d+)\.attention\.self\.query\.weight$"),
          "intermediate_size": get("encoder.layer.0.intermediate.dense.weight").shape[0],
          "max_position_embeddings": get("embeddings.position_embeddings.weight").shape[0],
          "type_vocab_size": get("embeddings.token_type_embeddings.weight").shape[0]}
    text = dataclasses.replace(sizes_from_hf(hf, view, prefix), pooler=False)  # BertForMaskedLM has no pooler
    if text.cross_every != 1:
        raise ConvertError(f"cross-attention every {text.cross_every} layers; {what} has it in every layer from "
                           f"fusion_layer on")
    return text


def read_hf_bert(folder: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config.json, weights) of a Hugging Face BERT folder, TF-era LayerNorm names (`LayerNorm.gamma` / `.beta`, as
    bert-base-uncased's files hold) renamed as transformers renames them on load."""
    state = load_hf_weights(folder)
    state = {re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)): v
             for k, v in state.items()}
    return read_json(folder / "config.json"), state


def _linear(ours: str, theirs: str) -> list[tuple[str, str, bool]]:
    return [(f"{ours}/kernel", f"{theirs}.weight", True), (f"{ours}/bias", f"{theirs}.bias", False)]


def _norm(ours: str, theirs: str) -> list[tuple[str, str, bool]]:
    return [(f"{ours}/scale", f"{theirs}.weight", False), (f"{ours}/bias", f"{theirs}.bias", False)]


def _attention(ours: str, theirs: str) -> list[tuple[str, str, bool]]:
    pairs = [p for name in ("query", "key", "value") for p in _linear(f"{ours}/{name}", f"{theirs}.self.{name}")]
    return pairs + _linear(f"{ours}/output", f"{theirs}.output.dense") + _norm(f"{ours}/norm",
                                                                              f"{theirs}.output.LayerNorm")


def name_pairs(sizes: BertSizes, prefix: str = "", mlm: bool = False) -> list[tuple[str, str, bool]]:
    """(our per-layer path, their key, transposed) for every tensor; our layers as `.../layers/<index>/...`."""
    pairs = [("embeddings/word/embedding", f"{prefix}embeddings.word_embeddings.weight", False),
             ("embeddings/position/embedding", f"{prefix}embeddings.position_embeddings.weight", False),
             ("embeddings/token_type/embedding", f"{prefix}embeddings.token_type_embeddings.weight", False),
             *_norm("embeddings/norm", f"{prefix}embeddings.LayerNorm"),
             *(_linear("pooler", f"{prefix}pooler.dense") if sizes.pooler else [])]
    for i in range(sizes.layers):
        stack, index, inner = layer_path(i, layers=sizes.layers, fusion_from=sizes.fusion_from,
                                         cross_every=sizes.cross_every)
        ours = f"{stack}/{index}" + (f"/{inner}" if inner else "")
        theirs = f"{prefix}encoder.layer.{i}"
        pairs += _attention(f"{ours}/attention", f"{theirs}.attention")
        if inner == "cross":
            pairs += _attention(f"{ours}/crossattention", f"{theirs}.crossattention")
        pairs += _linear(f"{ours}/intermediate", f"{theirs}.intermediate.dense")
        pairs += _linear(f"{ours}/output", f"{theirs}.output.dense")
        pairs += _norm(f"{ours}/norm", f"{theirs}.output.LayerNorm")
    if mlm:
        pairs += [*_linear("mlm/transform", "cls.predictions.transform.dense"),
                  *_norm("mlm/norm", "cls.predictions.transform.LayerNorm"),
                  ("mlm/bias", "cls.predictions.bias", False)]
    return pairs


def flat_from_hf(state: dict[str, np.ndarray], sizes: BertSizes, prefix: str = "",
                 mlm: bool = False) -> dict[str, np.ndarray]:
    """Our per-layer flat {path: array} from their state; a missing tensor is a ConvertError naming it."""
    missing = [theirs for _, theirs, _ in name_pairs(sizes, prefix, mlm) if theirs not in state]
    if missing:
        raise ConvertError(f"not a BERT of these sizes: {len(missing)} tensors missing, e.g. {missing[:3]}")
    return {ours: (state[theirs].T if transposed else state[theirs])
            for ours, theirs, transposed in name_pairs(sizes, prefix, mlm)}


def hf_from_flat(flat: dict[str, np.ndarray], sizes: BertSizes, prefix: str = "",
                 mlm: bool = False) -> dict[str, np.ndarray]:
    """Their state from our per-layer flat params (the MLM decoder tied to the word embeddings)."""
    state = {theirs: np.ascontiguousarray(flat[ours].T if transposed else flat[ours])
             for ours, theirs, transposed in name_pairs(sizes, prefix, mlm)}
    if mlm:
        state["cls.predictions.decoder.weight"] = state[f"{prefix}embeddings.word_embeddings.weight"]
        state["cls.predictions.decoder.bias"] = state["cls.predictions.bias"]
    return state


def hf_config(sizes: BertSizes) -> dict[str, Any]:
    """config.json for `transformers.BertConfig`; a fusion BERT also records where its cross-attention layers are."""
    config = {"model_type": "bert", "vocab_size": sizes.vocab_size, "hidden_size": sizes.width,
              "num_hidden_layers": sizes.layers, "num_attention_heads": sizes.heads,
              "intermediate_size": sizes.ffn_dim, "max_position_embeddings": sizes.max_positions,
              "type_vocab_size": sizes.type_vocab_size, "hidden_act": "gelu", "layer_norm_eps": 1e-12}
    if sizes.fusion_from < sizes.layers:
        # transformers gives every layer cross-attention once add_cross_attention is set; ALBEF / X-VLM's xbert reads
        # fusion_layer and encoder_width and gives it to the fusion layers only, as here.
        config.update(add_cross_attention=True, is_decoder=True, fusion_layer=sizes.fusion_from,
                      cross_every=sizes.cross_every, encoder_width=sizes.encoder_width or sizes.width)
    return config


def template(sizes: BertSizes, mlm: bool) -> dict[str, Any]:
    """Abstract {"bert": ..., "mlm"?: ...} params of our modules for these sizes (stacked layers)."""

    def build() -> dict[str, Any]:
        rngs = nnx.Rngs(0)
        tree = {"bert": nnx.to_pure_dict(nnx.state(Bert(**sizes.model_kwargs(), rngs=rngs)))}
        if mlm:
            tree["mlm"] = nnx.to_pure_dict(nnx.state(MLMHead(sizes.width, sizes.vocab_size, rngs=rngs)))
        return tree

    return jax.eval_shape(build)


def _prefixed(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {(k if k.startswith("mlm/") else f"bert/{k}"): v for k, v in flat.items()}


def import_bert(src: str | Path, out: str | Path) -> Path:
    """A Hugging Face BERT folder (config.json + model.safetensors or pytorch_model.bin; BertModel, BertForMaskedLM
    or a fusion BERT) -> a partial checkpoint {"bert", "mlm"?} that a system's train.init_from reads into its text
    tower. Nothing is written at OUT on failure."""
    src = Path(src)
    if not (src / "config.json").is_file():
        raise ConvertError(f"{src} is not a Hugging Face BERT folder: config.json is missing")
    config, state = read_hf_bert(src)
    prefix = "bert." if any(k.startswith("bert.") for k in state) else ""
    sizes = sizes_from_hf(config, state, prefix)
    mlm = "cls.predictions.bias" in state
    params = relayout(_prefixed(flat_from_hf(state, sizes, prefix, mlm)), template(sizes, mlm))
    meta = {"partial": True, "component": "bert", "bert": dataclasses.asdict(sizes), "mlm": mlm,
            "converted_from": {"path": str(src.absolute()), "format": "hf_bert"}}
    return write_model(out, params, meta)


def export_bert(checkpoint: str | Path, out: str | Path) -> Path:
    """A checkpoint `import_bert` wrote -> a Hugging Face folder (config.json + model.safetensors) that
    `BertModel.from_pretrained` (or `BertForMaskedLM`, with the MLM head) reads. Nothing at OUT on failure."""
    meta = read_meta_at(checkpoint)
    if meta.get("component") != "bert":
        raise ConvertError(f"{checkpoint} holds no converted BERT (its metadata names no 'bert' component)")
    sizes, mlm = BertSizes(**meta["bert"]), bool(meta.get("mlm"))
    params, _ = load_model(checkpoint, template(sizes, mlm))
    per_layer = relayout(params, _prefixed({ours: 0 for ours, _, _ in name_pairs(sizes, "", mlm)}))
    flat = {name.removeprefix("bert/"): np.asarray(value) for name, value in per_layer.items()}
    state = hf_from_flat(flat, sizes, "bert." if mlm else "", mlm)
    out = Path(out)
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        config = {**hf_config(sizes), "architectures": ["BertForMaskedLM" if mlm else "BertModel"]}
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_safetensors({k: np.asarray(v, np.float32) for k, v in state.items()}, staging / "model.safetensors")
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


__all__ = ["BertSizes", "export_bert", "flat_from_hf", "hf_config", "hf_from_flat", "import_bert", "name_pairs",
           "sizes_from_hf"]
