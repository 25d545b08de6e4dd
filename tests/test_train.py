"""The train and evaluate commands end to end on a tiny model: sharding, resume, bad input, load()."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import REPO, run_python, tiny_config, tiny_overrides

import jaxretrieval
from jaxretrieval import evaluate, train
from jaxretrieval.data.pipeline import caption_source
from jaxretrieval.data.sources import DataError
from jaxretrieval.retrieval import image_text_recall
from jaxretrieval.sharding import make_mesh

CONFIG = REPO / "configs" / "demo" / "clip_tiny.yaml"


def train_command(workdir: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "jaxretrieval.train", "--config", str(CONFIG), "--workdir", str(workdir),
            *overrides]


def losses(workdir: Path) -> list[float]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [record["loss"] for record in map(json.loads, lines) if "loss" in record]


def final_params(config, workdir: Path) -> dict:
    _, params, meta = evaluate.restore_params(config, workdir, make_mesh(config.mesh))
    assert meta["step"] == config.train.steps
    return jax.tree.map(np.asarray, params)


@pytest.fixture(scope="module")
def trained(demo_root, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    result = train.train(tiny_config(demo_root), workdir)
    return workdir, result


def test_train_writes_the_contract_outputs(trained):
    workdir, result = trained
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 7))
    assert all({"loss", "lr", "grad_norm", "samples_per_s"} <= r.keys() for r in records if "loss" in r)
    saved = json.loads((workdir / "eval" / "step_6.json").read_text())
    assert saved == result and set(saved) >= {"i2t_R1", "i2t_R5", "i2t_R10", "t2i_R1", "t2i_R5", "t2i_R10",
                                              "rsum"}
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "6"]


FSDP_RULES = '[["kernel$", ["fsdp", null]], ["token_embedding/embedding$", [null, "fsdp"]]]'


def run_in_subprocess(workdir: Path, overrides: list[str], devices: int) -> list[float]:
    argv = train_command(workdir, overrides)[3:]
    run_python(f"import sys; from jaxretrieval.train import main; sys.exit(main({argv!r}))", devices=devices)
    return losses(workdir)


@pytest.fixture(scope="module")
def twenty_steps(demo_root, tmp_path_factory):
    """Overrides for 20 steps, and the losses of that run on one device."""
    overrides = tiny_overrides(demo_root, **{"train.steps": 20, "train.checkpoint_every": 0})
    return overrides, run_in_subprocess(tmp_path_factory.mktemp("one_device"), overrides, devices=1)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["data", "data+fsdp"])
def test_eight_devices_match_one_device(twenty_steps, tmp_path, layout):
    overrides, reference = twenty_steps
    sharded = {"data": [], "data+fsdp": ["mesh.data=4", "mesh.fsdp=2", f"sharding={FSDP_RULES}"]}[layout]
    got = run_in_subprocess(tmp_path, overrides + sharded, devices=8)
    assert len(reference) == 20 and reference[-1] < reference[0]
    np.testing.assert_allclose(got, reference, atol=1e-5, rtol=0)


def test_non_finite_loss_stops_naming_the_step(demo_root, tmp_path):
    config = tiny_config(demo_root, **{"train.lr": 1e38, "train.grad_clip": 0, "train.warmup_steps": 0})
    with pytest.raises(train.NonFiniteLoss, match=r"loss is (nan|inf|-inf) at step \d+ \(records: .*train\.jsonl:\d+, "
                       r".*train\.jsonl:\d+ and 8 more\); stopping \(newest checkpoint: None, intact\)") as error:
        train.train(config, tmp_path)
    named = re.findall(r"train\.jsonl:(\d+)", str(error.value))
    lines = (demo_root / "train.jsonl").read_text().splitlines()
    assert len(named) == 8 and all(1 <= int(n) <= len(lines) for n in named)


def test_config_typo_on_the_command_line(tmp_path, capsys):
    assert train.main(["--config", str(CONFIG), "--workdir", str(tmp_path), "train.stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.stepz'" in err and "did you mean 'train.steps'" in err


def test_evaluate_command_and_load_agree(trained, tmp_path):
    workdir, result = trained
    output = tmp_path / "metrics.json"
    assert evaluate.main(["--checkpoint", str(workdir), "--output", str(output)]) == 0
    metrics = json.loads(output.read_text())
    for key in ("i2t_R1", "i2t_R5", "i2t_R10", "t2i_R1", "t2i_R5", "t2i_R10", "rsum"):
        assert metrics[key] == pytest.approx(result[key])

    model, preprocess, tokenizer = jaxretrieval.load(workdir / "checkpoints" / "6")
    config = evaluate.saved_config(workdir)
    raw_scale = float(model.params["logit_scale"])
    assert model.logit_scale == pytest.approx(np.exp(min(raw_scale, config.model.max_logit_scale)), rel=1e-6)
    source = caption_source(config, Path(config.data.root), "test")
    pixels = np.stack([preprocess(path) for path in source.images()])
    images = np.asarray(model.encode_image(pixels, normalize=True))
    texts = np.asarray(model.encode_text(tokenizer([r.caption for r in source.records]), normalize=True))
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1.0, atol=1e-5)
    recall = image_text_recall(images @ texts.T, np.asarray(source.text_to_image()))
    for key in ("i2t_R1", "t2i_R1", "rsum"):
        assert recall[key] == pytest.approx(metrics[key])


def test_checkpoint_of_another_model_size_is_named(trained, capsys):
    workdir, _ = trained
    assert evaluate.main(["--checkpoint", str(workdir), "model.text.width=48", "model.text.heads=2"]) == 2
    err = capsys.readouterr().err
    assert "parameter 'text/" in err and "has shape" in err and "expects" in err


def test_bf16_compute_keeps_float32_parameters(demo_root, tmp_path):
    config = tiny_config(demo_root, **{"train.precision": "bf16", "train.steps": 3})
    train.train(config, tmp_path)
    assert all(np.isfinite(losses(tmp_path)))
    _, params, _ = evaluate.restore_params(config, tmp_path, make_mesh(config.mesh))
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {np.dtype("float32")}


def test_init_from_starts_at_the_given_checkpoint(trained, demo_root, tmp_path):
    source, _ = trained
    config = tiny_config(demo_root, **{"train.init_from": str(source), "data.tokenizer": "checkpoint",
                                       "train.lr": 0.0, "train.end_lr": 0.0, "train.steps": 2})
    train.train(config, tmp_path)
    start = jax.tree.map(np.asarray, evaluate.restore_params(config, source, make_mesh(config.mesh))[1])
    jax.tree.map(np.testing.assert_array_equal, final_params(config, tmp_path), start)


def test_tokenizer_from_checkpoint_needs_init_from(demo_root, tmp_path):
    config = tiny_config(demo_root, **{"data.tokenizer": "checkpoint"})
    with pytest.raises(DataError, match="needs train.init_from"):
        train.train(config, tmp_path)


def test_retrieve_command_on_a_folder_and_caption_file(trained, demo_root, tmp_path, capsys):
    from jaxretrieval import retrieve

    workdir, result = trained
    lines = [json.loads(line) for line in (demo_root / "test.jsonl").read_text().splitlines()]
    captions = tmp_path / "captions.tsv"
    captions.write_text("".join(f"{item['image']}\t{item['caption']}\n" for item in lines))
    output = tmp_path / "zero_shot.json"
    assert retrieve.main(["--checkpoint", str(workdir), "--images", str(demo_root), "--captions", str(captions),
                          "--output", str(output)]) == 0
    metrics = json.loads(output.read_text())
    for key in ("i2t_R1", "i2t_R10", "t2i_R1", "t2i_R10", "rsum", "num_images", "num_texts"):
        assert metrics[key] == pytest.approx(result[key])
    assert "text -> image" in capsys.readouterr().out
