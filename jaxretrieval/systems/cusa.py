"""CUSA (AAAI 2024): CLIP with cross-modal and uni-modal soft-label alignment.

The model is CLIP's towers with a cross head and a uni head per modality (`models/cusa.py`). Three losses
(`losses/soft_label.py`): InfoNCE over image-id positives (L_con), KL from the teachers' image-image and text-text
similarities to the image-text similarities (L_cross), and the same to the uni heads' image-image and text-text
similarities (L_uni). Teacher features come from files: image features keyed by image_id (the original's
`{split}_unicom.npy`, or our .npz), text features keyed by cleaned caption (`python -m jaxretrieval.teachers text`).
Start from converted CLIP weights (`train.init_from`); the heads and temperatures start fresh.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxretrieval import checkpoint
from jaxretrieval.config import Config
from jaxretrieval.config_checks import dual_encoder_checks, no_layer_recipe
from jaxretrieval.data.demo_teachers import IMAGE_FILE, TEXT_FILE, write_demo_teachers
from jaxretrieval.data.pipeline import data_root
from jaxretrieval.data.teacher_features import TeacherTable, load_image_teachers, load_text_teachers
from jaxretrieval.gradients import micro_batched
from jaxretrieval.losses.soft_label import SoftLabelLossConfig, clamp_temperatures, cusa_losses, sharded_cusa_losses
from jaxretrieval.models.cusa import CUSAModel
from jaxretrieval.retrieval import embed_all
from jaxretrieval.sharding import under_mesh
from jaxretrieval.systems import register
from jaxretrieval.systems.base import Check, Evaluator, GradFn
from jaxretrieval.systems.clip import DualEncoder

Pair = tuple[float, float]


@dataclasses.dataclass
class CUSASettings:
    # Teacher feature files (relative to data.root): image features by image_id, text features by cleaned caption.
    # On data.kind=demo, missing files are generated (stand-in teachers; see data/demo_teachers.py).
    image_teachers: str = ""
    text_teachers: str = ""
    # The original's image teachers are a pickled .npy dict; reading a pickle runs code, so only with this set.
    allow_pickle: bool = False
    # The three losses: on/off, weight, and (soft-label ones) kl or a soft-target cross entropy; "mean" takes the
    # mean over each row of -log p x target (the original's default for L_con), "sum" the sum.
    contrastive: bool = True
    cross: bool = True
    uni: bool = True
    contrastive_rate: float = 1.0
    cross_rate: float = 0.1
    uni_rate: float = 0.5
    contrastive_mode: str = "mean"
    cross_loss: str = "kl"
    uni_loss: str = "kl"
    cross_mode: str = "mean"  # for cross_loss / uni_loss contrastive
    uni_mode: str = "mean"
    # Temperatures: initial (image, text) values, the range each is clamped to before every step, whether one is
    # shared by both modalities (initialised at the mean), and whether it learns (false: frozen, "blocked").
    tau: float = 0.05
    tau_range: Pair = (0.01, 0.1)
    learn_tau: bool = True
    cross_tau: Pair = (0.45, 0.45)
    cross_tau_range: Pair = (0.1, 0.99)
    cross_same_tau: bool = True
    learn_cross_tau: bool = True
    cross_soft_tau: Pair = (1.0, 1.0)  # of the teachers' similarities
    cross_soft_tau_range: Pair = (0.1, 1.0)
    cross_same_soft_tau: bool = True
    learn_cross_soft_tau: bool = False
    uni_tau: Pair = (0.45, 0.45)
    uni_tau_range: Pair = (0.1, 1.0)
    uni_same_tau: bool = False
    learn_uni_tau: bool = True
    uni_tau_from_cross: bool = False  # true: L_uni uses the cross temperatures
    uni_soft_tau: Pair = (1.0, 1.0)
    uni_soft_tau_range: Pair = (0.1, 1.0)
    uni_same_soft_tau: bool = False
    learn_uni_soft_tau: bool = False
    uni_soft_tau_from_cross: bool = True  # the original's default: L_uni uses the cross soft-label temperatures


def temperature_plan(s: CUSASettings) -> tuple[dict[str, tuple[float, bool]], dict[str, Pair], dict[str, str]]:
    """(model temperatures: name -> (initial, learnable); their clamp ranges; loss key -> model temperature)."""
    params: dict[str, tuple[float, bool]] = {}
    ranges: dict[str, Pair] = {}
    uses: dict[str, str] = {}

    def group(prefix: str, init: Pair, bounds: Pair, same: bool, learn: bool, on: bool) -> None:
        if not on:
            return
        names = {m: prefix if same else f"{prefix}_{m}" for m in ("image", "text")}
        for index, modality in enumerate(("image", "text")):
            name = names[modality]
            params[name] = (sum(init) / 2 if same else init[index], learn)
            ranges[name] = bounds
            uses[f"{prefix}_{modality}"] = name

    if s.contrastive:
        params["tau"], ranges["tau"], uses["tau"] = (s.tau, s.learn_tau), s.tau_range, "tau"
    cross_temps = s.cross or (s.uni and (s.uni_tau_from_cross or s.uni_soft_tau_from_cross))
    group("cross_tau", s.cross_tau, s.cross_tau_range, s.cross_same_tau, s.learn_cross_tau, cross_temps)
    group("cross_soft_tau", s.cross_soft_tau, s.cross_soft_tau_range, s.cross_same_soft_tau, s.learn_cross_soft_tau,
          cross_temps)
    group("uni_tau", s.uni_tau, s.uni_tau_range, s.uni_same_tau, s.learn_uni_tau, s.uni and not s.uni_tau_from_cross)
    group("uni_soft_tau", s.uni_soft_tau, s.uni_soft_tau_range, s.uni_same_soft_tau, s.learn_uni_soft_tau,
          s.uni and not s.uni_soft_tau_from_cross)
    for modality in ("image", "text"):
        if s.uni and s.uni_tau_from_cross:
            uses[f"uni_tau_{modality}"] = uses[f"cross_tau_{modality}"]
        if s.uni and s.uni_soft_tau_from_cross:
            uses[f"uni_soft_tau_{modality}"] = uses[f"cross_soft_tau_{modality}"]
    return params, ranges, uses


class TeacherFields:
    """Per record: its image's and its caption's teacher features. Picklable for grain's worker processes without a
    copy per worker: pickled, the feature arrays travel as .npy files that every worker memory-maps (COCO's text
    table is 1.8 GB in float32)."""

    def __init__(self, image: TeacherTable, text: TeacherTable, source: Any):
        """Every image id and caption of `source` is looked up here: a missing one is an error naming it."""
        self.image_rows = image.rows([str(key) for key in source.group_keys()])  # by group
        captions = sorted({record.caption for record in source.records})
        self.text_rows = dict(zip(captions, text.rows(captions).tolist(), strict=True))
        self.image_features, self.text_features = image.features, text.features

    def __call__(self, record: Any) -> dict[str, np.ndarray]:
        return {"teacher_image": np.asarray(self.image_features[self.image_rows[record.group]]),
                "teacher_text": np.asarray(self.text_features[self.text_rows[record.caption]])}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name in ("image_features", "text_features"):
            state[name] = _spilled(state[name])
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name in ("image_features", "text_features"):
            state[name] = np.load(state[name], mmap_mode="r")
        self.__dict__.update(state)


_SPILLED: dict[int, str] = {}


def _spilled(features: np.ndarray) -> str:
    """A .npy file holding `features` (written once per array, removed at exit), for workers to memory-map."""
    if isinstance(features, np.memmap) and features.filename:
        return features.filename
    if id(features) not in _SPILLED:
        handle, path = tempfile.mkstemp(prefix="jaxretrieval-teachers-", suffix=".npy")
        with os.fdopen(handle, "wb") as f:
            np.save(f, features)
        atexit.register(lambda: Path(path).unlink(missing_ok=True))
        _SPILLED[id(features)] = path
    return _SPILLED[id(features)]


@functools.lru_cache(maxsize=8)
def _uni_encoder(graphdef: nnx.GraphDef, modality: str, mesh: Any):
    def encode(p: Any, x: Any) -> Any:
        model = nnx.merge(graphdef, p)
        return (model.encode_image_uni if modality == "image" else model.encode_text_uni)(x, normalize=True)

    return jax.jit(under_mesh(encode, mesh))


def uni_encoder(graphdef: nnx.GraphDef, modality: str, mesh: Any, params: Any):
    """batch -> the uni head's normalised embeddings, jitted under the mesh (compiled once per run)."""
    fn = _uni_encoder(graphdef, modality, mesh)
    return lambda x: fn(params, x)


