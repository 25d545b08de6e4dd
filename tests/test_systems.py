"""The system registry: a system defined in this file alone trains, evaluates, checkpoints and resumes through the one
train loop; the registered systems keep their names, sections and old keys; the loop names no system."""

from __future__ import annotations

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPO, tiny_overrides
from flax import nnx

from jaxretrieval import evaluate, train
from jaxretrieval.config import ConfigError, load_config, to_dict
from jaxretrieval.data.pipeline import caption_source
from jaxretrieval.data.sources import CaptionRecord
from jaxretrieval.models import create_model, parameter_roles
from jaxretrieval.models.clip import l2_normalize
from jaxretrieval.systems import SYSTEMS, get_system, register, unregister
from jaxretrieval.systems.base import System


@dataclasses.dataclass
class ToySettings:
    margin: float = 0.2
    max_temperature: float = 0.5


class ToyModel(nnx.Module):
    """Mean-pooled pixels and token embeddings, each through a linear map; a temperature."""

    def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs):
        self.image = nnx.Linear(3, dim, rngs=rngs)
        self.tokens = nnx.Embed(vocab, dim, rngs=rngs)
        self.temperature = nnx.Param(jnp.asarray(2.0))  # above the clamp: before_step must bring it down

    def encode_image(self, pixels: jax.Array, normalize: bool = True) -> jax.Array:
        x = self.image(pixels.mean(axis=(1, 2)))
        return l2_normalize(x) if normalize else x

    def encode_text(self, tokens: jax.Array, normalize: bool = True) -> jax.Array:
        x = self.tokens(tokens).mean(axis=1)
        return l2_normalize(x) if normalize else x


class LengthField:
    """A per-record batch field: the caption's length in words (picklable, as grain workers need)."""

    def __call__(self, record: CaptionRecord) -> dict[str, np.ndarray]:
        return {"words": np.float32(len(record.caption.split()))}


class Toy(System):
    name = "toy"
    summary = "a test's system"
    families = ("clip",)
    losses = ("hinge",)
    protocols = ("image_text",)
    data_kinds = ("jsonl",)
    Section = ToySettings

    def check(self, config):
        return [(config.section.margin > 0, "toy.margin must be > 0")]

    def build(self, config, *, rngs, dtype):
        return ToyModel(config.model.text.vocab_size, config.model.embed_dim, rngs=rngs)

    def before_step(self, config):
        high = config.section.max_temperature
        return lambda params: {**params, "temperature": jnp.minimum(params["temperature"], high)}

    def record_fields(self, config, source):
        return LengthField()

    def grad_fn(self, config, graphdef, mesh):
        margin = config.section.margin

        def loss_fn(params, batch):
            model = nnx.merge(graphdef, params)
            image, text = model.encode_image(batch["image"]), model.encode_text(batch["text"])
            scores = image @ text.T / model.temperature[...]
            positive = jnp.diag(scores)
            hinge = jax.nn.relu(margin + scores - positive[:, None]) * (1 - jnp.eye(len(scores)))
            return hinge.mean(), {"temperature": model.temperature[...], "words": batch["words"].mean()}

        def grad_fn(params, batch, key):
            (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
            return loss, metrics, grads, None

        return grad_fn


@pytest.fixture
def toy():
    system = register(Toy())
    yield system
    unregister("toy")


def toy_overrides(root, steps: int = 4) -> list[str]:
    return [*tiny_overrides(root, **{"train.steps": steps, "train.checkpoint_every": 2}), "system=toy",
            "toy.margin=0.3", "train.loss=hinge"]


def test_a_system_defined_in_a_test_trains_through_the_one_loop(toy, demo_root, tmp_path):
    config = load_config(None, toy_overrides(demo_root))
    assert (config.system, config.section, config.eval.protocol) == ("toy", ToySettings(margin=0.3), "image_text")
    workdir = tmp_path / "run"
    result = train.train(config, workdir)
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(r["temperature"] == pytest.approx(0.5) for r in steps)  # clamped before every step, as declared
    captions = [len(r.caption.split()) for r in caption_source(config, demo_root, "train").records]
    assert min(captions) <= steps[0]["words"] <= max(captions)  # the record field reached the loss
    assert {"i2t_R1", "t2i_R10", "rsum"} <= result.keys()
    saved = load_config(workdir / "config.yaml")
    assert saved.section == ToySettings(margin=0.3) and saved.system == "toy"
    assert "toy" in (workdir / "config.yaml").read_text()

    resumed = train.train(load_config(None, toy_overrides(demo_root, steps=6)), workdir)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())[-1] == "6"
    assert resumed["step"] == 6
    metrics = evaluate.evaluate_checkpoint(saved, workdir)
    assert metrics["rsum"] == pytest.approx(resumed["rsum"], abs=1e-4)


