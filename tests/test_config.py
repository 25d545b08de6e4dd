"""Typed config: misspelt keys, wrong types, overrides, precedence, every shipped config file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from jaxretrieval.config import (
    Config,
    ConfigError,
    ModelConfig,
    TrainConfig,
    from_dict,
    load_config,
    save_config,
    to_dict,
)
from jaxretrieval.models.presets import MODEL_PRESETS

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(REPO.glob("configs/**/*.yaml"))


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------------------
# Unknown keys


@pytest.mark.parametrize(
    ("text", "bad", "suggestion"),
    [
        ("train:\n  warmup_step: 10\n", "train.warmup_step", "train.warmup_steps"),
        ("trian:\n  steps: 10\n", "trian", "train"),
        ("model:\n  image:\n    patch_sise: 16\n", "model.image.patch_sise", "model.image.patch_size"),
        ("data:\n  test_fille: x.jsonl\n", "data.test_fille", "data.test_file"),
        ("mesh:\n  fsdb: 2\n", "mesh.fsdb", "mesh.fsdp"),
    ],
)
def test_misspelt_key_in_file_names_path_file_and_suggestion(tmp_path, text, bad, suggestion) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert f"'{bad}'" in message
    assert str(path) in message
    assert f"did you mean '{suggestion}'" in message


def test_misspelt_key_in_override_names_the_override() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.steps=5", "train.warmup_stepz=3"])
    message = str(info.value)
    assert "'train.warmup_stepz'" in message
    assert "did you mean 'train.warmup_steps'" in message
    assert "train.warmup_stepz=3" in message  # where it came from


def test_lerning_rate_names_full_path_and_file(tmp_path) -> None:
    path = write(tmp_path, "train:\n  lerning_rate: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "'train.lerning_rate'" in str(info.value)
    assert str(path) in str(info.value)
    assert ", lr," in str(info.value)  # at least listed among the valid keys


def test_lerning_rate_suggests_lr(tmp_path) -> None:
    path = write(tmp_path, "train:\n  lerning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"did you mean 'train\.lr'"):
        load_config(path)


def test_unknown_model_preset_suggests_nearest(tmp_path) -> None:
    path = write(tmp_path, "model:\n  name: vit_b33\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "'vit_b33'" in str(info.value)
    assert "did you mean 'vit_b32'" in str(info.value)


# ---------------------------------------------------------------------------------------------------------
# Types


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("train:\n  steps: '100'\n", "train.steps"),  # string for int
        ("train:\n  steps: true\n", "train.steps"),  # bool for int
        ("train:\n  steps: 1.5\n", "train.steps"),  # float for int
        ("train:\n  lr: true\n", "train.lr"),  # bool for float
        ("train:\n  lr: fast\n", "train.lr"),
        ("train:\n  progress_bar: 1\n", "train.progress_bar"),  # int for bool
        ("model:\n  image:\n    width: '768'\n", "model.image.width"),
        ("data:\n  mean: 0.5\n", "data.mean"),  # scalar for a list
        ("data:\n  mean: [0.5, x, 0.5]\n", "data.mean[1]"),
        ("train: 5\n", "train"),  # scalar for a section
    ],
)
def test_wrong_type_names_key_and_file(tmp_path, text, key) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert key in str(info.value)
    assert str(path) in str(info.value)


def test_wrong_type_in_override_names_key() -> None:
    for override in ["train.steps=abc", "train.steps=true", "train.batch_size=[1, 2]"]:
        with pytest.raises(ConfigError, match=r"train\.(steps|batch_size)"):
            load_config(None, [override])


def test_int_is_accepted_for_float() -> None:
    config = load_config(None, ["train.lr=1"])
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)


# ---------------------------------------------------------------------------------------------------------
# Overrides


def test_overrides_parse_values() -> None:
    config = load_config(
        None,
        [
            "train.steps=123",
            "train.lr=0.25",
            "train.weight_decay=1.5e-2",
            "train.progress_bar=false",
            "data.flip=true",
            "data.mean=[0.1, 0.2, 0.3]",
            "data.root=some/dir",
            "sharding=[['qkv/kernel', [null, tensor]], ['.*', null]]",
            "mesh.data=-1",
            "mesh.fsdp=2",
        ],
    )
    assert config.train.steps == 123 and type(config.train.steps) is int
    assert config.train.lr == 0.25 and type(config.train.lr) is float
    assert config.train.weight_decay == pytest.approx(0.015)
    assert config.train.progress_bar is False
    assert config.data.flip is True
    assert config.data.mean == (0.1, 0.2, 0.3)
    assert config.data.root == "some/dir"
    assert config.sharding == [["qkv/kernel", [None, "tensor"]], [".*", None]]
    assert config.mesh.data == -1 and config.mesh.fsdp == 2


def test_exponent_floats_without_a_dot(tmp_path) -> None:
    # YAML 1.1 (PyYAML) reads 3e-4 as a string; float keys must still take it, in overrides and in files.
    assert load_config(None, ["train.lr=3e-4"]).train.lr == pytest.approx(3e-4)
    assert load_config(None, ["train.eps=1E-8"]).train.eps == pytest.approx(1e-8)
    assert load_config(write(tmp_path, "train:\n  lr: 5e-4\n")).train.lr == pytest.approx(5e-4)
    with pytest.raises(ConfigError, match=r"train\.steps"):
        load_config(None, ["train.steps=1e3"])  # ... but an int key still wants an int


def test_override_without_equals_is_an_error() -> None:
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(None, ["train.steps"])


def test_later_override_wins() -> None:
    assert load_config(None, ["train.steps=5", "train.steps=7"]).train.steps == 7


# ---------------------------------------------------------------------------------------------------------
# Precedence: dataclass defaults <- preset <- file <- overrides


def test_preset_then_file_then_override(tmp_path) -> None:
    tiny = MODEL_PRESETS["tiny"]
    path = write(
        tmp_path, "model:\n  name: tiny\n  embed_dim: 48\n  image:\n    width: 128\ntrain:\n  steps: 9\n  lr: 0.5\n"
    )
    config = load_config(path, ["model.embed_dim=40", "train.lr=0.125"])
    m = config.model
    assert m.name == "tiny"
    assert m.embed_dim == 40  # override over file over preset
    assert m.image.width == 128  # file over preset
    assert m.image.layers == tiny["image"]["layers"]  # preset over the dataclass default
    assert m.image.patch_size == tiny["image"]["patch_size"] != ModelConfig().image.patch_size
    assert m.text.context_length == tiny["text"]["context_length"] != ModelConfig().text.context_length
    assert m.image.mlp_ratio == ModelConfig().image.mlp_ratio  # neither preset nor file: dataclass default
    assert config.train.steps == 9 and config.train.lr == 0.125
    assert config.train.warmup_steps == TrainConfig().warmup_steps


def test_override_of_model_name_switches_preset_but_file_keys_still_win(tmp_path) -> None:
    path = write(tmp_path, "model:\n  name: tiny\n  text:\n    layers: 2\n")
    config = load_config(path, ["model.name=vit_b16"])
    b16 = MODEL_PRESETS["vit_b16"]
    assert config.model.image.patch_size == b16["image"]["patch_size"]
    assert config.model.image.width == b16["image"]["width"]
    assert config.model.text.width == b16["text"]["width"]
    assert config.model.text.layers == 2


def test_default_preset_applies_without_a_file() -> None:
    config = load_config(None)
    preset = MODEL_PRESETS[ModelConfig().name]
    assert config.model.embed_dim == preset["embed_dim"]
    assert dataclasses.asdict(config.model.image) == {**dataclasses.asdict(ModelConfig().image), **preset["image"]}


def test_cross_field_validation(tmp_path) -> None:
    cases = {
        "model.image.patch_size=5": "patch_size",
        "model.activation=relu": "activation",
        "train.precision=fp16": "precision",
        "data.kind=parquet": "data.kind",
        "train.steps=0": "train.steps",
        "data.mean=[0.5, 0.5]": "data.mean",
        "sharding=[[1, 2]]": "sharding",
    }
    for override, key in cases.items():
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, ["model.name=tiny", override])


# ---------------------------------------------------------------------------------------------------------
# Shipped configs, round trips, file errors


def test_configs_directory_is_found() -> None:
    assert CONFIG_FILES, f"no *.yaml under {REPO / 'configs'}"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[str(p.relative_to(REPO)) for p in CONFIG_FILES])
def test_every_shipped_config_loads_and_validates(path: Path) -> None:
    raw = yaml.safe_load(path.read_text())
    config = load_config(path)
    assert isinstance(config, Config)
    # Every value the file sets arrives in the config (nothing silently dropped).
    flat = to_dict(config)

    def check(node, expected, where):
        for key, value in expected.items():
            if isinstance(value, dict):
                check(node[key], value, f"{where}{key}.")
            else:
                got = node[key]
                if isinstance(got, float) and isinstance(value, str):  # 3e-4: a string to YAML 1.1
                    value = float(value)
                assert got == value or got == pytest.approx(value), f"{path}: {where}{key}"

    check(flat, raw or {}, "")


def test_to_dict_from_dict_round_trip() -> None:
    config = load_config(
        None,
        [
            "model.name=tiny",
            "model.activation=gelu",
            "train.steps=17",
            "data.mean=[0.1, 0.2, 0.3]",
            "sharding=[['kernel', [fsdp, null]], ['bias', null]]",
            "mesh.fsdp=2",
            "data.root=/x/y",
        ],
    )
    raw = to_dict(config)
    assert isinstance(raw["data"]["mean"], list)
    again = from_dict(raw)
    assert again == config
    assert to_dict(again) == raw
    defaults = from_dict({})  # "" system, loss and protocol resolved to the clip system's
    assert (defaults.system, defaults.train.loss, defaults.eval.protocol) == ("clip", "contrastive", "image_text")
    assert from_dict(to_dict(defaults)) == defaults


def test_save_load_round_trip(tmp_path) -> None:
    config = load_config(None, ["model.name=vit_l14", "train.lr=0.00025", "data.std=[1, 2, 3]", "eval.split=val"])
    path = tmp_path / "saved.yaml"
    save_config(config, path)
    assert load_config(path) == config


def test_bad_yaml_names_the_file(tmp_path) -> None:
    path = write(tmp_path, "train:\n  steps: [1, 2\n  lr: 0.1\n", name="broken.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_missing_file_names_the_file(tmp_path) -> None:
    path = tmp_path / "does_not_exist.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_empty_file_gives_defaults(tmp_path) -> None:
    assert load_config(write(tmp_path, "")) == load_config(None)


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "hello\n"])
def test_non_mapping_file_names_the_file(tmp_path, text) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