class CUSA(DualEncoder):
    name = "cusa"
    summary = "CUSA: CLIP + cross-modal and uni-modal soft-label alignment with image and text teachers"
    families = ("clip",)
    losses = ("cusa",)
    protocols = ("image_text",)
    Section = CUSASettings

    def check(self, config: Config) -> list[Check]:
        s = config.section
        ranges = [("tau", s.tau_range), ("cross_tau", s.cross_tau_range), ("cross_soft_tau", s.cross_soft_tau_range),
                  ("uni_tau", s.uni_tau_range), ("uni_soft_tau", s.uni_soft_tau_range)]
        needs_teachers = (s.cross or s.uni) and config.data.kind != "demo"
        return [
            *dual_encoder_checks(config), *no_layer_recipe(config),
            (s.contrastive or s.cross or s.uni, "cusa: at least one of cusa.contrastive, cusa.cross, cusa.uni"),
            (s.contrastive or s.cross, "cusa: the cross heads are trained by cusa.contrastive or cusa.cross"),
            *[(mode in ("mean", "sum"), f"cusa.{key} must be mean or sum") for key, mode in
              (("contrastive_mode", s.contrastive_mode), ("cross_mode", s.cross_mode), ("uni_mode", s.uni_mode))],
            (s.cross_loss in ("kl", "contrastive") and s.uni_loss in ("kl", "contrastive"),
             "cusa.cross_loss and cusa.uni_loss must be kl or contrastive"),
            *[(0 < low <= high, f"cusa.{name}_range must be [low, high] with 0 < low <= high") for name, (low, high)
              in ranges],
            (not needs_teachers or bool(s.image_teachers and s.text_teachers),
             "cusa.cross and cusa.uni need teacher features: set cusa.image_teachers and cusa.text_teachers (files "
             "under data.root; `python -m jaxretrieval.teachers` writes them), or turn both losses off"),
            (config.train.loss_variant in ("local", "gathered"), "system cusa has loss variants local and gathered"),
            (config.model.init_logit_bias is None, "system cusa has no logit scale or bias (temperatures instead)"),
        ]

    def build(self, config: Config, *, rngs: nnx.Rngs, dtype: Any) -> CUSAModel:
        s = config.section or CUSASettings()
        temperatures, _, _ = temperature_plan(s)
        return CUSAModel(config.model, temperatures, uni_heads=s.uni, rngs=rngs, dtype=dtype)

    def before_step(self, config: Config):
        _, ranges, _ = temperature_plan(config.section)
        return lambda params: {**params, "temperatures": clamp_temperatures(params["temperatures"], ranges)}

    def grad_fn(self, config: Config, graphdef: nnx.GraphDef, mesh: Any) -> GradFn:
        s = config.section
        loss_config = SoftLabelLossConfig(
            contrastive_on=s.contrastive, cross_on=s.cross, uni_on=s.uni, rate_con=s.contrastive_rate,
            rate_cross=s.cross_rate, rate_uni=s.uni_rate, contrastive_mode=s.contrastive_mode,
            cross_use_loss=s.cross_loss, uni_use_loss=s.uni_loss, cross_mode=s.cross_mode, uni_mode=s.uni_mode)
        losses = cusa_losses if config.train.loss_variant == "local" else sharded_cusa_losses(mesh)
        _, _, uses = temperature_plan(s)
        heads = ("image_cross", "text_cross", "image_uni", "text_uni")

        def embed(params: Any, batch: dict, key: Any) -> tuple[tuple, dict]:
            model = nnx.merge(graphdef, params)
            features = model.features(batch["image"], batch["text"])
            return tuple(features[head] for head in heads), model.temperature_values()

        def batch_loss(features: tuple, temps: dict, batch: dict) -> tuple[Any, dict]:
            terms = losses(*features, batch.get("teacher_image"), batch.get("teacher_text"), batch["group"],
                           {key: temps[name] for key, name in uses.items()}, loss_config)
            return terms["total"], {f"loss_{k}": v for k, v in terms.items() if k != "total"}

        grad_fn = micro_batched(embed, batch_loss, lambda p: nnx.merge(graphdef, p).temperature_values(),
                                config.train.micro_batches, config.train.accumulation)

        def fn(params: Any, batch: dict, key: Any) -> tuple[Any, dict, Any, None]:
            loss, temps, terms, grads = grad_fn(params, batch, key)
            return loss, {**terms, **temps}, grads, None

        return fn

    def record_fields(self, config: Config, source: Any) -> TeacherFields | None:
        s = config.section
        if not (s.cross or s.uni):
            return None
        root = data_root(config)
        image_file, text_file = s.image_teachers, s.text_teachers
        if config.data.kind == "demo" and not (image_file and text_file):
            image_path, text_path = write_demo_teachers(root)
            image_file, text_file = image_file or image_path.name, text_file or text_path.name
        image = load_image_teachers(root / image_file, allow_pickle=s.allow_pickle)
        text = load_text_teachers(root / text_file)
        return TeacherFields(image, text, source)

    def evaluator(self, config: Config, tokenizer: Any, source: Any = None) -> Evaluator:
        """Image-text recall on the cross heads; with uni heads also text-text recall on the uni text head (a caption
        finding another caption of its image). Image-image retrieval needs labelled image sets (the original uses
        SOP, CUB, Cars): `uni_encoder(graphdef, "image", ...)` embeds them."""
        from jaxretrieval.data.pipeline import caption_source, data_root, eval_inputs
        from jaxretrieval.evaluate import evaluate_retrieval, within_modality_recall

        source = source or caption_source(config, data_root(config), config.eval.split)
        inputs = eval_inputs(config, source, tokenizer)
        batch = config.eval.batch_size

        def evaluate(graphdef: nnx.GraphDef, params: Any, mesh: Any) -> dict[str, Any]:
            metrics = evaluate_retrieval(graphdef, params, inputs, mesh, batch, config.eval.protocol,
                                         config.eval.folds)
            if config.section.uni:
                text = embed_all(uni_encoder(graphdef, "text", mesh, params), inputs.tokens, batch, mesh)
                metrics.update(within_modality_recall(text, inputs.text_groups, mesh, "uni_t2t_"))
            return metrics

        return evaluate

    def init_from(self, config: Config, path: str, meta: dict, abstract: Any, fresh: Any) -> Any:
        """The towers of a converted or trained CLIP (or CUSA) checkpoint over fresh heads and temperatures. A CLIP
        checkpoint's logit scale (and bias) is left out: CUSA has none."""
        params, _ = checkpoint.load_model(path, fresh(), partial=True, ignore=("logit_scale", "logit_bias"))
        return params


register(CUSA())
__all__ = ["CUSA", "CUSASettings", "IMAGE_FILE", "TEXT_FILE", "temperature_plan"]