def test_a_system_section_is_typed_and_checked(toy, demo_root):
    with pytest.raises(ConfigError, match=r"unknown config key 'toy.margn'; did you mean 'toy.margin'"):
        load_config(None, [*toy_overrides(demo_root), "toy.margn=1"])
    with pytest.raises(ConfigError, match="toy.margin must be > 0"):
        load_config(None, [*toy_overrides(demo_root), "toy.margin=0"])
    with pytest.raises(ConfigError, match="toy.margin: expected float"):
        load_config(None, [*toy_overrides(demo_root), "toy.margin=wide"])
    with pytest.raises(ConfigError, match=r"'toy:' holds the settings of system toy, but this config's system is clip"):
        load_config(None, ["toy.margin=0.1"])
    with pytest.raises(ConfigError, match="train.loss=contrastive: system toy takes hinge"):
        load_config(None, [*toy_overrides(demo_root), "train.loss=contrastive"])
    with pytest.raises(ValueError, match="already registered"):
        register(Toy())


def test_unknown_system_names_the_nearest():
    with pytest.raises(ConfigError, match=r"unknown system 'clp'; did you mean 'clip'\? \(systems: clip, beit3, ctl"):
        load_config(None, ["system=clp"])


def test_registered_systems_and_their_defaults():
    for name in ("clip", "beit3", "ctl"):
        assert get_system(name).name == name and name in SYSTEMS
    config = load_config(None, ["model.name=resnet_tiny_ctl", "data.kind=reid_demo", "model.num_classes=4"])
    assert (config.system, config.train.loss, config.eval.protocol) == ("ctl", "ctl", "reid")
    roles = set(jax.tree.leaves(parameter_roles(config)))
    assert roles == {"param", "center", "state"}
    assert isinstance(get_system("ctl").role_optimizers(config)["center"], optax.GradientTransformation)


def test_old_ctl_keys_still_work_with_one_notice(caplog):
    old = ["model.name=resnet_tiny_ctl", "data.kind=reid_demo", "train.loss=ctl", "eval.protocol=reid",
           "train.triplet_margin=0.7", "train.center_lr=0.25", "eval.per_camera_centroids=false"]
    with caplog.at_level("WARNING"):
        config = load_config(None, old)
    assert (config.section.triplet_margin, config.section.center_lr, config.section.per_camera_centroids) == \
        (0.7, 0.25, False)
    notices = [r.getMessage() for r in caplog.records if "moved to ctl's own section" in r.getMessage()]
    assert len(notices) == 1 and "train.triplet_margin" in notices[0] and "ctl.center_lr" in notices[0]
    assert to_dict(config)["ctl"]["triplet_margin"] == 0.7 and "triplet_margin" not in to_dict(config)["train"]
    caplog.clear()
    with caplog.at_level("WARNING"):  # a checkpoint's saved config in the old form: read silently
        again = load_config(None, base={**to_dict(config), "train": {**to_dict(config)["train"], "center_lr": 0.25}},
                            notices=False)
    assert again.section.center_lr == 0.25 and not caplog.records


def test_an_old_style_checkpoint_config_resumes_without_changes():
    """A run saved before the ctl section existed resumes under today's config: no key counts as changed, and an
    old-style override on the command line still wins over the checkpoint's new-style value."""
    from jaxretrieval.resume import config_changes

    config = load_config(REPO / "configs" / "demo" / "ctl_tiny.yaml")
    old = to_dict(config)
    settings = old.pop("ctl")
    old["train"].update({k: v for k, v in settings.items() if k != "per_camera_centroids"})
    old["eval"]["per_camera_centroids"] = settings["per_camera_centroids"]
    assert config_changes(old, config) == []
    again = load_config(None, ["eval.per_camera_centroids=false"], base=to_dict(config), notices=False)
    assert again.section.per_camera_centroids is False


def test_models_build_from_a_config_or_the_older_model_config():
    config = load_config(None, ["model.name=tiny"])
    a = nnx.state(create_model(config, seed=3), nnx.Param)
    b = nnx.state(create_model(config.model, seed=3), nnx.Param)
    assert jax.tree.all(jax.tree.map(lambda x, y: bool((x == y).all()), a, b))


def test_the_loop_names_no_system():
    for path in ("jaxretrieval/train.py", "jaxretrieval/tasks.py", "jaxretrieval/models/__init__.py",
                 "jaxretrieval/config_checks.py", "jaxretrieval/evaluate.py", "jaxretrieval/api.py"):
        text = (REPO / path).read_text()
        found = re.findall(r"""["'](clip|beit3|ctl|cusa)["']|family ==""", text)
        assert not found, f"{path} names {found}"


def test_every_system_describes_itself(capsys):
    from jaxretrieval.systems import main

    assert main() == 0
    out = capsys.readouterr().out
    assert all(re.search(rf"^{name}\s", out, re.M) for name in ("clip", "beit3", "ctl"))

